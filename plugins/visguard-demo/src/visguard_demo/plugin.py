"""visguard plugin entry point: adds ``visguard demo`` through the ``register_commands`` hook."""

from __future__ import annotations

from typing import Any

from visguard.hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``visguard demo`` to the root CLI group."""
    from visguard_demo.cli import demo

    cli.add_command(demo)
