"""visguard plugin entry point: the ``bench`` command.

Loaded through the ``visguard`` entry-point group; the core does not know this package. The hook
only registers the command: torch, transformers and the test-fixture models load when a run starts.
"""

from __future__ import annotations

from typing import Any

from visguard.hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``visguard bench`` to the root CLI group."""
    from visguard_bench.cli import bench

    cli.add_command(bench)
