"""Hold a virtual environment to the constraints file it was installed with.

    python scripts/check_constraints.py constraints.txt          # exit 1 if the venv differs from the file
    python scripts/check_constraints.py --diff constraints.txt   # print the differences, exit 1 if any
    python scripts/check_constraints.py --write constraints.txt  # write the venv's versions into the file

Run with the venv's own interpreter. Distributions installed from this repository (editable
installs: visguard and its plugins) are not pinned. ``make install`` runs the check after installing,
so a dependency that a new plugin or extra brings in unpinned fails the install instead of drifting
on the next fresh machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# Exact versions the test suite and the demo were run with (make install / make test / make demo / .ci/run).
# pyproject.toml keeps ranges; this file makes a fresh machine install what was tested.
# Regenerate after testing a new set: make constraints (see README, 'Pinned installs').
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, tuple[str, str]]:
    """Normalised name -> (name, version) of every distribution not installed from a local tree."""
    out: dict[str, tuple[str, str]] = {}
    local = {"pip", "setuptools", "wheel"}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        direct = dist.read_text("direct_url.json")
        if direct and json.loads(direct).get("dir_info", {}).get("editable"):
            local.add(_norm(name))  # its source tree's egg-info may be listed too
        out[_norm(name)] = (name, dist.version)
    return {key: nv for key, nv in out.items() if key not in local}


def pinned(path: Path) -> dict[str, str]:
    """Normalised name -> version of each ``name==version`` line of a constraints file."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m is None:
            raise SystemExit(f"{path}:{n}: not a 'name==version' line: {line!r}")
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def differences(path: Path) -> list[str]:
    have, pins = installed(), pinned(path)
    out = []
    for key, (name, version) in sorted(have.items()):
        if key not in pins:
            out.append(f"{name}=={version} is installed but not pinned in {path}")
        elif pins[key] != version:
            out.append(f"{name}=={version} is installed; {path} pins {pins[key]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("constraints", type=Path)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write the venv's versions into the file")
    action.add_argument("--diff", action="store_true", help="print the differences (informational)")
    args = parser.parse_args(argv)
    if args.write:
        lines = [f"{name}=={version}" for name, version in sorted(installed().values(), key=lambda nv: _norm(nv[0]))]
        header = HEADER
        if args.constraints.exists():  # keep the file's own leading comment
            old = args.constraints.read_text().splitlines()
            kept = [line for line in old[: next((i for i, x in enumerate(old) if not x.startswith("#")), len(old))]]
            header = "\n".join(kept) + "\n" if kept else HEADER
        args.constraints.write_text(header + "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} pins to {args.constraints}")
        return 0
    diff = differences(args.constraints)
    for line in diff:
        print(line, file=sys.stdout if args.diff else sys.stderr)
    if diff and not args.diff:
        print(f"{len(diff)} difference(s) from {args.constraints}: pin them (make constraints) or fix the install",
              file=sys.stderr)
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
