"""Benchmark base types: the common evaluation item, the loader interface, and layout helpers.

A benchmark plugin reads a local copy of a public benchmark in its *published* layout and turns it
into :class:`EvalItem` objects. Loaders never download anything. Every image path is resolved under
the dataset root and refused if it would escape it (``..``, absolute paths, symlinks pointing out).
Wrong paths or layouts raise :class:`BenchmarkLayoutError` naming the missing file or field.
"""

from __future__ import annotations

import csv
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError
from visguard.datasets import (
    IMAGE_SUFFIXES,
    DatasetError,
    Label,
    Record,
    field_of,
    read_json,
    resolve_under,
    unique_ids,
)
from visguard.datasets import parse_label as _parse_label

__all__ = [
    "IMAGE_SUFFIXES", "Benchmark", "BenchmarkLayoutError", "EvalItem", "GoldLabel", "check_unique_ids", "field_of",
    "gold_label", "read_csv", "read_json", "resolve_under",
]

#: the gold label of an item (the one label type of :mod:`visguard.datasets`)
GoldLabel = Label

#: layout errors of benchmark data are dataset errors (one error type for every reader)
BenchmarkLayoutError = DatasetError


@dataclass(frozen=True)
class EvalItem(Record):
    """One labelled evaluation item: a :class:`~visguard.datasets.Record` whose label is required.

    Attributes:
        id: unique id within a benchmark (``"<split>/<the benchmark's own id or index>"``).
        label: gold label of the *request*: ``unsafe`` (should be blocked / refused) or ``safe``.
        (the other fields as in :class:`~visguard.datasets.Record`)
    """

    label: Label = "unsafe"

    def __post_init__(self) -> None:
        if self.label not in ("safe", "unsafe"):
            raise InputError(f"item {self.id!r}: label must be 'safe' or 'unsafe', got {self.label!r}")

    @classmethod
    def of(cls, record: Record, **changes: Any) -> EvalItem:
        """An item from a record (``changes`` replace fields, e.g. ``id`` or ``split``)."""
        return cls(**{**{f.name: getattr(record, f.name) for f in fields(Record)}, **changes})

    def record(self) -> dict[str, Any]:
        """The item's fields as written into a result row."""
        return {
            "id": self.id,
            "split": self.split,
            "label": self.label,
            "category": self.category,
            "sub_category": self.sub_category,
            "images": [str(p) for p in self.images],
            "text": self.text,
        }


def gold_label(value: Any, *, where: str, default: GoldLabel = "unsafe") -> GoldLabel:
    """Parse an optional ``label`` field (``"safe"``/``"unsafe"``, any case)."""
    label = _parse_label(value, where=where, default=default)
    assert label is not None
    return label


def check_unique_ids(items: Sequence[EvalItem], where: str) -> None:
    """Raise :class:`BenchmarkLayoutError` if two items share an id."""
    unique_ids(items, where)


class Benchmark(ABC):
    """Base class of benchmark loaders (register subclasses through ``register_benchmarks``).

    The registered factory is called without arguments; :meth:`load` then reads a dataset root.

    Attributes:
        name: registry name.
        title: human-readable name for reports.
        splits: the splits this loader knows, in their published names.
        layout: one-paragraph description of the expected layout (shown in errors and docs).
        metrics: the names of the model-evaluation metrics that are the benchmark's own, as
            :func:`visguard.eval.metrics.model_metrics` emits them: ``"asr"``, ``"rsr"``, ``"rr"``,
            ``"hr"``, ``"refusal_rate"``, ``"safe_rate"``, ``"mss_safe_acc"``, ``"mss_unsafe_acc"``,
            ``"mss_acc"`` (reports put them first).
    """

    name: str = ""
    title: str = ""
    splits: tuple[str, ...] = ()
    layout: str = ""
    metrics: tuple[str, ...] = ("asr", "refusal_rate")

    def available_splits(self, root: Path) -> list[str]:
        """Splits present under ``root`` (default: all known splits)."""
        return list(self.splits)

    @abstractmethod
    def load_split(self, root: Path, split: str) -> list[EvalItem]:
        """Read one split under ``root``.

        Raises:
            BenchmarkLayoutError: a file, field or image is missing or malformed.
        """

    def load(self, root: str | Path, split: str | None = None, *, limit: int | None = None) -> list[EvalItem]:
        """Read ``split`` (or every available split) of the benchmark stored at ``root``.

        Args:
            root: the dataset directory, in the benchmark's published layout.
            split: one split name (``None``: all splits present).
            limit: keep at most this many items (the first ones, in file order).

        Returns:
            Items with unique ids.

        Raises:
            BenchmarkLayoutError: ``root`` is missing, the split is unknown, or the layout is wrong.
        """
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise BenchmarkLayoutError(f"{self.name}: dataset root {root_path} is not a directory. {self.layout}")
        root_path = root_path.resolve()
        if split is None:
            splits = self.available_splits(root_path)
            if not splits:
                raise BenchmarkLayoutError(f"{self.name}: no split found under {root_path}. {self.layout}")
        else:
            known = self.available_splits(root_path)
            if split not in known and split not in self.splits:
                raise BenchmarkLayoutError(
                    f"{self.name}: unknown split {split!r}; known: {sorted(set(known) | set(self.splits))}"
                )
            splits = [split]
        items: list[EvalItem] = []
        for name in splits:
            items.extend(self.load_split(root_path, name))
            if limit is not None and len(items) >= limit:
                break
        if limit is not None:
            items = items[: max(limit, 0)]
        check_unique_ids(items, self.name)
        return items

    def prompt(self, item: EvalItem) -> str:
        """The text a host VLM receives for ``item`` (default: ``item.text``)."""
        return item.text


# ---------------------------------------------------------------------------------------------- helpers


def read_csv(path: Path, *, benchmark: str, required: Iterable[str]) -> list[dict[str, str]]:
    """Read a CSV with a header row, checking that the ``required`` columns exist."""
    if not path.is_file():
        raise BenchmarkLayoutError(f"{benchmark}: expected file {path} does not exist")
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise BenchmarkLayoutError(f"{benchmark}: {path} lacks column(s) {missing} (has {reader.fieldnames})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BenchmarkLayoutError(f"{benchmark}: cannot read {path}: {exc}") from exc
