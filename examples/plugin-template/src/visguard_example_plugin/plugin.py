"""The module named by the ``visguard`` entry point: hook implementations only, cheap to import."""

from __future__ import annotations

from typing import Any

from visguard import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    """Called whenever visguard looks a format up (``Guard.from_pretrained(..., format="oneword")``)."""
    from visguard_example_plugin.format import OneWordFormat

    register("oneword", OneWordFormat)


@hookimpl
def register_benchmarks(register: Any) -> None:
    """Called whenever visguard looks a benchmark up (``visguard eval -B csv``)."""
    from visguard_example_plugin.benchmark import CsvBenchmark

    register("csv", CsvBenchmark)
