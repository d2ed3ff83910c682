"""``visguard bench``: the command line of :class:`~visguard_bench.latency.LatencyBench`."""

from __future__ import annotations

import json

import click

from visguard_bench.latency import SIZES, LatencyBench, torch_threads
from visguard_bench.report import format_markdown, format_report, plot_scaling


@click.command("bench")
@click.option("--size", type=click.Choice(list(SIZES)), default="default", show_default=True,
              help="Model and run size: default = width 384, 6 layers, 32k vocabulary, 224 px images "
                   "(model compute dominates, minutes on 2 CPU cores); small; tiny = a seconds-long smoke run whose "
                   "ratios are fixed overheads and say nothing about caching.")
@click.option("--model", "-m", default=None, help="Measure this guard checkpoint instead of building one.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch intra-op threads (default: torch's).")
@click.option("--no-scaling", is_flag=True, help="Skip the scaling table (images, response length, batch size).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write the scaling plot (PNG) here; needs matplotlib.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, ratios at the top level.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print the report as Markdown tables.")
def bench(size: str, model: str | None, threads: int | None, no_scaling: bool, plot_path: str | None, as_json: bool,
          as_markdown: bool) -> None:
    """Measure what a guard check costs against its physical floor, in one process.

    Builds a random-weight Qwen2-VL of real architecture (or loads --model), then measures: a fast
    check vs a forward over the request's own tokens on the cached static prefix; a post-check
    continuing from its pre-check vs cold; adaptive vs always-reason; 8 concurrent vs 8
    sequential checks; a guarded host vs the host alone, and a stream's first token; peak memory
    at 8 images; and how latency grows with images, response length and batch size. Absolute
    numbers depend on the machine (named in the output); ratios compare runs on one machine. At
    --size tiny fixed per-call overheads dominate: its ratios say nothing about caching.

    Example: visguard bench --json > bench.json
    """
    from visguard.core.errors import VisguardError

    def progress(label: str) -> None:
        click.echo(f"[bench] {label}", err=True)

    if SIZES[size].note:
        progress(f"note: {SIZES[size].note}")
    # --threads is this run's: the process keeps its own count afterwards, whatever happens
    with torch_threads(threads):
        try:
            report = LatencyBench(size, model=model, threads=threads, progress=progress).run(scaling=not no_scaling)
        except VisguardError as exc:
            raise click.ClickException(str(exc)) from exc
    if plot_path and "scaling" in report:
        plot_scaling(report, plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))
    else:
        click.echo(format_markdown(report) if as_markdown else format_report(report))
