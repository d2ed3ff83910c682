"""The report of a :class:`~visguard_bench.latency.LatencyBench` run as a table, Markdown, or a plot."""

from __future__ import annotations

import textwrap
from typing import Any

import click


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a :meth:`~visguard_bench.latency.LatencyBench.run` report, its notes included."""
    m, mod = report["machine"], report["model"]
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"load {m['load_average_before'][0]:.1f} -> {m['load_average_after'][0]:.1f}",
        f"model: {mod['architecture']} width {mod['hidden_size']}, {mod['num_layers']} layers, vocab {mod['vocab_size']}, "
        f"{mod['parameters'] / 1e6:.1f} M parameters, {mod['image_px']} px images, format {mod['format']}",
    ]
    if "prompt_tokens" in report:
        t = report["prompt_tokens"]
        lines.append(f"prompt: {t['total']} tokens = {t['static_prefix']} static prefix + {t['request']} request")
    notes = report.get("notes") or []
    for note in notes:
        lines += ["", *textwrap.wrap(f"NOTE: {note}", width=100)]
    lines.append("")
    name_w = max(len(k) for k in report["timings"])
    lines.append(f"{'measurement':<{name_w}}  {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'per s':>8} "
                 f"{'tokens':>7} {'cpu ms':>8}")
    for name, s in report["timings"].items():
        tokens = "" if s.get("tokens") is None else f"{s['tokens']:.0f}"
        cpu = "" if s.get("cpu_mean_ms") is None else f"{s['cpu_mean_ms']:.1f}"
        lines.append(f"{name:<{name_w}}  {s['p50_ms']:9.1f} {s['p95_ms']:9.1f} {s['p99_ms']:9.1f} {s['mean_ms']:9.1f} "
                     f"{s['throughput_per_s']:8.2f} {tokens:>7} {cpu:>8}")
    lines.append("")
    lines.append("ratios (fixed overheads at this size, not caching: see the note above):" if notes else "ratios:")
    for key, value in report["ratios"].items():
        lines.append(f"  {key:<32} {'-' if value is None else f'{value:.3f}'}")
    if "scaling" in report:
        sc = report["scaling"]
        lines += ["", "scaling (p50 ms):", "  images  tokens  fast"]
        lines += [f"  {r['images']:>6}  {r['tokens']:>6}  {r['fast_p50_ms']:6.1f}" for r in sc["images"]]
        lines += ["  response tokens  post (reuse)  post (no cache)"]
        lines += [f"  {r['response_tokens']:>15}  {r['post_reuse_p50_ms']:12.1f}  {r['post_uncached_p50_ms']:15.1f}" for r in sc["response"]]
        lines += ["  batch  per check  whole batch"]
        lines += [f"  {r['batch']:>5}  {r['per_check_p50_ms']:9.1f}  {r['batch_p50_ms']:11.1f}" for r in sc["batch"]]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what docs/latency.md shows)."""
    m, mod = report["machine"], report["model"]
    out = [
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"load average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after. "
        f"Model: {mod['architecture']} width {mod['hidden_size']}, {mod['num_layers']} layers, vocabulary "
        f"{mod['vocab_size']}, {mod['parameters'] / 1e6:.1f} M parameters, {mod['image_px']} px images, format {mod['format']}.",
        "",
        *[f"> **Note:** {note}\n" for note in report.get("notes") or []],
        "| measurement | p50 ms | p95 ms | p99 ms | mean ms | per s | tokens | CPU ms (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["timings"].items():
        tokens = "" if s.get("tokens") is None else f"{s['tokens']:.0f}"
        cpu = "" if s.get("cpu_mean_ms") is None else f"{s['cpu_mean_ms']:.1f}"
        out.append(f"| {name} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | {s['mean_ms']:.1f} | "
                   f"{s['throughput_per_s']:.2f} | {tokens} | {cpu} |")
    out += ["", "| ratio | value |", "|---|---:|"]
    out += [f"| `{k}` | {'-' if v is None else f'{v:.3f}'} |" for k, v in report["ratios"].items()]
    if "scaling" in report:
        sc = report["scaling"]
        out += ["", "| images | prompt tokens | fast check p50 ms |", "|---:|---:|---:|"]
        out += [f"| {r['images']} | {r['tokens']} | {r['fast_p50_ms']:.1f} |" for r in sc["images"]]
        out += ["", "| response tokens | post-check after its pre-check, p50 ms | post-check without caches, p50 ms |",
                "|---:|---:|---:|"]
        out += [f"| {r['response_tokens']} | {r['post_reuse_p50_ms']:.1f} | {r['post_uncached_p50_ms']:.1f} |" for r in sc["response"]]
        out += ["", "| batch | per check p50 ms | whole batch p50 ms |", "|---:|---:|---:|"]
        out += [f"| {r['batch']} | {r['per_check_p50_ms']:.1f} | {r['batch_p50_ms']:.1f} |" for r in sc["batch"]]
    return "\n".join(out)


def plot_scaling(report: dict[str, Any], path: str) -> None:
    """Three panels (images, response tokens, batch size) of latency per check; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise click.ClickException("--plot needs matplotlib (pip install 'visguard[plots]')") from exc
    sc = report["scaling"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot([r["images"] for r in sc["images"]], [r["fast_p50_ms"] for r in sc["images"]], "o-", label="fast check")
    axes[0].set_xlabel("images")
    axes[1].plot([r["response_tokens"] for r in sc["response"]], [r["post_reuse_p50_ms"] for r in sc["response"]], "o-",
                 label="post-check, reusing the pre-check")
    axes[1].plot([r["response_tokens"] for r in sc["response"]], [r["post_uncached_p50_ms"] for r in sc["response"]], "s--",
                 label="post-check, no cache")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("response tokens")
    axes[2].plot([r["batch"] for r in sc["batch"]], [r["per_check_p50_ms"] for r in sc["batch"]], "o-", label="per check")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("batch size")
    for ax in axes:
        ax.set_ylabel("ms (p50)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    mod = report["model"]
    fig.suptitle(f"visguard check latency: {mod['architecture']} width {mod['hidden_size']}, {mod['num_layers']} layers, "
                 f"{report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
