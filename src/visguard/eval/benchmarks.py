"""Benchmark base types: the common evaluation item, the loader interface, and layout helpers.

A benchmark plugin reads a local copy of a public benchmark in its *published* layout and turns it
into :class:`EvalItem` objects. Loaders never download anything. Every image path is resolved under
the dataset root and refused if it would escape it (``..``, absolute paths, symlinks pointing out).
Wrong paths or layouts raise :class:`BenchmarkLayoutError` naming the missing file or field.
"""

from __future__ import annotations

import csv
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visguard.errors import InputError
from visguard.paths import resolve_inside

GoldLabel = Literal["safe", "unsafe"]

#: image suffixes tried when a layout's listed file is missing (some releases re-encoded images)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


class BenchmarkLayoutError(InputError):
    """A benchmark directory does not have the expected layout (missing file, field or image)."""


@dataclass(frozen=True)
class EvalItem:
    """One labelled evaluation item, whatever benchmark it comes from.

    Attributes:
        id: unique id within a benchmark (``"<split>/<the benchmark's own id or index>"``).
        images: image files, resolved under the dataset root, in prompt order.
        text: the text sent with the images (to the guard, or to the host VLM).
        label: gold label of the *request*: ``unsafe`` (should be blocked / refused) or ``safe``.
        category / sub_category: the benchmark's harm category, when it has one.
        split: the benchmark split the item belongs to.
        extra: benchmark-specific fields kept for reports (JSON-serialisable).
    """

    id: str
    images: tuple[Path, ...]
    text: str
    label: GoldLabel = "unsafe"
    category: str | None = None
    sub_category: str | None = None
    split: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in ("safe", "unsafe"):
            raise InputError(f"item {self.id!r}: label must be 'safe' or 'unsafe', got {self.label!r}")

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


class Benchmark(ABC):
    """Base class of benchmark loaders (register subclasses through ``register_benchmarks``).

    The registered factory is called without arguments; :meth:`load` then reads a dataset root.

    Attributes:
        name: registry name.
        title: human-readable name for reports.
        splits: the splits this loader knows, in their published names.
        layout: one-paragraph description of the expected layout (shown in errors and docs).
        metrics: which model-evaluation metrics are the benchmark's own (see
            :func:`visguard.eval.metrics.model_metrics`): any of ``"mis"`` (ASR/RSR/RR/HR),
            ``"asr"``, ``"refusal"``, ``"safe_rate"``, ``"mss"``.
    """

    name: str = ""
    title: str = ""
    splits: tuple[str, ...] = ()
    layout: str = ""
    metrics: tuple[str, ...] = ("asr", "refusal")

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


def check_unique_ids(items: Sequence[EvalItem], where: str) -> None:
    """Raise :class:`BenchmarkLayoutError` if two items share an id."""
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise BenchmarkLayoutError(f"{where}: duplicate item id {it.id!r}")
        seen.add(it.id)


def resolve_under(root: Path, rel: Any, *, what: str, fallback_suffixes: bool = False) -> Path:
    """Resolve a layout's relative image path inside ``root``.

    Args:
        root: the (resolved) directory the path is relative to.
        rel: the path as written in the benchmark file.
        what: where the path came from, for error messages (``"mis_hard.json item 3 image_path1"``).
        fallback_suffixes: if the file is missing, try the same stem with other image suffixes.

    Raises:
        BenchmarkLayoutError: the value is not a relative path, escapes ``root`` or does not exist.
    """
    suffixes = IMAGE_SUFFIXES if fallback_suffixes else ()
    return resolve_inside(root, rel, where=what, error=BenchmarkLayoutError, fallback_suffixes=suffixes)


def read_json(path: Path, *, benchmark: str) -> Any:
    """Parse a JSON file, raising :class:`BenchmarkLayoutError` naming the file on failure."""
    if not path.is_file():
        raise BenchmarkLayoutError(f"{benchmark}: expected file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchmarkLayoutError(f"{benchmark}: cannot parse {path}: {exc}") from exc


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


def field_of(record: Any, key: str, *, where: str, types: type | tuple[type, ...] = str, required: bool = True) -> Any:
    """``record[key]`` checked for presence and type; ``None`` when optional and absent.

    Raises:
        BenchmarkLayoutError: ``record`` is not an object, or the field is missing or of the wrong type.
    """
    if not isinstance(record, Mapping):
        raise BenchmarkLayoutError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record or record[key] is None:
        if required:
            raise BenchmarkLayoutError(f"{where}: missing field {key!r} (has {sorted(record)})")
        return None
    value = record[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise BenchmarkLayoutError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def gold_label(value: Any, *, where: str, default: GoldLabel = "unsafe") -> GoldLabel:
    """Parse an optional ``label`` field (``"safe"``/``"unsafe"``, any case)."""
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() in ("safe", "unsafe"):
        return "safe" if value.strip().lower() == "safe" else "unsafe"
    raise BenchmarkLayoutError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {value!r}")
