"""Crash-safe result streaming: one JSONL line per item, resumable, never duplicated.

Each row is written with a single ``write`` to a file opened in append mode, then flushed and
fsynced, so after a crash (even ``SIGKILL``) the file holds every finished row plus, at worst, one
torn last line. Re-opening the store drops a torn last line, remembers which item ids are done
and lets the runner skip them: rerunning the same command resumes without losing or duplicating
an item. ``run.json`` records the settings that produced the rows; resuming with different
settings is refused instead of silently mixing two runs. A lock file stops two processes from
writing the same directory at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError
from visguard.core.redact import redact_errors, redact_fields

try:  # POSIX advisory locks; elsewhere the lock is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

RESULTS_FILE = "results.jsonl"
META_FILE = "run.json"
LOCK_FILE = ".lock"


class ResumeError(InputError):
    """An output directory cannot be resumed (another run's results, corrupt rows, or in use)."""


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_rows(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a results file, first occurrence of each id kept, a torn last line ignored.

    Args:
        path: the JSONL file (missing: no rows).
        repair: truncate a torn last line from the file (and end a complete one with a newline).

    Raises:
        ResumeError: a line other than the last is not a JSON object with an ``id``.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # bytes after the last newline: b"" when the file ends cleanly
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            raise ResumeError(f"{path} line {number} is not a result row; the file is corrupt (move it away to restart)")
        if row["id"] not in seen:
            seen.add(row["id"])
            rows.append(row)
    if tail.strip():
        row = _parse(tail)
        keep = row is not None
        if row is not None and row["id"] not in seen:
            seen.add(row["id"])
            rows.append(row)
        if repair:
            with path.open("r+b") as fh:
                if keep:
                    fh.seek(0, os.SEEK_END)
                    fh.write(b"\n")
                else:
                    fh.truncate(len(data) - len(tail))
                fh.flush()
                os.fsync(fh.fileno())
    return rows


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("id"), str) else None


class ResultStore:
    """Append-only JSONL results of one evaluation run, keyed by item id.

    Use as a context manager::

        with ResultStore(out_dir, meta={...}) as store:
            for item in items:
                if item.id not in store.done:
                    store.append({"id": item.id, ...})

    Args:
        out_dir: the run's output directory (created).
        meta: settings that must match to resume (benchmark, model, mode, judge ...).
        restart: discard earlier results in ``out_dir`` instead of resuming.

    Raises:
        ResumeError: ``out_dir`` holds results of a run with other settings, a corrupt row, or is
            in use by another process.
    """

    def __init__(self, out_dir: str | Path, *, meta: Mapping[str, Any], restart: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.meta = redact_fields(dict(meta))  # as written to run.json, so a resume compares like with like
        self.restart = restart
        self.path = self.out_dir / RESULTS_FILE
        self.rows: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.resumed = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Lock the directory, check ``run.json``, load finished rows and open for appending."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            meta_path = self.out_dir / META_FILE
            if self.restart:
                for name in (RESULTS_FILE, META_FILE, "summary.json", "report.md"):
                    (self.out_dir / name).unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "plots", ignore_errors=True)
            if meta_path.exists() and self.path.exists():
                try:
                    old = json.loads(meta_path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as exc:
                    raise ResumeError(f"cannot read {meta_path}: {exc}") from exc
                diff = {k: (old.get(k), v) for k, v in self.meta.items() if old.get(k) != v}
                if diff:
                    shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in sorted(diff.items()))
                    raise ResumeError(
                        f"{self.out_dir} holds results of a different run ({shown}); "
                        "use another --out directory, or --restart to discard them"
                    )
            self.rows = read_rows(self.path, repair=True)
            self.done = {r["id"] for r in self.rows}
            self.resumed = len(self.rows)
            write_atomic(meta_path, json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._unlock()
            raise

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row durably (one write, flush, fsync). A row whose id is done is ignored."""
        if self._fd is None:
            raise RuntimeError("ResultStore is not open")
        rid = row.get("id")
        if not isinstance(rid, str):
            raise ValueError("a result row needs a string 'id'")
        if rid in self.done:
            return
        # error texts may quote URLs with credentials; the item's data (id, question, answer) is kept
        # exactly as given, so a rerun finds the same ids and resumes instead of running them again
        row = redact_errors(dict(row))
        data = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.rows.append(dict(row))
        self.done.add(rid)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unlock()

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ResumeError(f"{self.out_dir} is in use by another visguard eval process") from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            if fcntl is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
