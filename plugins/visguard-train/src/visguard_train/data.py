"""Training-data loaders: MIS train, MIS test and visguard JSONL layouts -> :class:`TrainRecord` lists.

Every loader resolves image paths relative to its dataset root and refuses any path that leaves it
(``..``, absolute paths, symlinks pointing outside). Loaders are registered through the
``register_datasets`` hook; :func:`load_records` picks one by name or detects the layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visguard.errors import InputError
from visguard.paths import resolve_inside as _resolve_inside

Label = Literal["safe", "unsafe"]

_IMAGE_PLACEHOLDER = re.compile(r"<image>\s*", re.IGNORECASE)


class DatasetError(InputError):
    """Training data is missing, malformed or points outside its root."""


@dataclass(frozen=True)
class TrainRecord:
    """One training item, independent of the layout it came from.

    Attributes:
        id: the item's id (or ``"<file>:<index>"``).
        images: absolute image paths, each checked to lie inside the dataset root.
        text: the user's request (image placeholders removed).
        label: ``safe`` / ``unsafe`` for guard training (``None`` when the layout has none).
        category / sub_category: the harm category of an unsafe item.
        response: a host model's answer: makes the guard example a post-check.
        reasoning: the guard's perception + reasoning text (trains reason mode when present).
        turns: the conversation as ``(role, text)`` pairs, ``role`` in ``user`` / ``assistant``,
            with the user's image placeholders removed; the response objective trains every
            assistant turn.
    """

    id: str
    images: tuple[Path, ...]
    text: str
    label: Label | None = None
    category: str | None = None
    sub_category: str | None = None
    response: str | None = None
    reasoning: str | None = None
    turns: tuple[tuple[str, str], ...] = field(default=())


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


def resolve_inside(root: Path, rel: Any, *, where: str) -> Path:
    """Resolve an image path from a data file against its dataset root, refusing escapes.

    The core's one path check (:func:`visguard.paths.resolve_inside`), raising :class:`DatasetError`.
    """
    return _resolve_inside(root, rel, where=where, error=DatasetError)


def _read_json_list(file: Path) -> list[Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {file}: {exc}") from exc
    if isinstance(data, Mapping):  # {"data": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise DatasetError(f"{file} must hold a JSON list of records")
    return data


def _first_record(file: Path) -> Mapping[str, Any] | None:
    try:
        if file.suffix.lower() == ".jsonl":
            with file.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        rec = json.loads(line)
                        return rec if isinstance(rec, Mapping) else None
            return None
        data = _read_json_list(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, DatasetError):
        return None
    return data[0] if data and isinstance(data[0], Mapping) else None


def _label(value: Any, where: str, default: Label | None) -> Label | None:
    if value is None:
        return default
    if isinstance(value, bool):  # {"unsafe": true}-style data is not supported: say so
        raise DatasetError(f"{where}: label must be 'safe' or 'unsafe', got {value!r}")
    text = str(value).strip().lower()
    if text not in ("safe", "unsafe"):
        raise DatasetError(f"{where}: label must be 'safe' or 'unsafe', got {value!r}")
    return text  # type: ignore[return-value]


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _strip_placeholders(text: str) -> str:
    return _IMAGE_PLACEHOLDER.sub("", text).strip()


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
        for i, rec in enumerate(_read_json_list(file)):
            where = f"{file.name} record {i}"
            if not isinstance(rec, Mapping):
                raise DatasetError(f"{where}: expected an object, got {type(rec).__name__}")
            paths = rec.get("image", rec.get("images"))
            if paths is None:
                paths = []
            if isinstance(paths, str):
                paths = [paths]
            if not isinstance(paths, list):
                raise DatasetError(f"{where}: 'image'/'images' must be a list of paths")
            convo = rec.get("conversations", rec.get("messages"))
            turns = _turns(convo, where)
            user = next((t for r, t in turns if r == "user"), "")
            yield TrainRecord(
                id=str(rec.get("id", f"{file.name}:{i}")),
                images=tuple(resolve_inside(root, p, where=where) for p in paths),
                text=user,
                label=_label(rec.get("label"), where, "unsafe"),
                category=_opt_str(rec.get("category")),
                sub_category=_opt_str(rec.get("sub_category")),
                reasoning=_reasoning_from_answer(turns),
                turns=turns,
            )


def _turns(convo: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(convo, list) or not convo:
        raise DatasetError(f"{where}: 'conversations'/'messages' must be a non-empty list of turns")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for turn in convo:
        if not isinstance(turn, Mapping):
            raise DatasetError(f"{where}: each turn must be an object")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if isinstance(text, list):  # [{"type": "text", "text": ...}, {"type": "image"}]
            text = "".join(p.get("text", "") for p in text if isinstance(p, Mapping))
        if who not in roles or not isinstance(text, str):
            raise DatasetError(f"{where}: a turn needs 'from'/'role' (human|gpt|user|assistant) and a text value")
        role = roles[who]
        if role != "system":
            out.append((role, _strip_placeholders(text) if role == "user" else text.strip()))
    if not any(r == "assistant" for r, _ in out):
        raise DatasetError(f"{where}: the conversation has no assistant (gpt) turn")
    return tuple(out)


def _reasoning_from_answer(turns: Sequence[tuple[str, str]]) -> str | None:
    # A MIRage answer is free prose (perception, reasoning, reply); the guard's reason mode gets it
    # as its reasoning paragraph, on one line so the verdict line stays the last labelled line.
    answer = next((t for r, t in turns if r == "assistant"), "")
    flat = " ".join(answer.split())
    return f"Reasoning: {flat}" if flat else None


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
        for i, rec in enumerate(_read_json_list(file)):
            where = f"{file.name} record {i}"
            if not isinstance(rec, Mapping):
                raise DatasetError(f"{where}: expected an object, got {type(rec).__name__}")
            keys = sorted(k for k in rec if re.fullmatch(r"image_path\d+", str(k)))
            keys.sort(key=lambda k: int(k[len("image_path"):]))
            if not keys:
                raise DatasetError(f"{where}: no image_path1/image_path2 fields")
            question = rec.get("question")
            if not isinstance(question, str):
                raise DatasetError(f"{where}: 'question' must be a string")
            yield TrainRecord(
                id=str(rec.get("id", f"{file.name}:{i}")),
                images=tuple(resolve_inside(root, rec[k], where=where) for k in keys),
                text=_strip_placeholders(question),
                label=_label(rec.get("label"), where, "unsafe"),
                category=_opt_str(rec.get("category")),
                sub_category=_opt_str(rec.get("sub_category")),
            )


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
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read {file}: {exc}") from exc
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file.name} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: invalid JSON: {exc}") from exc
            if not isinstance(rec, Mapping):
                raise DatasetError(f"{where}: expected an object")
            paths = rec.get("images", rec.get("image", []))
            if isinstance(paths, str):
                paths = [paths]
            if not isinstance(paths, list):
                raise DatasetError(f"{where}: 'images' must be a list of paths")
            text = rec.get("text", "")
            if not isinstance(text, str):
                raise DatasetError(f"{where}: 'text' must be a string")
            label = _label(rec.get("label"), where, None)
            reasoning = _opt_str(rec.get("reasoning"))
            target = _opt_str(rec.get("target"))
            if target is not None and reasoning is None:
                reasoning, target_label = _split_target(target, where)
                if label is None:
                    label = target_label
                elif target_label != label:
                    raise DatasetError(f"{where}: target says {target_label!r} but label is {label!r}")
            answer = _opt_str(rec.get("answer"))
            clean = _strip_placeholders(text)
            turns = (("user", clean), ("assistant", answer.strip())) if answer else ()
            yield TrainRecord(
                id=str(rec.get("id", f"{file.name}:{n}")),
                images=tuple(resolve_inside(root, p, where=where) for p in paths),
                text=clean,
                label=label,
                category=_opt_str(rec.get("category")),
                sub_category=_opt_str(rec.get("sub_category")),
                response=rec.get("response") if isinstance(rec.get("response"), str) else None,
                reasoning=reasoning,
                turns=turns,
            )


_VERDICT_LINE = re.compile(r"^verdict:\s*(?P<word>\w+)\s*$", re.IGNORECASE | re.MULTILINE)


def _split_target(target: str, where: str) -> tuple[str | None, Label]:
    matches = list(_VERDICT_LINE.finditer(target))
    if not matches:
        raise DatasetError(f"{where}: 'target' has no 'Verdict: safe|unsafe' line")
    last = matches[-1]
    label = _label(last.group("word"), where, None)
    assert label is not None
    return (target[: last.start()].strip() or None), label


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
