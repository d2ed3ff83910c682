"""Training-data loaders: MIS train, MIS test and visguard JSONL layouts -> :class:`TrainRecord` lists.

The layouts are read by the core's one reader each (:mod:`visguard.datasets`, which resolves image
paths inside the dataset root and refuses any path that leaves it); this module adds what training
needs on top: layout detection, dataset roots holding several files, and the ``register_datasets``
registry through which :func:`load_records` picks a loader by name or detects the layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from visguard.datasets import (
    DatasetError,
    Label,
    Record,
    read_json,
    read_jsonl,
    read_mis_test,
    read_mis_train,
)

__all__ = ["DatasetError", "DatasetLoader", "Label", "TrainRecord", "detect_format", "load_records"]

#: a training item is the core's one record type (:class:`visguard.datasets.Record`)
TrainRecord = Record


class DatasetLoader:
    """Base class of dataset loaders (register subclasses through ``register_datasets``).

    Subclasses set :attr:`name` and implement :meth:`detect` and :meth:`iter_records`.
    """

    #: registry name
    name: str = ""

    def detect(self, path: Path) -> bool:
        """Whether ``path`` (a file or directory) looks like this layout."""
        raise NotImplementedError

    def files(self, path: Path) -> list[Path]:
        """The data files this loader reads for ``path`` (a file is itself)."""
        return [path]

    def iter_records(self, file: Path, root: Path) -> Iterator[TrainRecord]:
        """Yield the records of one data file; images resolve against ``root``."""
        raise NotImplementedError

    def load(self, path: str | Path) -> list[TrainRecord]:
        """Load every record under ``path`` (a data file or a dataset root).

        Raises:
            DatasetError: missing files, malformed records, or image paths outside the root.
        """
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"training data not found: {path}")
        out: list[TrainRecord] = []
        for file in self.files(path):
            out.extend(self.iter_records(file, file.parent))
        if not out:
            raise DatasetError(f"no records found in {path} (layout {self.name!r})")
        return out


def _first_record(file: Path) -> Mapping[str, Any] | None:
    try:
        if file.suffix.lower() == ".jsonl":
            with file.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        rec = json.loads(line)
                        return rec if isinstance(rec, Mapping) else None
            return None
        data = read_json(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, DatasetError):
        return None
    if isinstance(data, Mapping):  # {"data": [...]} wrappers
        data = next((v for v in data.values() if isinstance(v, list)), None)
    return data[0] if isinstance(data, list) and data and isinstance(data[0], Mapping) else None


# --------------------------------------------------------------------------- layouts
class MisTrainLoader(DatasetLoader):
    """MIS train layout (``mis_train.json``): ShareGPT-like records.

    Fields: ``image`` or ``images`` (list of relative paths, or one path), ``conversations`` or
    ``messages`` (``[{"from": "human"|"gpt", "value": ...}]`` or ``[{"role": "user"|"assistant",
    "content": ...}]``), ``category``, ``sub_category``, optional ``id`` and ``label`` (default
    ``unsafe``: every MIS training item is a risky instruction).
    """

    name = "mis-train"

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return (path / "mis_train.json").is_file()
        rec = _first_record(path) if path.suffix.lower() == ".json" else None
        return rec is not None and ("conversations" in rec or "messages" in rec)

    def files(self, path: Path) -> list[Path]:
        if path.is_dir():
            file = path / "mis_train.json"
            if not file.is_file():
                raise DatasetError(f"{path} has no mis_train.json")
            return [file]
        return [path]

    def iter_records(self, file: Path, root: Path) -> Iterator[TrainRecord]:
        yield from read_mis_train(file)


class MisTestLoader(DatasetLoader):
    """MIS test layout (``mis_<split>.json``): ``question``, ``image_path1``, ``image_path2``,
    ``category``, ``sub_category``, optional ``id`` and ``label`` (default ``unsafe``).

    A dataset root loads every ``mis_<split>.json`` in it except ``mis_train.json``.
    """

    name = "mis-test"

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return bool(self._split_files(path))
        rec = _first_record(path) if path.suffix.lower() == ".json" else None
        return rec is not None and "image_path1" in rec

    @staticmethod
    def _split_files(path: Path) -> list[Path]:
        return sorted(p for p in path.glob("mis_*.json") if p.name != "mis_train.json")

    def files(self, path: Path) -> list[Path]:
        if path.is_dir():
            found = self._split_files(path)
            if not found:
                raise DatasetError(f"{path} has no mis_<split>.json files")
            return found
        return [path]

    def iter_records(self, file: Path, root: Path) -> Iterator[TrainRecord]:
        yield from read_mis_test(file)


class JsonlLoader(DatasetLoader):
    """visguard JSONL (as written by :func:`visguard_testing.synthetic.write_jsonl`; see docs/training.md).

    One object per line: ``images`` (relative paths), ``text``, ``label``, optional ``id``,
    ``category``, ``sub_category``, ``response`` (a host answer: a post-check example), ``target``
    (the guard's full reason-mode output, whose ``Verdict:`` line must agree with ``label``) or
    ``reasoning`` (the text before the verdict line), and ``answer`` (for the response objective).
    """

    name = "jsonl"

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return len(list(path.glob("*.jsonl"))) == 1
        return path.suffix.lower() == ".jsonl"

    def files(self, path: Path) -> list[Path]:
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if len(found) != 1:
                raise DatasetError(f"{path} holds {len(found)} .jsonl files; pass the one to use")
            return found
        return [path]

    def iter_records(self, file: Path, root: Path) -> Iterator[TrainRecord]:
        yield from read_jsonl(file)


# --------------------------------------------------------------------------- lookup
def dataset_loaders() -> dict[str, Any]:
    """Registered dataset loader factories, by name (from every installed plugin)."""
    from visguard import plugins

    return plugins.registry("datasets")


def detect_format(path: str | Path) -> str:
    """Name of the registered loader that recognises ``path``.

    Raises:
        DatasetError: ``path`` does not exist, or no loader (or more than one) recognises it.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"training data not found: {path}")
    found = [name for name, factory in dataset_loaders().items() if factory().detect(path)]
    if len(found) == 1:
        return found[0]
    known = ", ".join(sorted(dataset_loaders()))
    if not found:
        raise DatasetError(f"cannot tell the layout of {path}; pass --format NAME (one of: {known})")
    raise DatasetError(f"{path} matches several layouts ({', '.join(found)}); pass --format NAME")


def load_records(path: str | Path, format: str | None = None, *, limit: int | None = None) -> list[TrainRecord]:
    """Load training records from ``path`` with the named loader, or the detected one.

    Raises:
        DatasetError: see :meth:`DatasetLoader.load` and :func:`detect_format`.
        PluginError: ``format`` names no registered loader.
    """
    from visguard import plugins

    name = format or detect_format(path)
    records = plugins.get("datasets", name)().load(path)
    return records[:limit] if limit else records
