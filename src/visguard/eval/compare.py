"""Side by side: several guards' evaluation summaries as one table and one plot.

``visguard eval --vs MODEL ...`` evaluates each guard on the same items (each in its own resumable
output directory) and then calls :func:`write_comparison`, which writes ``comparison.md``,
``comparison.json`` and ``comparison.png`` (accuracy, F1, FPR and AUROC bars per guard, and the
p50 latency per guard) into the comparison directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visguard.eval.report import _table, fmt

COLUMNS = ("accuracy", "f1", "fpr", "auroc")


def comparison_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per guard: n, the headline metrics, p50 latency (ms) and unavailable count."""
    rows = []
    for name, s in summaries.items():
        lat = s.get("latency_ms") or {}
        unavailable = s.get("unavailable")
        rows.append({"guard": name, "n": s.get("n"), **{k: s.get(k) for k in COLUMNS},
                     "latency_p50_ms": lat.get("p50"), "unavailable": unavailable})
    return rows


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (``-`` where a metric is undefined)."""
    header = ["guard", "n", *COLUMNS, "p50 ms", "unavailable"]
    body = [[r["guard"], r["n"], *(r[k] for k in COLUMNS), r["latency_p50_ms"], r["unavailable"]] for r in rows]
    return "\n".join(_table(header, body))


def comparison_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    """One PNG: grouped metric bars per guard and a latency panel; returns a note when skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'visguard[plots]')"
    fig = Figure(figsize=(9.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    metrics, latency = fig.subplots(1, 2, width_ratios=(3, 1))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [r[k] if r[k] is not None else 0.0 for k in COLUMNS]
        short = str(r["guard"]).rstrip("/").split("/")[-1]
        metrics.bar([j + i * width for j in range(len(COLUMNS))], values, width, label=f"{i + 1}. {short}")
    metrics.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(COLUMNS))], [c.upper() if c != "f1" else "F1" for c in COLUMNS])
    metrics.set_ylim(0, 1)
    metrics.set_title("metrics (FPR: lower is better)")
    metrics.legend(fontsize="small")
    latency.bar(range(len(rows)), [r["latency_p50_ms"] or 0.0 for r in rows], color=[f"C{i}" for i in range(len(rows))])
    latency.set_xticks(range(len(rows)), [str(i + 1) for i in range(len(rows))])
    latency.set_title("p50 latency (ms)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return None


def write_comparison(out_dir: str | Path, summaries: Mapping[str, Mapping[str, Any]], *, plots: bool = True) -> dict[str, Any]:
    """Write ``comparison.md``, ``comparison.json`` and (with ``plots``) ``comparison.png``.

    Args:
        out_dir: the comparison directory.
        summaries: guard name -> its evaluation summary (:func:`~visguard.eval.evaluate_guard`).

    Returns:
        ``{"rows": [...], "table": markdown, "files": {...}, "plots_note": ...}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(summaries)
    table = comparison_table(rows)
    files = {"markdown": str(out / "comparison.md"), "json": str(out / "comparison.json")}
    note = None
    if plots:
        note = comparison_plot(rows, out / "comparison.png")
        if note is None:
            files["plot"] = str(out / "comparison.png")
    reports = "\n".join(f"- {name}: {(s.get('files') or {}).get('report', '-')}" for name, s in summaries.items())
    (out / "comparison.md").write_text(f"# Guards side by side\n\n{table}\n\n{reports}\n"
                                       + ("\n![comparison](comparison.png)\n" if "plot" in files else ""))
    (out / "comparison.json").write_text(json.dumps({"rows": rows}, indent=2, default=str) + "\n")
    return {"rows": rows, "table": table, "files": files, "plots_note": note}


__all__ = ["comparison_rows", "comparison_table", "comparison_plot", "fmt", "write_comparison"]
