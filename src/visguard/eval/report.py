"""Human-readable outputs of an evaluation: a Markdown report and PNG plots.

Plots use matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
matplotlib is an optional dependency (``visguard[plots]``): without it the plots are skipped and
the summary says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visguard.eval.metrics import roc_points

GUARD_HEADLINE = ("accuracy", "precision", "recall", "f1", "fpr", "auroc", "auprc")
MODEL_HEADLINE = ("asr", "rsr", "rr", "hr", "safe_unleveled", "refusal_rate", "safe_rate",
                  "mss_safe_acc", "mss_unsafe_acc", "mss_acc")


def fmt(value: Any, digits: int = 4) -> str:
    """A metric for a table cell (``-`` for ``None``)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")
_log = logging.getLogger(__name__)


def md(text: Any) -> str:
    """Text from a dataset or a run (a category name, a model id) as literal Markdown: one line,
    HTML-escaped, every Markdown control character backslash-escaped (``|`` cannot end a table cell)."""
    one = " ".join(str(text).replace("\x00", " ").split())
    one = one.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", one)


def plain_label(text: Any) -> str:
    """Text for a matplotlib label, shown as written: ``$`` escaped so nothing is parsed as mathtext."""
    return str(text).replace("\x00", " ").replace("$", r"\$")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out


def render_markdown(summary: Mapping[str, Any], out_dir: Path | None = None) -> str:
    """The Markdown report of a guard or model evaluation summary."""
    kind = summary.get("kind")
    title = md(summary.get("benchmark") or "evaluation")
    lines = [f"# visguard eval: {title}" + (f" ({md(summary['split'])})" if summary.get("split") else ""), ""]
    settings = [(k, summary.get(k)) for k in ("kind", "model", "backend", "format", "mode", "threshold", "guard",
                                               "judge", "judge_model", "judge_backend") if summary.get(k) is not None]
    lines += _table(["setting", "value"], [(k, md(v)) for k, v in settings]) + [""]
    if kind == "guard":
        lines += _guard_sections(summary)
    else:
        lines += _model_sections(summary)
    undefined = summary.get("undefined") or {}
    if undefined:
        lines += ["## Undefined metrics", ""] + [f"- `{k}`: {v}" for k, v in sorted(undefined.items())] + [""]
    plots = (summary.get("files") or {}).get("plots") or []
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            rel = Path(p).relative_to(out_dir) if out_dir is not None and Path(p).is_relative_to(out_dir) else Path(p)
            lines.append(f"![{rel.stem}]({rel.as_posix()})")
        lines.append("")
    elif summary.get("plots_note"):
        lines += [f"_Plots skipped: {summary['plots_note']}_", ""]
    return "\n".join(lines)


def _guard_sections(s: Mapping[str, Any]) -> list[str]:
    c = s["confusion"]
    lines = [f"**{s['n']} items**, {s['n_available']} with a verdict, **{s['unavailable']} unavailable** "
             f"(gold safe: {s['unavailable_by_label']['safe']}, gold unsafe: {s['unavailable_by_label']['unsafe']}; "
             "never counted as safe). Classification metrics use available verdicts; the positive class is `unsafe`.", ""]
    lines += _table(["metric", "value"], [(k, s.get(k)) for k in GUARD_HEADLINE] + [("n_scored", s.get("n_scored"))]) + [""]
    lines += ["## Confusion matrix", ""]
    lines += _table(["gold \\ predicted", "unsafe", "safe", "unavailable"], [
        ("unsafe", c["tp"], c["fn"], s["unavailable_by_label"]["unsafe"]),
        ("safe", c["fp"], c["tn"], s["unavailable_by_label"]["safe"]),
    ]) + [""]
    for key, name in (("per_category", "category"), ("per_split", "split")):
        groups = s.get(key) or {}
        if groups:
            lines += [f"## Per {name}", ""]
            lines += _table([name, "n", "unavailable", "accuracy", "precision", "recall", "f1", "fpr", "auroc"], [
                (md(g), m["n"], m["unavailable"], m["accuracy"], m["precision"], m["recall"], m["f1"], m["fpr"], m["auroc"])
                for g, m in groups.items()
            ]) + [""]
    lines += _attribution_line(s.get("attribution"))
    lat = s.get("latency_ms") or {}
    lines += ["## Latency", "", "Wall time of the `check_batch` call that produced each verdict (per request when "
              "`--batch-size 1`).", ""]
    lines += _table(["p50 ms", "p95 ms", "p99 ms", "mean ms", "throughput items/s"],
                    [(lat.get("p50"), lat.get("p95"), lat.get("p99"), lat.get("mean"), s.get("throughput_items_per_s"))])
    return lines + [""]


def _attribution_line(a: Mapping[str, Any] | None) -> list[str]:
    """``eval --explain``: how often an unsafe verdict's harm lay in the combination only."""
    if not a:
        return []
    n, by = a["unsafe_verdicts"], a["by_summary"]
    return [f"**Attribution** (`--explain`): of {n} unsafe verdicts, {by['combination only']} "
            f"({fmt(a['combination_only_share'])}) were attributed to the combination only, {by['single image']} to "
            f"a single image, {by['text']} to the text alone (gold-unsafe items only: "
            f"{fmt(a['combination_only_share_gold_unsafe'])} combination only).", ""]


def _model_sections(s: Mapping[str, Any]) -> list[str]:
    lines = [f"**{s['n']} items**, {s['n_judged']} judged, {s['judge_failed']} judge failures, "
             f"{s['host_failed']} host failures. Rates are percentages of judged responses: ASR / RSR / RR / HR "
             f"over the {s['n_unsafe_judged']} unsafe items (they sum to 100), the refusal rate over the "
             f"{s['n_safe_judged']} safe items.", ""]
    if s.get("guard_blocked") is not None:
        stages = s.get("guard_blocked_by_stage") or {}
        lines += [f"The guard ({s.get('guard')}) blocked {s['guard_blocked']} answers "
                  f"({stages.get('input', 0)} at the pre-check, {stages.get('output', 0)} at the post-check); "
                  "the judge saw the refusal that replaced them.", ""]
    shown = [k for k in MODEL_HEADLINE if k in s and not (k == "safe_unleveled" and not s[k])]
    lines += _table(["metric (%)", "value"], [(k, s[k]) for k in shown]) + [""]
    for key, name in (("per_category", "category"), ("per_split", "split")):
        groups = s.get(key) or {}
        if groups:
            lines += [f"## Per {name}", ""]
            lines += _table([name, "n", "judged", "ASR", "RSR", "RR", "HR", "refusal rate"], [
                (md(g), m["n"], m["n_judged"], m["asr"], m["rsr"], m["rr"], m["hr"], m["refusal_rate"])
                for g, m in groups.items()
            ]) + [""]
    lat = s.get("latency_ms") or {}
    lines += ["## Latency", "", "Host generation time per item (through the guard when one wraps the host).", ""]
    lines += _table(["p50 ms", "p95 ms", "p99 ms", "mean ms"], [(lat.get("p50"), lat.get("p95"), lat.get("p99"), lat.get("mean"))])
    return lines + [""]


# ---------------------------------------------------------------------------------------------- plots


def write_plots(plot_dir: Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], str | None]:
    """Write the PNG plots of a summary; returns (files, note). The note says why plots were skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return [], "matplotlib is not installed (pip install 'visguard[plots]')"
    plot_dir.mkdir(parents=True, exist_ok=True)
    makers = _GUARD_PLOTS if summary.get("kind") == "guard" else _MODEL_PLOTS
    files: list[str] = []
    failed: list[str] = []
    for name, maker in makers:
        fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        path = plot_dir / f"{name}.png"
        try:
            if maker(fig, summary, rows) is False:
                continue
            fig.savefig(path)
        except Exception as exc:  # noqa: BLE001 - a plot never costs the run its summary and report
            _log.warning("plot %s skipped: %s: %s", name, type(exc).__name__, exc)
            failed.append(f"{name} ({type(exc).__name__})")
            continue
        files.append(str(path))
    return files, ("plots failed: " + ", ".join(failed)) if failed else None


def _confusion_plot(fig: Any, s: Mapping[str, Any], rows: Any) -> None:
    c, u = s["confusion"], s["unavailable_by_label"]
    grid = [[c["tp"], c["fn"], u["unsafe"]], [c["fp"], c["tn"], u["safe"]]]
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(3), ["unsafe", "safe", "unavailable"])
    ax.set_yticks(range(2), ["unsafe", "safe"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = max(max(r) for r in grid) or 1
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title("Confusion matrix")


def _guard_category_plot(fig: Any, s: Mapping[str, Any], rows: Any) -> bool:
    groups = s.get("per_category") or {}
    if not groups:
        return False
    names = list(groups)
    acc = [groups[g]["accuracy"] or 0.0 for g in names]
    ax = fig.add_subplot()
    ax.barh(range(len(names)), acc, color="tab:blue")
    ax.set_yticks(range(len(names)), [plain_label(n) for n in names])
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (available verdicts)")
    ax.set_title("Per category")
    return True


def _score_plot(fig: Any, s: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> bool:
    scored = [r for r in rows if r.get("score") is not None and r.get("pred") in ("safe", "unsafe")]
    if not scored:
        return False
    left, right = fig.subplots(1, 2)
    for label, color in (("safe", "tab:green"), ("unsafe", "tab:red")):
        left.hist([r["score"] for r in scored if r["label"] == label], bins=20, range=(0, 1), alpha=0.6,
                  color=color, label=f"gold {label}")
    thr = s.get("threshold")
    if thr is not None:
        left.axvline(thr, color="black", linestyle="--", linewidth=1)
    left.set_xlabel("P(unsafe)")
    left.set_ylabel("items")
    left.legend()
    left.set_title("Score distribution")
    pts = roc_points([r["score"] for r in scored], [r["label"] == "unsafe" for r in scored])
    if pts:
        right.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
    right.plot([0, 1], [0, 1], color="gray", linestyle=":")
    right.set_xlabel("FPR")
    right.set_ylabel("TPR")
    right.set_title(f"ROC (AUROC {fmt(s.get('auroc'), 3)})")
    return True


def _latency_plot(fig: Any, s: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> bool:
    key = "latency_ms" if s.get("kind") == "guard" else "host_ms"
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    if not values:
        return False
    ax = fig.add_subplot()
    ax.hist(values, bins=30, color="tab:purple")
    # Percentiles in the legend, not as text at the lines: p95 and p99 often sit together at the right
    # edge, where labels overlap each other and the frame.
    for q, style in (("p50", "--"), ("p95", "-."), ("p99", ":")):
        v = (s.get("latency_ms") or {}).get(q)
        if v is not None:
            ax.axvline(v, linestyle=style, linewidth=1.2, color="black", label=f"{q} {v:.1f} ms")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.set_xlabel("ms")
    ax.set_ylabel("items")
    ax.set_title("Latency")
    return True


def _rates_plot(fig: Any, s: Mapping[str, Any], rows: Any) -> bool:
    groups = {"all": s, **(s.get("per_category") or {})}
    names = [g for g, m in groups.items() if m.get("asr") is not None]
    if not names:
        return False
    ax = fig.add_subplot()
    left = [0.0] * len(names)
    for key, color in (("asr", "tab:red"), ("rsr", "tab:green"), ("rr", "tab:orange"), ("hr", "tab:gray"),
                       ("safe_unleveled", "tab:olive")):
        vals = [groups[g].get(key) or 0.0 for g in names]
        if any(vals):
            ax.barh(range(len(names)), vals, left=left, color=color, label=key.upper())
            left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_yticks(range(len(names)), [plain_label(n) for n in names])
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of judged responses to unsafe items")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("ASR / RSR / RR / HR per category")
    return True


_GUARD_PLOTS = (("confusion_matrix", _confusion_plot), ("per_category", _guard_category_plot),
                ("scores_roc", _score_plot), ("latency", _latency_plot))
_MODEL_PLOTS = (("per_category", _rates_plot), ("latency", _latency_plot))
