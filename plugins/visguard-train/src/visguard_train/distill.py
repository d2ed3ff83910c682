"""Distilled fast verdicts: a teacher guard's reason-mode verdicts become the fast examples' labels.

A reasoning guard (the ``mirage`` format, or ``visguard`` in reason mode) decides well after it has
written its perception and reasoning, and its fast mode (one forward pass, no text written) is only
as good as what it was trained on. ``visguard train --distill TEACHER`` runs ``TEACHER`` (a guard
directory or hub id; ``self``: the ``--base`` model, which must then already be a reasoning guard,
for example the output of an earlier ``--objective mirage`` run) in **reason** mode over every
training record, and trains the fast verdict examples on the teacher's verdicts, while every other
example (the answers, the follow-up verdicts, reason examples) keeps the record's own data: both
objectives in one run, so the student keeps reasoning and learns to give the same verdict at once.

Fail closed: a record whose teacher verdict is ``unavailable`` gives no fast example (it is never
guessed). The verdicts, with the teacher's P(unsafe), are written to ``OUTPUT/distill_labels.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError
from visguard_train.data import Label, TrainRecord

LABELS_FILE = "distill_labels.jsonl"
#: time limit of one teacher call (8 reason checks); past it those records get no fast example
TEACHER_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class TeacherVerdict:
    """The teacher's reason-mode verdict on one record (``label`` ``None``: unavailable)."""

    id: str
    label: Label | None
    p_unsafe: float | None
    gold: Label | None
    error: str | None = None


def teacher_path(distill: str, base: str) -> str:
    """The teacher model: ``base`` for ``self``, else ``distill`` itself."""
    return base if distill == "self" else distill


def load_teacher(distill: str, base: str, *, device: str = "auto") -> Any:
    """The teacher as a :class:`visguard.Guard`, in the format its checkpoint names.

    Raises:
        InputError: the teacher cannot be loaded or cannot reason (one line naming it).
    """
    from visguard.core.errors import BackendError, PluginError
    from visguard.engine.guard import Guard

    path = teacher_path(distill, base)
    try:
        guard = Guard.from_pretrained(path, device=device)
    except (BackendError, PluginError, OSError, ValueError) as exc:
        raise InputError(f"--distill: cannot load the teacher guard {path!r}: {exc}") from exc
    if "reason" not in guard.capabilities.modes:
        guard.close()
        raise InputError(f"--distill: the teacher's format {guard.format.name!r} has no reason mode to learn from")
    # offline labelling, 8 reason checks a call: the serving default (60 s a call) would turn a slow
    # CPU batch into unavailable verdicts, i.e. records without a fast example
    return guard.with_policy(timeout_s=TEACHER_TIMEOUT_S)


def teacher_verdicts(
    guard: Any, records: Sequence[TrainRecord], *, batch_size: int = 8, progress: bool = False,
) -> list[TeacherVerdict]:
    """Run ``guard`` in reason mode over ``records`` (a pre-check, or a post-check where a record has a response).

    ``progress``: a tqdm bar on stderr (records labelled), since a reasoning teacher writes an answer per record.
    """
    from tqdm.auto import tqdm

    from visguard.core.types import GuardRequest

    out: list[TeacherVerdict] = []
    with tqdm(total=len(records), desc="teacher verdicts (reason mode)", unit="record", disable=not progress,
              dynamic_ncols=True) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            requests = [GuardRequest.build(list(r.images), r.text, r.response, limits=guard.policy.limits) for r in chunk]
            for rec, v in zip(chunk, guard.report_batch(requests, mode="reason"), strict=True):
                label = v.label if v.label in ("safe", "unsafe") else None
                out.append(TeacherVerdict(rec.id, label, v.score, rec.label, None if label else (v.error or v.label)))
            bar.update(len(chunk))
    return out


def write_labels(path: Path, verdicts: Sequence[TeacherVerdict]) -> dict[str, Any]:
    """Write one JSON line per record and return a summary (how many, agreement with the gold labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for v in verdicts:
            fh.write(json.dumps({"id": v.id, "teacher_label": v.label, "teacher_p_unsafe": v.p_unsafe,
                                 "label": v.gold, "error": v.error}) + "\n")
    both = [v for v in verdicts if v.label is not None and v.gold is not None]
    return {"records": len(verdicts), "unavailable": sum(v.label is None for v in verdicts),
            "teacher_unsafe": sum(v.label == "unsafe" for v in verdicts),
            "agreement_with_labels": round(sum(v.label == v.gold for v in both) / len(both), 4) if both else None}


def distilled_fast_labels(
    distill: str, base: str, records: Sequence[TrainRecord], output: Path, *, device: str = "auto", guard: Any = None,
    write: bool = True,
) -> list[Label | None]:
    """The fast examples' labels, one per record, from the teacher's reason mode (see the module doc).

    ``write``: write ``OUTPUT/distill_labels.jsonl`` and print the summary (rank 0 of a multi-process run).
    """
    teacher = guard if guard is not None else load_teacher(distill, base, device=device)
    try:
        verdicts = teacher_verdicts(teacher, records, progress=write)
    finally:
        if guard is None:
            teacher.close()
    if not write:
        return [v.label for v in verdicts]
    summary = write_labels(output / LABELS_FILE, verdicts)
    print(f"visguard train: --distill {distill}: teacher verdicts on {summary['records']} records "
          f"({summary['unavailable']} unavailable, {summary['teacher_unsafe']} unsafe, "
          f"agreement with the labels {summary['agreement_with_labels']}); written to {output / LABELS_FILE}")
    return [v.label for v in verdicts]
