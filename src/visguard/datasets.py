"""The dataset layer: one record type, and one reader and one writer per on-disk layout.

Layouts (docs/eval.md, docs/training.md):

- **MIS test** (``mis_<split>.json``): ``question``, ``image_path1``, ``image_path2`` ...,
  ``category``, ``sub_category``, optional ``id`` and ``label`` (default ``unsafe``).
- **MIS train** (``mis_train.json``): ShareGPT-like ``image``/``images`` + ``conversations``
  (``from``/``value``) or ``messages`` (``role``/``content``), ``category``, ``sub_category``,
  optional ``id`` and ``label`` (default ``unsafe``).
- **visguard JSONL**: one object per line, ``images``, ``text``, ``label``, optional ``id``,
  ``category``, ``sub_category``, ``split``, ``response`` (makes it a post-check), ``target``
  (the guard's reason-mode output, read back with the format's own ``parse``) or ``reasoning``,
  and ``answer`` (a host answer, for response training).

Every reader resolves image paths inside the data file's folder (:func:`visguard.core.paths.resolve_inside`)
and raises :class:`DatasetError` naming the file, the item and the field. The benchmark loaders
(``visguard eval``), the training plugin and the test fixtures (``visguard_testing.synthetic``) all
go through these functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from visguard.core.errors import InputError
from visguard.core.paths import resolve_inside

if TYPE_CHECKING:  # pragma: no cover
    from visguard.engine.format import GuardFormat

#: the one label type of labelled data (the guard's verdicts add ``unavailable``)
Label = Literal["safe", "unsafe"]

#: the format whose output grammar JSONL ``target`` fields are written in (docs/training.md): the
#: one resolver's default (:data:`visguard.plugins.DEFAULT_FORMAT`, read through :func:`visguard.plugins.resolve_format`)
TARGET_FORMAT = "visguard"

#: image suffixes tried when a layout's listed file is missing (some releases re-encoded images)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")

_PLACEHOLDER = "<image>"


class DatasetError(InputError):
    """A data file or folder does not have the expected layout (missing file, field or image)."""


@dataclass(frozen=True)
class Record:
    """One item of a dataset, whatever layout it came from.

    Attributes:
        id: the item's id (the layout's own, else ``"<file>:<index>"``).
        images: image files inside the dataset root, in prompt order.
        text: the user's request (``<image>`` placeholders removed).
        label: ``safe`` / ``unsafe``, ``None`` where the layout has none.
        category / sub_category: the harm category of an unsafe item.
        response: a host model's answer: makes the guard example a post-check.
        reasoning: the guard's text before its verdict line, already in the format's grammar
            (from a JSONL ``target`` or ``reasoning``).
        rationale: free-prose reasoning (a MIRage answer) that a format turns into its own
            reasoning text (a trainable format's ``reasoning_text``, e.g.
            :meth:`visguard.default_plugins.visguard_format.VisguardFormat.reasoning_text`).
        turns: the conversation as ``(role, text)`` pairs (``user`` / ``assistant``).
        split: the split the item belongs to (``""`` when the layout has none).
        extra: layout-specific fields kept for reports (JSON-serialisable).
    """

    id: str
    images: tuple[Path, ...]
    text: str
    label: Label | None = None
    category: str | None = None
    sub_category: str | None = None
    response: str | None = None
    reasoning: str | None = None
    rationale: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    split: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- field helpers


def read_json(path: Path, *, what: str = "") -> Any:
    """Parse a JSON file, raising :class:`DatasetError` naming the file on failure."""
    prefix = f"{what}: " if what else ""
    if not path.is_file():
        raise DatasetError(f"{prefix}expected file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{prefix}cannot parse {path}: {exc}") from exc


def field_of(record: Any, key: str, *, where: str, types: type | tuple[type, ...] = str, required: bool = True) -> Any:
    """``record[key]`` checked for presence and type; ``None`` when optional and absent.

    Raises:
        DatasetError: ``record`` is not an object, or the field is missing or of the wrong type.
    """
    if not isinstance(record, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record or record[key] is None:
        if required:
            raise DatasetError(f"{where}: missing field {key!r} (has {sorted(record)})")
        return None
    value = record[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DatasetError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def optional_text(record: Any, key: str, *, where: str) -> str | None:
    """An optional text field (numbers accepted as text); ``None`` when absent or blank."""
    value = field_of(record, key, where=where, types=(str, int, float), required=False)
    return None if value is None or isinstance(value, bool) or str(value).strip() == "" else str(value)


def parse_label(value: Any, *, where: str, default: Label | None = "unsafe") -> Label | None:
    """Parse an optional ``label`` field (``"safe"`` / ``"unsafe"``, any case).

    Raises:
        DatasetError: any other value.
    """
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() in ("safe", "unsafe"):
        return "safe" if value.strip().lower() == "safe" else "unsafe"
    raise DatasetError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {value!r}")


def resolve_under(root: Path, rel: Any, *, what: str, fallback_suffixes: bool = False) -> Path:
    """Resolve a data file's relative image path inside ``root`` (:func:`visguard.core.paths.resolve_inside`).

    Raises:
        DatasetError: not a relative path, escaping ``root``, or missing.
    """
    suffixes = IMAGE_SUFFIXES if fallback_suffixes else ()
    return resolve_inside(root, rel, where=what, error=DatasetError, fallback_suffixes=suffixes)


def strip_placeholders(text: str) -> str:
    """``text`` without ``<image>`` placeholders (any case) and the blank space after them."""
    import re

    return re.sub(r"<image>\s*", "", text, flags=re.IGNORECASE).strip()


def _json_list(path: Path) -> list[Any]:
    data = read_json(path)
    if isinstance(data, Mapping):  # {"data": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise DatasetError(f"{path.name} must hold a JSON list of items, got {type(data).__name__}")
    return data


def _paths(value: Any, where: str, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise DatasetError(f"{where}: field {key!r} must be a list of paths")
    return value


def _default_id(file: Path) -> Callable[[Any, int], str]:
    return lambda raw, i: str(raw) if raw is not None else f"{file.name}:{i}"


def _relative(root: Path, path: Path | str) -> str:
    p = Path(path)
    return (p.relative_to(root) if p.is_absolute() else p).as_posix()


# ---------------------------------------------------------------------------------- MIS test


def read_mis_test(file: Path, *, split: str = "", make_id: Callable[[Any, int], str] | None = None) -> list[Record]:
    """Read one ``mis_<split>.json`` (images relative to its folder).

    Args:
        file: the split file.
        split: recorded on every record.
        make_id: ``(the item's id or None, index) -> id`` (default: the id, else ``"<file>:<index>"``).

    Raises:
        DatasetError: missing file, field or image, a bad label, or a path leaving the folder.
    """
    make_id = make_id or _default_id(file)
    root = file.parent
    out = []
    for i, rec in enumerate(_json_list(file)):
        where = f"{file.name} item {i}"
        question = field_of(rec, "question", where=where)
        keys = sorted((k for k in rec if _image_key(k)), key=lambda k: int(k[len("image_path"):]))
        if not keys:
            raise DatasetError(f"{where}: missing field 'image_path1' (has {sorted(rec)})")
        out.append(Record(
            id=make_id(rec.get("id"), i),
            images=tuple(resolve_under(root, rec[k], what=f"{where} {k}") for k in keys),
            text=strip_placeholders(question),
            label=parse_label(rec.get("label"), where=where),
            category=optional_text(rec, "category", where=where),
            sub_category=optional_text(rec, "sub_category", where=where),
            split=split,
            extra={"index": i},
        ))
    return out


def _image_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("image_path") and key[len("image_path"):].isdigit()


def write_mis_test(root: Path, split: str, records: Iterable[Record]) -> Path:
    """Write ``root/mis_<split>.json`` (images must already lie under ``root``; paths written relative)."""
    rows = []
    for rec in records:
        row: dict[str, Any] = {"id": rec.id, "question": rec.text, "category": rec.category, "sub_category": rec.sub_category}
        row.update({f"image_path{k}": _relative(root, p) for k, p in enumerate(rec.images, 1)})
        row["label"] = rec.label
        rows.append(row)
    path = root / f"mis_{split}.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- MIS train

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_mis_train(file: Path, *, make_id: Callable[[Any, int], str] | None = None) -> list[Record]:
    """Read ``mis_train.json``: the first user turn is the text, the first answer the rationale.

    Raises:
        DatasetError: missing or malformed fields, images or conversations.
    """
    make_id = make_id or _default_id(file)
    out = []
    for i, rec in enumerate(_json_list(file)):
        where = f"{file.name} item {i}"
        if not isinstance(rec, Mapping):
            raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        key = "image" if "image" in rec else "images"
        turns = _turns(rec.get("conversations", rec.get("messages")), where)
        answer = next((t for r, t in turns if r == "assistant"), "")
        out.append(Record(
            id=make_id(rec.get("id"), i),
            images=tuple(resolve_under(file.parent, p, what=f"{where} {key}") for p in _paths(rec.get(key), where, key)),
            text=next((t for r, t in turns if r == "user"), ""),
            label=parse_label(rec.get("label"), where=where),
            category=optional_text(rec, "category", where=where),
            sub_category=optional_text(rec, "sub_category", where=where),
            rationale=" ".join(answer.split()) or None,
            turns=turns,
        ))
    return out


def _turns(convo: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(convo, list) or not convo:
        raise DatasetError(f"{where}: 'conversations'/'messages' must be a non-empty list of turns")
    out = []
    for turn in convo:
        if not isinstance(turn, Mapping):
            raise DatasetError(f"{where}: each turn must be an object")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if isinstance(text, list):  # [{"type": "text", "text": ...}, {"type": "image"}]
            text = "".join(p.get("text", "") for p in text if isinstance(p, Mapping))
        if who not in _ROLES or not isinstance(text, str):
            raise DatasetError(f"{where}: a turn needs 'from'/'role' (human|gpt|user|assistant) and a text value")
        role = _ROLES[who]
        if role != "system":
            out.append((role, strip_placeholders(text) if role == "user" else text.strip()))
    if not any(r == "assistant" for r, _ in out):
        raise DatasetError(f"{where}: the conversation has no assistant (gpt) turn")
    return tuple(out)


def write_mis_train(root: Path, records: Iterable[Record], name: str = "mis_train.json") -> Path:
    """Write ``root/mis_train.json``: ``<image>`` placeholders, then the text, as the human turn; each
    record's first assistant turn as the answer."""
    rows = []
    for rec in records:
        answer = next((t for r, t in rec.turns if r == "assistant"), rec.rationale or "")
        rows.append({
            "id": rec.id,
            "image": [_relative(root, p) for p in rec.images],
            "conversations": [
                {"from": "human", "value": f"{_PLACEHOLDER}\n" * len(rec.images) + rec.text},
                {"from": "gpt", "value": answer},
            ],
            "category": rec.category,
            "sub_category": rec.sub_category,
            "label": rec.label,
        })
    path = root / name
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- visguard JSONL


def _target_format(fmt: GuardFormat | None) -> GuardFormat:
    if fmt is not None:
        return fmt
    from visguard import plugins

    return plugins.resolve_format(None, TARGET_FORMAT)


def read_jsonl(file: Path, *, target_format: GuardFormat | None = None,
               make_id: Callable[[Any, int], str] | None = None) -> list[Record]:
    """Read a visguard JSONL file (images relative to its folder).

    A ``target`` is read with the format's own :meth:`~visguard.engine.format.GuardFormat.parse` (default
    :data:`TARGET_FORMAT`): its reasoning becomes :attr:`Record.reasoning`, and its verdict the
    label (or must agree with ``label``).

    Raises:
        DatasetError: unreadable lines, malformed fields, images outside the folder, or a target
            without a verdict or disagreeing with ``label``.
    """
    from visguard.core.policy import Policy

    make_id = make_id or _default_id(file)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {file}: {exc}") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file.name} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON ({exc})") from exc
        key = "images" if "images" in rec or "image" not in rec else "image"
        text = field_of(rec, "text", where=where, required=False) or ""
        label = parse_label(rec.get("label"), where=where, default=None)
        reasoning = optional_text(rec, "reasoning", where=where)
        target = optional_text(rec, "target", where=where)
        if target is not None and reasoning is None:
            parsed = _target_format(target_format).parse(target, Policy())
            if parsed.label is None:
                raise DatasetError(f"{where}: 'target' has no verdict: {parsed.error}")
            if label is not None and parsed.label != label:
                raise DatasetError(f"{where}: target says {parsed.label!r} but label is {label!r}")
            label, reasoning = parsed.label, parsed.reasoning
        answer = optional_text(rec, "answer", where=where)
        clean = strip_placeholders(text)
        out.append(Record(
            id=make_id(rec.get("id"), n),
            images=tuple(resolve_under(file.parent, p, what=f"{where} {key}[{k}]")
                         for k, p in enumerate(_paths(rec.get(key), where, key))),
            text=clean,
            label=label,
            category=optional_text(rec, "category", where=where),
            sub_category=optional_text(rec, "sub_category", where=where),
            response=field_of(rec, "response", where=where, required=False),
            reasoning=reasoning,
            turns=(("user", clean), ("assistant", answer.strip())) if answer else (),
            split=str(rec.get("split") or ""),
        ))
    return out


def write_jsonl(path: Path, records: Iterable[Record], *, target_format: GuardFormat | None = None) -> Path:
    """Write records as visguard JSONL (image paths relative to the file's folder).

    Each line is ``{"id", "images", "text", "label", "category", "sub_category", "response",
    "target"}``; ``target`` is the format's own reason-mode ``target`` (a trainable format's, e.g.
    :meth:`~visguard.default_plugins.visguard_format.VisguardFormat.target`)
    for the record (``null`` for unlabelled records).
    """
    from visguard.core.policy import Policy
    from visguard.core.types import GuardRequest

    fmt: Any = _target_format(target_format)  # its training hooks (target): not on the runtime GuardFormat
    policy = Policy()
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            target = None
            if rec.label is not None:
                target = fmt.target(GuardRequest(), policy, label=rec.label, mode="reason", category=rec.category,
                                    sub_category=rec.sub_category, reasoning=reasoning_of(fmt, rec))
            row = {"id": rec.id, "images": [_relative(path.parent, p) for p in rec.images], "text": rec.text,
                   "label": rec.label, "category": rec.category, "sub_category": rec.sub_category,
                   "response": rec.response, "target": target}
            fh.write(json.dumps(row) + "\n")
    return path


def reasoning_of(fmt: Any, record: Record) -> str | None:
    """A record's reasoning in ``fmt``'s grammar: its own, else ``fmt`` phrasing its rationale."""
    if record.reasoning:
        return record.reasoning
    return fmt.reasoning_text(record.rationale) if record.rationale else None


def unique_ids(records: Sequence[Record], where: str) -> None:
    """Raise :class:`DatasetError` if two records share an id."""
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise DatasetError(f"{where}: duplicate item id {rec.id!r}")
        seen.add(rec.id)
