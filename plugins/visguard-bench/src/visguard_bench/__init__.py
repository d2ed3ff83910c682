"""visguard-bench: latency benchmarking of visguard guards (``visguard bench``, the pytest-benchmark suite, scripts).

- :mod:`visguard_bench.latency`: :class:`LatencyBench` (every measurement, in one process), the
  sizes, :func:`torch_threads` (the only place a run changes torch's thread count, restored after).
- :mod:`visguard_bench.report`: the report as a table, Markdown tables or a scaling plot.
- :mod:`visguard_bench.cli`: the ``visguard bench`` command, added by :mod:`visguard_bench.plugin`.
"""

from __future__ import annotations

from visguard_bench.latency import RATIO_KEYS, SIZES, LatencyBench, torch_threads

__all__ = ["RATIO_KEYS", "SIZES", "LatencyBench", "torch_threads"]
