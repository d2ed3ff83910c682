"""The ``visguard demo`` command (added to the CLI by the ``visguard-demo`` plugin)."""

from __future__ import annotations

import click

from visguard_demo.run import REAL_CHECKPOINT_LINE, SIZES


@click.command("demo")
@click.option("--out", "-o", "out_dir", default="runs/demo", show_default=True,
              help="Output directory: report.html, eval/ (visguard eval's outputs), requests.json.")
@click.option("--size", type=click.Choice(list(SIZES)), default="standard", show_default=True,
              help="How much the demo guard trains: standard (1,600 items, 2 epochs: what make demo runs), "
                   "quick (400 items, 1 epoch: less accurate), smoke (16 items, for tests: near chance).")
@click.option("--retrain", is_flag=True, help="Train the demo guard again even if a cached one exists.")
@click.option("--guard", "guard_model", default=None,
              help="Use this guard model (hub id or path) instead of training the demo guard.")
@click.option("--format", "guard_format", default=None,
              help="Guard format of --guard (a format plugin name; default: the checkpoint's own, "
                   "e.g. mirage for the MIRage checkpoints).")
@click.option("--host", default=None,
              help="Host VLM to guard (hub id or local path of a transformers model). "
                   "Default: a tiny random-weight Qwen2-VL whose answers are noise.")
@click.option("--mode", type=click.Choice(["fast", "reason", "adaptive"]), default="reason", show_default=True,
              help="Guard mode of the evaluation and the guarded requests (reason shows the guard's reasoning).")
@click.option("--device", default="cpu", show_default=True, help="Device of the guard and the host: cpu, cuda ...")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--print-guard-path", is_flag=True,
              help="Only print the directory of the trained demo guard of --size (e.g. for "
                   "VISGUARD_EXAMPLE_GUARD) and exit; exit 2 when it is not trained yet for this code.")
def demo(out_dir: str, size: str, retrain: bool, guard_model: str | None, guard_format: str | None, host: str | None,
         mode: str, device: str, no_progress: bool, print_guard_path: bool) -> None:
    """Train a small multi-image guard offline, guard a host VLM with it, and write an HTML report.

    \b
    1. writes synthetic two-image data (each image harmless alone, some pairs harmful together),
       each pair followed by one of its parts alone (an image, with or without the text, or the
       text alone; labelled safe, so the guard's --explain attribution means something);
    2. trains the demo guard (a 0.66 M-parameter Qwen2-VL, cached under $VISGUARD_CACHE/demo:
       first on the pairs alone, then on the pairs and their parts), or reuses the cached one;
    3. evaluates it on held-out items in the MIS test layout (visguard eval's runner and plots,
       in --mode);
    4. sends example requests through guard.wrap(host): pre-check, host answer, post-check;
    5. writes OUT/report.html: each request's images, text, both verdicts (score, category,
       reasoning, latency), what the user finally saw, and the evaluation plots.

    The demo guard is trained on synthetic shapes: it shows the mechanics, not real-world safety.
    On a GPU machine, real checkpoints replace it:

    \b
      {real}
    """
    if print_guard_path:
        from visguard.core.errors import InputError
        from visguard_demo.run import cached_demo_guard

        path = cached_demo_guard(size)
        if path is None:
            again = "visguard demo" + ("" if size == "standard" else f" --size {size}")
            raise InputError(f"no {size} demo guard is trained for this code yet: `{again}` trains it")
        click.echo(str(path))
        return

    from visguard_demo.run import run_demo

    result = run_demo(out_dir, size=size, retrain=retrain, guard_model=guard_model, guard_format=guard_format,
                      host=host, device=device, mode=mode, progress=not no_progress)
    s = result.summary
    click.echo("")
    click.echo(f"{'request images':<34} {'pre-check':<18} {'post-check':<18} outcome")
    for r in result.requests:
        pre, post = r["pre"], r["post"]
        click.echo(f"{' + '.join(r['objects']):<34} {_short(pre):<18} {_short(post):<18} "
                   f"{'BLOCKED (' + r['stage'] + ')' if r['blocked'] else 'passed'}")
    acc = s.get("accuracy")
    auroc = s.get("auroc")
    click.echo(f"\nheld-out: accuracy {acc if acc is None else f'{acc:.3f}'}, AUROC "
               f"{auroc if auroc is None else f'{auroc:.3f}'} on {s.get('n')} items ({s.get('mode')} mode)")
    click.echo(f"done in {result.seconds:.0f} s. Report: {result.report.resolve()}")
    click.echo("\nNext steps (bash, from this directory):")
    for comment, command in result.next_steps:
        click.echo(f"  # {comment}\n  {command}")


demo.help = (demo.help or "").replace("{real}", REAL_CHECKPOINT_LINE)


def _short(verdict: dict | None) -> str:
    if verdict is None:
        return "-"
    score = verdict.get("score")
    return verdict["label"] + ("" if score is None else f" {score:.2f}")
