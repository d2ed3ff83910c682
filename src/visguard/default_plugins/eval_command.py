"""The ``visguard eval`` command, added to the CLI through the ``register_commands`` hook."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from visguard.cli import (
    backend_arg_option,
    backend_kwargs,
    checker_from,
    config_option,
    device_option,
    format_option,
    key_values,
    max_new_tokens_option,
    mode_option,
    parse_guard_spec,
    policy_from,
    read_config,
    stage_option,
    threshold_option,
)
from visguard.core.policy import DEFAULT_TIMEOUT_S, Mode
from visguard.hookspecs import hookimpl

HEADLINE_GUARD = ("n", "accuracy", "precision", "recall", "f1", "fpr", "auroc", "auprc", "unavailable")
HEADLINE_MODEL = ("n", "n_judged", "judge_failed", "host_failed", "guard_blocked", "asr", "rsr", "rr", "hr",
                  "refusal_rate")


def default_out_dir(benchmark: str, split: str | None, model: str, kind: str) -> Path:
    """``runs/eval/<benchmark>-<split>-<kind>-<model>``: stable, so rerunning a command resumes it."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1] or model)[:60]
    return Path("runs") / "eval" / f"{benchmark}-{split or 'all'}-{kind}-{slug}"


def _make_judge(name: str | None, judge_model: str | None, judge_backend: str, device: str,
                judge_base_url: str | None, judge_prompt: str | None = None, judge_system: str | None = None) -> Any:
    from visguard.eval import get_judge

    if name is None:
        if not judge_model:
            raise click.UsageError(
                "model evaluation needs a judge: --judge-model MODEL for the MIS LLM judge, "
                "or --judge refusal (keywords, no model)"
            )
        name = "mis"
    if name == "refusal":
        return get_judge("refusal")
    kwargs: dict[str, Any] = {"backend": judge_backend,
                              **backend_kwargs(judge_backend, (), device=device, base_url=judge_base_url)}
    if judge_model:
        kwargs["model"] = judge_model
    if judge_prompt is not None or judge_system is not None:
        if name != "mis":
            raise click.UsageError("--judge-prompt and --judge-system apply to the mis judge")
        from visguard.default_plugins.judges import read_judge_prompt

        if judge_prompt is not None:
            kwargs["prompt"] = read_judge_prompt(judge_prompt)
        if judge_system is not None:
            kwargs["system"] = judge_system
    return get_judge(name, **kwargs)


@hookimpl
def register_commands(cli):
    @cli.command("eval")
    @click.option("--benchmark", "-B", required=True,
                  help="Benchmark plugin: mis, vlguard, mm-safetybench, siuo, mssbench, mossbench, figstep, jsonl.")
    @click.option("--data", "-d", required=True, help="Local copy of the benchmark, in its published layout.")
    @click.option("--split", "-s", default=None, help="One split (MIS: easy, hard, real -> mis_<split>.json). Default: all.")
    @click.option("--model", "-m", default=None,
                  help="The guard to evaluate (or --stage, for a cascade); with --host, the host VLM to evaluate "
                       "(hub id, path, or served name).")
    @stage_option
    @config_option
    @click.option("--host", "host_adapter", default=None, metavar="ADAPTER",
                  help="Model evaluation: run --model as a host VLM through this host adapter "
                       "(auto: path -> transformers, --base-url -> openai; or any registered host) and judge its answers.")
    @click.option("--guard", "guard_model", default=None,
                  help="Model evaluation: protect the host with this guard model (guard.wrap); uses --backend/--mode/--threshold. "
                       "--stage instead protects it with a cascade.")
    @click.option("--judge", default=None, help="Model evaluation judge: mis (LLM, needs --judge-model), refusal, guard, or a plugin's.")
    @click.option("--judge-model", default=None, help="The judge's model (mis: an instruction-following VLM; guard: a guard model).")
    @click.option("--judge-backend", default="transformers", show_default=True, help="Backend of the judge model (openai for an endpoint).")
    @click.option("--judge-base-url", default=None, help="API root of an OpenAI-compatible judge endpoint.")
    @click.option("--judge-prompt", default=None, metavar="FILE",
                  help="mis judge: the judge instruction from FILE, a template with {question} and {response} "
                       "(e.g. the MIS repo's PROMPT_TEMPLATE); answered in the MIS schema (label_perception, "
                       "label_str), 128 tokens.")
    @click.option("--judge-system", default=None, metavar="TEXT",
                  help="mis judge: a system message (the MIS repo sends \"You are a helpful assistant.\").")
    @click.option("--out", "-o", "out_dir", default=None,
                  help="Output directory (results.jsonl, summary.json, report.md, plots/). "
                       "Default: runs/eval/<benchmark>-<split>-<kind>-<model>. Rerunning resumes.")
    @click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N items.")
    @mode_option
    @click.option("--backend", "-b", default="transformers", show_default=True, help="Guard backend plugin.")
    @click.option("--vs", "vs_guards", multiple=True, metavar="MODEL[@FORMAT[@BACKEND]]",
                  help="Guard evaluation: also evaluate this guard on the same items (repeatable) and print one "
                       "comparison table and plot; its format defaults to the checkpoint's own, its backend to --backend. "
                       "--out is then the comparison directory (one sub-directory per guard).")
    @click.option("--ignore-unread", is_flag=True,
                  help="With --vs or --stage: single-modality guards judge the part they read (a text guard the text, an "
                       "image classifier its one image) instead of refusing items with more.")
    @format_option
    @threshold_option
    @click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
                  help="Guard requests per batch (model evaluation: responses per judge batch).")
    @max_new_tokens_option
    @click.option("--timeout-s", type=click.FloatRange(0.001), default=DEFAULT_TIMEOUT_S, show_default=True,
                  help="Time limit of one guard batch (--batch-size items), queueing included; past it those items "
                       "are unavailable. Raise it for reason mode on a CPU.")
    @click.option("--host-max-new-tokens", type=click.IntRange(1), default=1024, show_default=True,
                  help="Host answer budget (the paper: greedy, up to 1024).")
    @backend_arg_option
    @click.option("--host-arg", "host_args", multiple=True, metavar="KEY=VALUE",
                  help="Host keyword argument (model evaluation), repeatable; JSON values.")
    @device_option
    @click.option("--base-url", default=None,
                  help="API root of the guard's server (backends that take `base_url`), or of the host (--host).")
    @click.option("--restart", is_flag=True, help="Discard results already in --out instead of resuming.")
    @click.option("--no-plots", is_flag=True, help="Do not write PNG plots.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
    @click.option("--explain", is_flag=True,
                  help="Guard evaluation of one guard: attribute every verdict (check --explain) and report how "
                       "often the harm lay in the combination only (summary.json 'attribution', report.md).")
    def eval_command(benchmark: str, data: str, split: str | None, model: str | None, stages: tuple[str, ...],
                     config_file: str | None, vs_guards: tuple[str, ...],
                     ignore_unread: bool, host_adapter: str | None,
                     guard_model: str | None, judge: str | None, judge_model: str | None, judge_backend: str,
                     judge_base_url: str | None, judge_prompt: str | None, judge_system: str | None, out_dir: str | None, limit: int | None, mode: Mode | None, backend: str,
                     format_name: str | None, threshold: float, batch_size: int, max_new_tokens: int, timeout_s: float,
                     host_max_new_tokens: int, backend_args: tuple[str, ...], host_args: tuple[str, ...],
                     device: str, base_url: str | None, restart: bool, no_plots: bool,
                     no_progress: bool, as_json: bool, explain: bool) -> None:
        """Evaluate a guard, or a (guarded) host VLM, on a local safety benchmark.

        \b
        Guard evaluation (default): run the guard --model over the benchmark's labelled items;
        report accuracy, precision, recall, F1, FPR, AUROC, AUPRC, per-category and per-split
        tables, latency p50/p95/p99 and throughput. Unavailable verdicts are counted apart.
        Repeated --stage MODEL[@FORMAT[@BACKEND]] evaluates a cascade of guards instead of --model;
        --config FILE evaluates the file's guard or cascade under its policy.
        Model evaluation (--host): run --model as a host VLM (optionally wrapped by --guard, or a --stage cascade),
        judge every answer, report ASR / RSR / RR / HR (percent; MIS protocol) and the
        benchmark's own rate.

        \b
        Results stream to OUT/results.jsonl; rerunning the same command resumes without losing
        or repeating an item. OUT also gets summary.json, report.md and plots/*.png.

        \b
        Examples:
          visguard eval -B mis -d data/mis_test -s hard -m Tuwhy/Qwen2-VL-7B-MIRage
          visguard eval -B mis -d data/mis_test -s hard -m Qwen/Qwen2-VL-7B-Instruct --host auto \\
              --judge-model Qwen/Qwen2.5-VL-72B-Instruct --judge-backend openai --judge-base-url http://127.0.0.1:8000/v1
          visguard eval -B mossbench -d MOSSBench/data -m llava-hf/llava-1.5-7b-hf --host auto --judge refusal
          visguard eval -B jsonl -d data.jsonl --stage Qwen/Qwen3Guard-Gen-0.6B --stage yueliu1999/GuardReasoner-VL-3B
        """
        from visguard import plugins
        from visguard.engine.checker import Checker
        from visguard.eval import evaluate_guard, evaluate_model, get_benchmark

        ctx = click.get_current_context()
        config = read_config(config_file)  # the whole file is checked before any data or model loads
        kind = "model" if host_adapter else "guard"
        if kind == "guard" and (guard_model or judge or judge_model):
            raise click.UsageError("--guard, --judge and --judge-model apply to model evaluation: add --host ADAPTER")
        if kind == "model" and not model:
            raise click.UsageError("model evaluation (--host) needs --model, the host VLM")
        if kind == "model" and guard_model and stages:
            raise click.UsageError("give --guard (one guard) or --stage (a cascade), not both")
        if explain and (kind == "model" or stages or vs_guards):
            raise click.UsageError("--explain applies to the guard evaluation of one guard (--model), "
                                   "not to --host, --stage or --vs")
        if stages and vs_guards:
            raise click.UsageError("--vs compares single guards: it does not take --stage")
        if kind == "model" and judge is None and not judge_model:
            _make_judge(judge, judge_model, judge_backend, device, judge_base_url)  # raises the usage error early
        bench = get_benchmark(benchmark)
        items = bench.load(data, split, limit=limit)
        if not items:
            raise click.UsageError(f"{benchmark}: no items found in {data}")
        splits = {it.split for it in items}
        split = split or (splits.pop() if len(splits) == 1 else None)  # e.g. --data .../mis_hard.json
        label = model if kind == "model" or not stages else "cascade-" + "-".join(
            parse_guard_spec(spec, backend)[0].rstrip("/").split("/")[-1] for spec in stages)
        if config is not None and not label and not stages:
            label = config.target()
        out = Path(out_dir) if out_dir else default_out_dir(benchmark, split, label or "", kind)
        policy = policy_from(config, ctx, config_file, mode=("mode", mode), threshold=("threshold", threshold),
                             max_new_tokens=("max_new_tokens", max_new_tokens), timeout_s=("timeout_s", timeout_s))

        def load_guard(name: str | None) -> Checker:  # --stage: the cascade; --config: the file's
            return checker_from(config, ctx, config_file, name, stages, policy=policy, backend=backend,
                                format_name=format_name, backend_args=backend_args, ignore_unread=ignore_unread,
                                device=device, base_url=base_url)

        if kind == "guard" and vs_guards:
            if not model:
                raise click.UsageError("--vs compares guards with --model: give --model")
            _compare(vs_guards, model=model, items=items, policy=policy, backend=backend, format_name=format_name,
                     backend_args=backend_args, device=device, base_url=base_url, benchmark=benchmark, split=split,
                     out_dir=out_dir, batch_size=batch_size, restart=restart, no_plots=no_plots,
                     no_progress=no_progress, as_json=as_json, ignore_unread=ignore_unread)
            return
        if vs_guards:
            raise click.UsageError("--vs compares guards: it does not apply to model evaluation (--host)")
        if kind == "guard":
            checker = load_guard(model)
            if explain:
                from visguard.engine.attribution import explaining

                checker = explaining(checker)  # a --config cascade: refused, one line
            summary = evaluate_guard(checker, items, out_dir=out, batch_size=batch_size, mode=mode,
                                     benchmark=benchmark, split=split, restart=restart,
                                     progress=not no_progress, plots=not no_plots)
        else:
            from visguard.hosting.hosts import default_host_name

            assert model is not None and host_adapter is not None  # kind "model": --host given, --model checked above
            target = base_url or model
            adapter = default_host_name(target) if host_adapter == "auto" else host_adapter
            shorthands = {"device": device, "max_new_tokens": host_max_new_tokens, "model": model if base_url else None}
            host_kwargs = {**plugins.supported_options("hosts", adapter, shorthands), **key_values(host_args, "--host-arg")}
            host = plugins.create("hosts", adapter, target, **host_kwargs)
            guard = load_guard(guard_model) if guard_model or stages or config is not None else None
            judge_obj = _make_judge(judge, judge_model, judge_backend, device, judge_base_url, judge_prompt, judge_system)
            summary = evaluate_model(host, items, judge_obj, guard=guard, benchmark=bench, split=split, out_dir=out,
                                     judge_batch_size=batch_size, restart=restart, progress=not no_progress,
                                     plots=not no_plots)
        if as_json:
            click.echo(summary.to_json())
            return
        keys = HEADLINE_GUARD if kind == "guard" else HEADLINE_MODEL + tuple(summary.get("headline") or ())
        seen: set[str] = set()
        for key in keys:
            if key in summary and key not in seen:
                seen.add(key)
                value = summary[key]
                click.echo(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {'-' if value is None else value}")
        lat = summary.get("latency_ms") or {}
        if lat.get("p50") is not None:
            click.echo(f"{'latency ms':<14} p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}")
        if summary.get("resumed"):
            click.echo(f"{'resumed':<14} {summary['resumed']} items from an earlier run")
        click.echo(f"{'report':<14} {summary['files']['report']}")


def _compare(vs_guards: tuple[str, ...], *, model: str, items: list, policy: Any, backend: str, format_name: str | None,
             backend_args: tuple[str, ...], device: str, base_url: str | None, benchmark: str, split: str | None,
             out_dir: str | None, batch_size: int, restart: bool, no_plots: bool, no_progress: bool,
             as_json: bool, ignore_unread: bool) -> None:
    """Evaluate --model and every --vs guard on the same items; print one table, write one plot."""
    import json

    from visguard.engine.guard import Guard, resolve_format
    from visguard.eval import evaluate_guard
    from visguard.eval.compare import write_comparison

    specs = [(model, format_name, backend, backend_args)]
    for spec in vs_guards:
        name, fmt, be = parse_guard_spec(spec, backend, "--vs")
        specs.append((name, fmt, be, ()))
    root = Path(out_dir) if out_dir else default_out_dir(benchmark, split, "compare", "guard")
    summaries: dict[str, Any] = {}
    for name, fmt, be, args in specs:
        label = name if fmt is None else f"{name}@{fmt}"
        if label in summaries:
            raise click.UsageError(f"guard {label!r} is listed twice")
        guard_format = resolve_format(name, fmt)
        if ignore_unread:
            guard_format.ignore_unread = True
        guard = Guard.from_pretrained(name, backend=be, format=guard_format,
                                      **backend_kwargs(be, args, device=device, base_url=base_url))
        # --mode where the guard's format runs in it, else the format's own (e.g. reason-only guards)
        own = policy.mode if policy.mode in guard.capabilities.modes else guard.policy.mode
        guard = guard.with_policy(policy.updated(mode=own))
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label.rstrip("/").split("/")[-1])[:60]
        summaries[label] = evaluate_guard(guard, items, out_dir=root / slug, batch_size=batch_size, mode=None,
                                          benchmark=benchmark, split=split, restart=restart,
                                          progress=not no_progress, plots=not no_plots)
    result = write_comparison(root, summaries, plots=not no_plots)
    if as_json:
        click.echo(json.dumps({"comparison": result["rows"], "files": result["files"]}, indent=2, default=str))
        return
    click.echo(result["table"])
    click.echo(f"\ncomparison     {result['files']['markdown']}")
    if "plot" in result["files"]:
        click.echo(f"plot           {result['files']['plot']}")
    elif result["plots_note"]:
        click.echo(f"plot skipped   {result['plots_note']}")
