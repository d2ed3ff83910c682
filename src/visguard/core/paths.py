"""Dataset paths: the one place that resolves a data file's relative image path inside its root.

Used by every reader of on-disk datasets (benchmark loaders, training-data loaders), so a path in a
data file can never reach outside the dataset root: absolute paths, ``..`` and symlinks that lead
out are refused with a typed error naming where the path came from.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError


def resolve_inside(
    root: Path,
    rel: Any,
    *,
    where: str,
    error: type[InputError] = InputError,
    fallback_suffixes: Iterable[str] = (),
) -> Path:
    """Resolve ``rel`` (as written in a data file) to an existing file inside ``root``.

    Args:
        root: the dataset root the path is relative to.
        rel: the path value from the data file.
        where: where the value came from, for messages (``"mis_hard.json item 3 image_path1"``).
        error: the :class:`InputError` subclass to raise (each reader has its own).
        fallback_suffixes: if the file is missing, try the same stem with these suffixes.

    Raises:
        InputError (``error``): not a non-empty string, absolute, escaping ``root``, or missing.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise error(f"{where}: image path must be a non-empty string, got {rel!r}")
    candidate = Path(rel.strip().replace("\\", "/"))
    if candidate.is_absolute() or candidate.drive or (len(rel) > 2 and rel[1] == ":" and rel[2] in "\\/"):
        raise error(f"{where}: image path {rel!r} is absolute; it must be relative to the dataset root")
    base = root.resolve()
    path = (base / candidate).resolve()
    if not path.is_relative_to(base):
        raise error(f"{where}: image path {rel!r} escapes the dataset root {base}")
    if path.is_file():
        return path
    for suffix in fallback_suffixes:
        alt = path.with_suffix(suffix)
        if alt.is_file() and alt.resolve().is_relative_to(base):
            return alt.resolve()
    raise error(f"{where}: image file {base / candidate} does not exist")
