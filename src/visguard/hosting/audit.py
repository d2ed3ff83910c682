"""Audit log: one JSON line per guard decision, safe to share between threads and asyncio tasks.

A record says when a check ran, at which stage, what the guard decided (label, P(unsafe),
category, error), how long it took, what was done about it, which images were involved, by
their SHA-256 only, and, for a cascade, every stage guard's verdict (``stages``). Raw pixels and image bytes are never written; user text and host answers are
not written either.

Every record is written and flushed under one lock, so concurrent writers never interleave or
lose lines, and a crash loses at most the record being written.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from visguard.core.images import GuardImage
from visguard.core.redact import redact_fields
from visguard.core.types import Verdict

#: keys every record has (see :meth:`AuditLog.record_verdict`)
RECORD_KEYS = (
    "time",
    "request_id",
    "stage",
    "partial",
    "label",
    "score",
    "category",
    "sub_category",
    "error",
    "action",
    "latency_ms",
    "mode",
    "guard_model",
    "host_model",
    "images",
    "stages",
)


class AuditLog:
    """Append-only JSONL audit log.

    Args:
        path: the file to append to (created with its parent folder if missing).

    Example::

        with AuditLog("audit.jsonl") as log:
            guarded = guard.wrap(host, audit=log)
            guarded.generate(images, text)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line and flush it.

        Raises:
            ValueError: the log is closed.
            OSError: the line could not be written (a lost record is never silent).
        """
        line = json.dumps(redact_fields(record), ensure_ascii=False, allow_nan=False, default=str) + "\n"
        with self._lock:
            if self._file is None:
                raise ValueError(f"audit log {self.path} is closed")
            self._file.write(line)
            self._file.flush()

    def record_verdict(
        self,
        verdict: Verdict,
        *,
        request_id: str,
        images: Iterable[GuardImage | str],
        action: str,
        partial: bool = False,
        host_model: str | None = None,
    ) -> dict[str, Any]:
        """Write the record of one check and return it.

        Args:
            verdict: the guard's verdict.
            request_id: identifies the guarded call (a call's pre- and post-checks share it).
            images: the request's images (only their SHA-256 is written) or the digests themselves.
            action: what the caller did with the verdict: ``pass``, ``degraded`` (unavailable but
                allowed), ``block``, ``flag`` (not safe, returned to the caller) or ``raise``.
            partial: a streaming check of a partial answer.
            host_model: the host model's id, if a host is guarded.
        """
        score = verdict.score
        record = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "request_id": request_id,
            "stage": verdict.stage,
            "partial": partial,
            "label": verdict.label,
            "score": None if score is None or score != score else float(score),
            "category": verdict.category,
            "sub_category": verdict.sub_category,
            "error": verdict.error,
            "action": action,
            "latency_ms": round(float(verdict.latency_ms), 3),
            "mode": verdict.mode,
            "guard_model": verdict.model,
            "host_model": host_model,
            "images": [img.sha256 if isinstance(img, GuardImage) else str(img) for img in images],
            # a cascade's every stage guard's verdict (empty for a single guard), not just the deciding one
            "stages": [_stage_record(s) for s in verdict.stages],
        }
        if verdict.attribution is not None:  # an explained check (Policy(explain=True)): its subsets' scores
            record["attribution"] = verdict.attribution.model_dump(mode="json")
        self.write(record)
        return record

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """All records of an audit file, in order."""
        return list(iter_records(path))

    def close(self) -> None:
        """Close the file (later writes raise)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"


def _stage_record(verdict: Verdict) -> dict[str, Any]:
    score = verdict.score
    return {"guard_model": verdict.model, "label": verdict.label,
            "score": None if score is None or score != score else float(score),
            "category": verdict.category, "error": verdict.error, "mode": verdict.mode,
            "latency_ms": round(float(verdict.latency_ms), 3)}


def iter_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
