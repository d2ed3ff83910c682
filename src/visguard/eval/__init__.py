"""Evaluation: benchmark loaders, judges, metrics, crash-safe runners and reports.

Two kinds of evaluation:

- **guard evaluation** (:func:`evaluate_guard`): run a :class:`visguard.Guard` over labelled items
  and measure accuracy, precision, recall, F1, FPR, AUROC, AUPRC, latency and throughput;
- **model evaluation** (:func:`evaluate_model`): the MIS paper's protocol. Run a host VLM (bare
  or wrapped by a guard), judge each response, report ASR / RSR / RR / HR and benchmark rates.

Example::

    from visguard import Guard
    from visguard.eval import evaluate_guard, load_benchmark

    items = load_benchmark("mis", "data/mis_test", split="hard")
    summary = evaluate_guard(Guard.from_pretrained("Tuwhy/Qwen2-VL-7B-MIRage"), items, out_dir="runs/hard")
    print(summary.accuracy, summary.auroc, summary.latency_ms["p95"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visguard.eval.benchmarks import Benchmark, BenchmarkLayoutError, EvalItem
from visguard.eval.judges import Judge, JudgeCase, Judgment
from visguard.eval.runner import (
    Summary,
    evaluate_guard,
    evaluate_model,
    summarize_guard_rows,
    summarize_model_rows,
)
from visguard.eval.store import ResultStore, ResumeError, read_rows


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """The benchmark loader registered as ``name`` (``mis``, ``vlguard``, ``mm-safetybench`` ...).

    Raises:
        PluginError: no such benchmark (the message lists the installed ones).
    """
    from visguard import plugins

    return plugins.get("benchmarks", name)(**kwargs)


def load_benchmark(name: str, root: str | Path, split: str | None = None, *, limit: int | None = None) -> list[EvalItem]:
    """Items of benchmark ``name`` stored at ``root`` (one split, or all when ``split`` is ``None``)."""
    return get_benchmark(name).load(root, split, limit=limit)


def get_judge(name: str, **kwargs: Any) -> Judge:
    """The judge registered as ``name`` (``mis``, ``refusal``, ``guard``), built with ``kwargs``."""
    from visguard import plugins

    return plugins.get("judges", name)(**kwargs)


__all__ = [
    "Benchmark",
    "BenchmarkLayoutError",
    "EvalItem",
    "Judge",
    "JudgeCase",
    "Judgment",
    "ResultStore",
    "ResumeError",
    "Summary",
    "evaluate_guard",
    "evaluate_model",
    "get_benchmark",
    "get_judge",
    "load_benchmark",
    "read_rows",
    "summarize_guard_rows",
    "summarize_model_rows",
]
