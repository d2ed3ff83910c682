"""The ``visguard`` command line.

Built-in commands: ``check`` and ``plugins``. Plugins add more (``train``, ``eval``, ``serve`` ...)
through the ``register_commands(cli)`` hook, exactly as a third-party plugin would.

Exit codes of ``check``: 0 safe, 1 unsafe, 2 unavailable or a usage/input error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from visguard import plugins
from visguard.core.errors import VisguardError

if TYPE_CHECKING:  # pragma: no cover
    from visguard.config import VisguardConfig
    from visguard.core.policy import Mode, Policy
    from visguard.engine.checker import Checker

EXIT_SAFE, EXIT_UNSAFE, EXIT_ERROR = 0, 1, 2


def key_values(pairs: tuple[str, ...], option: str = "--backend-arg") -> dict[str, Any]:
    """``KEY=VALUE`` pairs as keyword arguments; values are JSON where they parse (numbers, booleans, objects).

    Raises:
        click.BadParameter: a pair has no ``=`` or an empty key.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        try:
            out[key.strip()] = json.loads(raw)  # numbers, booleans, JSON objects (limit_mm_per_prompt)
        except ValueError:
            out[key.strip()] = raw
    return out


def backend_kwargs(backend: str, backend_args: tuple[str, ...], **shorthands: Any) -> dict[str, Any]:
    """A backend's keyword arguments: ``--backend-arg`` pairs, plus the shorthands it declares.

    Shorthand options (``--device``, ``--base-url`` ...) go only to backends that name them among
    their parameters (:func:`visguard.plugins.supported_options`); ``--backend-arg`` wins over them.
    """
    return {**plugins.supported_options("backends", backend, shorthands), **key_values(backend_args)}


#: ``--backend-arg`` as every command spells it
backend_arg_option = click.option(
    "--backend-arg", "backend_args", multiple=True, metavar="KEY=VALUE",
    help="Backend keyword argument, repeatable; JSON values (dtype=float32, tensor_parallel_size=2, base_url=...).")

#: ``--stage`` as ``check``, ``eval`` and ``serve`` spell it
stage_option = click.option(
    "--stage", "stages", multiple=True, metavar="MODEL[@FORMAT[@BACKEND]]",
    help="Use a cascade of guards instead of one --model: one stage per --stage, cheapest first (repeatable). "
         "A stage decides unless its P(unsafe) is unsure (0.2-0.8) or it has no verdict; then the next stage "
         "judges, and the last one always decides. FORMAT defaults to the checkpoint's own, BACKEND to --backend; "
         "--backend-arg, --device, --threshold and --mode (where a stage's format runs in it) apply to every "
         "stage. See docs/cascades.md.")


# ---------------------------------------------------------------------------------- shared options
# One definition of each option that several commands take (check, eval, serve, plugins' commands).

#: ``--mode`` as every command spells it
mode_option = click.option(
    "--mode", type=click.Choice(["fast", "reason", "adaptive"]), default=None,
    help="Default: the format's own (fast for visguard, reason for mirage). fast: one forward pass; "
         "reason: generate perception + reasoning first; adaptive: reason only when unsure.")

#: ``--threshold``
threshold_option = click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                                help="P(unsafe) threshold.")

#: ``--max-new-tokens`` (the guard's reasoning budget)
max_new_tokens_option = click.option("--max-new-tokens", type=click.IntRange(1), default=512, show_default=True,
                                     help="Guard reasoning budget (reason mode). The mirage format keeps its "
                                          "own 1024 (the MIS inference script's) unless another value than "
                                          "512 is given.")

#: ``--on-error``
on_error_option = click.option("--on-error", type=click.Choice(["block", "allow"]), default="block", show_default=True,
                               help="What an unavailable guard does (block: fail closed).")

#: ``--device``
device_option = click.option(
    "--device", default="auto", show_default=True,
    help="Where local backends / hosts run (cpu, cuda, cuda:1 ...): passed to those that take `device`.")

#: ``--format``
format_option = click.option(
    "--format", "format_name", default=None,
    help="Guard format plugin name (default: the checkpoint's own, e.g. mirage for the MIRage ids, else visguard).")

#: ``--config``
config_option = click.option(
    "--config", "config_file", default=None, metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
    help="A visguard configuration file (TOML: guards, cascades, policy, serving; docs/configuration.md). "
         "Flags given on the command line override it (each override is said on stderr).")


def given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not its default)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def read_config(file: str | None) -> VisguardConfig | None:
    """The configuration ``--config`` names (checked in full before any model loads), or ``None``."""
    if file is None:
        return None
    from visguard.config import load_config

    return load_config(file)


def policy_from(config: VisguardConfig | None, ctx: click.Context, file: str | None = None,
                **flags: tuple[str, Any]) -> Policy:
    """The policy: the file's (or the default), with each flag given on the command line applied.

    ``flags`` maps a policy field to ``(option name, value)``; without a file every flag applies
    (its default included); with one, only the flags given, each said on stderr.
    """
    from visguard.core.policy import Policy

    if config is None:
        return Policy(**{field: value for field, (_, value) in flags.items()})
    changes = {}
    for field, (option, value) in flags.items():
        if given(ctx, option):
            changes[field] = value
            say_override(option, value, f"policy.{field}", file)
    return config.policy.updated(**changes) if changes else config.policy


def say_override(option: str, value: Any, key: str, file: str | None) -> None:
    """One line on stderr: a command-line flag overrides the configuration file."""
    flag = "--" + option.replace("_", "-")
    click.echo(f"visguard: {flag} {value} overrides {key} of {file}", err=True)


def checker_from(config: VisguardConfig | None, ctx: click.Context, file: str | None, model: str | None,
                 stages: tuple[str, ...], *, policy: Policy, backend: str, format_name: str | None,
                 backend_args: tuple[str, ...] = (), ignore_unread: bool = False, **shorthands: Any) -> Checker:
    """The checker of a command: ``--model`` / ``--stage`` (:func:`load_checker`), else the file's
    guard or cascade (:meth:`VisguardConfig.build`) with ``policy``; ``--device``,
    ``--backend-arg`` and ``--mode``, when given, apply to every guard of the file (each said on stderr)."""
    if config is None or model or stages:
        if config is not None:
            click.echo(f"visguard: {'--model' if model else '--stage'} overrides the guards of {file}", err=True)
        return load_checker(model, stages, backend=backend, format_name=format_name, policy=policy,
                            backend_args=backend_args, ignore_unread=ignore_unread, **shorthands)
    guards = dict(config.guards)
    if given(ctx, "device") and shorthands.get("device") is not None:
        say_override("device", shorthands["device"], "guards.*.device", file)
        guards = {n: g.model_copy(update={"device": shorthands["device"]}) for n, g in guards.items()}
    if backend_args:
        say_override("backend_arg", " ".join(backend_args), "guards.*.options", file)
        extra = key_values(backend_args)
        guards = {n: g.model_copy(update={"options": {**g.options, **extra}}) for n, g in guards.items()}
    if ignore_unread:
        guards = {n: g.model_copy(update={"ignore_unread": True}) for n, g in guards.items()}
    if "mode" in ctx.params and given(ctx, "mode") and any(g.mode for g in guards.values()):
        say_override("mode", ctx.params["mode"], "guards.*.mode", file)  # --mode wins over a guard's own
        guards = {n: g.model_copy(update={"mode": None}) for n, g in guards.items()}
    return config.model_copy(update={"guards": guards}).build(policy=policy)


def parse_guard_spec(spec: str, backend: str, option: str = "--stage") -> tuple[str, str | None, str]:
    """``MODEL[@FORMAT[@BACKEND]]`` as ``(model, format or None, backend)`` (``backend``: the default).

    Raises:
        click.BadParameter: no model, or more than three parts.
    """
    parts = spec.split("@")
    if not parts[0] or len(parts) > 3:
        raise click.BadParameter(f"expected MODEL[@FORMAT[@BACKEND]], got {spec!r}", param_hint=option)
    name, fmt, be = (parts + ["", ""])[:3]
    return name, fmt or None, be or backend


def load_checker(model: str | None, stages: tuple[str, ...], *, backend: str, format_name: str | None, policy: Policy,
                 backend_args: tuple[str, ...] = (), ignore_unread: bool = False, **shorthands: Any) -> Checker:
    """The guard ``--model`` names, or the :class:`~visguard.engine.cascade.Cascade` of the ``--stage`` guards.

    Each stage is a one-guard :class:`~visguard.engine.cascade.Stage` with the defaults (``escalate="unsure"``,
    band 0.2-0.8); ``policy`` is every stage's, except that a stage whose format cannot run
    ``policy.mode`` runs in its own. ``shorthands`` (``device``, ``base_url``) go to the backends
    that take them (:func:`backend_kwargs`).

    Raises:
        click.UsageError: both or neither of ``model`` and ``stages``; ``format_name`` with stages.
    """
    from visguard.engine.cascade import Cascade
    from visguard.engine.guard import Guard, resolve_format

    if model and stages:
        raise click.UsageError("give --model (one guard) or --stage (a cascade), not both")
    if not stages:
        if not model:
            raise click.UsageError("missing --model (a guard), or --stage (a cascade, repeatable)")
        return Guard.from_pretrained(model, backend=backend, format=format_name, policy=policy,
                                     **backend_kwargs(backend, backend_args, **shorthands))
    if format_name:
        raise click.UsageError("--format applies to --model; name a stage's format as --stage MODEL@FORMAT")
    specs = [parse_guard_spec(spec, backend) for spec in stages]
    guards: list[Guard] = []
    try:
        for name, fmt, be in specs:
            guard_format = resolve_format(name, fmt)
            if ignore_unread:
                guard_format.ignore_unread = True
            guard = Guard.from_pretrained(name, backend=be, format=guard_format, policy=policy.updated(mode=None),
                                          **backend_kwargs(be, backend_args, **shorthands))
            guards.append(guard)
            if policy.mode is not None and policy.mode in guard.capabilities.modes:
                guards[-1] = guard.with_policy(mode=policy.mode)
    except BaseException:
        for loaded in guards:
            loaded.close()
        raise
    return Cascade(guards)


class _Group(click.Group):
    """Turns every error into a one-line message and exit code 2 (no traceback).

    Exit code 1 means "unsafe" for ``check``, so a crash must never exit with it. Set
    ``VISGUARD_DEBUG=1`` to see the traceback of an unexpected (non-visguard) error.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except VisguardError as exc:
            click.echo(f"Error: {one_line(exc)}", err=True)
            ctx.exit(EXIT_ERROR)
        except Exception as exc:  # noqa: BLE001 - never a traceback, never the "unsafe" exit code
            if os.environ.get("VISGUARD_DEBUG"):
                raise
            click.echo(f"Error: unexpected {type(exc).__name__}: {one_line(exc)} (VISGUARD_DEBUG=1 shows the traceback)",
                       err=True)
            ctx.exit(EXIT_ERROR)


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An error's message on one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="visguard")
def cli() -> None:
    """visguard: safety guardrails for vision-language models.

    Run a guard model on images + text (and optionally a model's response) and get a verdict:
    safe, unsafe or unavailable. `visguard COMMAND --help` explains each command.
    """


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=str))  # checked by the image boundary
@click.option("--model", "-m", default=None,
              help="Guard model: hub id or local path (or --stage, for a cascade; or --config).")
@stage_option
@config_option
@click.option("--text", "-t", default="", help="The user's request that comes with the images.")
@click.option("--response", "-r", default=None, help="The host model's answer: makes this a post-check.")
@mode_option
@click.option("--backend", "-b", default="transformers", show_default=True, help="Backend plugin name.")
@format_option
@threshold_option
@max_new_tokens_option
@backend_arg_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option("--explain", is_flag=True,
              help="Also score the text alone, each image with the text and subsets of the images with it (one "
                   "batched pass) and "
                   "say which carry the harm: a single image, the text, or only the combination (one guard, "
                   "not a cascade; formats with a fast score and any image count).")
@click.pass_context
def check(ctx: click.Context, images: tuple[str, ...], model: str | None, stages: tuple[str, ...],
          config_file: str | None, text: str, response: str | None, mode: Mode | None, backend: str,
          format_name: str | None, threshold: float, max_new_tokens: int, backend_args: tuple[str, ...], device: str,
          as_json: bool, explain: bool) -> None:
    """Check IMAGES (zero or more files) plus --text with a guard model (or a cascade: --stage, --config).

    Exit code: 0 safe, 1 unsafe, 2 unavailable (guard error or unparseable output) or bad input.
    With --config, the file's policy decides (per-category thresholds and actions): a verdict that
    is unsafe only in log-only categories exits 0 (flagged: "action flag").

    \b
    Examples:
      visguard check --model Tuwhy/Qwen2-VL-7B-MIRage --text "use image 1 on image 2" a.png b.png
      visguard check --stage Qwen/Qwen3Guard-Gen-0.6B --stage yueliu1999/GuardReasoner-VL-3B --text "..."
      visguard check --config examples/configs/mirage.toml --text "..." a.png
    """
    from visguard.core.types import GuardRequest
    from visguard.engine.checker import enforce

    config = read_config(config_file)  # the whole file is checked before anything loads
    policy = policy_from(config, ctx, config_file, mode=("mode", mode), threshold=("threshold", threshold),
                         max_new_tokens=("max_new_tokens", max_new_tokens))
    # Inputs first: a bad image or text is reported before minutes of model loading.
    request = GuardRequest.build(list(images), text, response, limits=policy.limits)
    if explain and stages:
        raise click.UsageError("--explain attributes one guard's verdict: give --model, not --stage")
    guard = checker_from(config, ctx, config_file, model, stages, policy=policy, backend=backend,
                         format_name=format_name, backend_args=backend_args, device=device)
    if explain:
        from visguard.engine.attribution import explaining

        guard = explaining(guard)  # a cascade (--config): refused, one line, exit 2
    verdict = enforce(guard, guard.report_batch([request]))[0]
    action = guard.policy.action(verdict)
    if as_json:
        click.echo(verdict.model_dump_json(indent=2))
    else:
        _print_verdict(verdict)
        if config is not None:
            click.echo(f"{'action':<9}  {action}")
        if explain:
            _print_attribution(verdict, images)
    if verdict.label == "unavailable":
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_UNSAFE if action == "block" else EXIT_SAFE)


def _print_attribution(verdict: Any, images: tuple[str, ...]) -> None:
    """``--explain``: the summary line, then one row per scored subset (P(unsafe), parts)."""
    found = verdict.attribution
    if found is None:
        click.echo("attribution  - (no attribution: the subsets were not scored)")
        return
    click.echo(f"attribution  {found.summary}: {found.detail}")
    click.echo(f"  {'P(unsafe)':>9}  {'':<6}  subset")
    for row in found.rows:
        names = [f"image {i} ({os.path.basename(images[i])})" if i < len(images) else f"image {i}" for i in row.subset]
        parts = " + ".join(names + (["text"] if row.includes_text else []))
        mark = "unsafe" if row.score >= found.threshold else ""
        click.echo(f"  {row.score:>9.4f}  {mark:<6}  {parts}")


def _print_verdict(verdict: Any) -> None:
    rows = [
        ("label", verdict.label),
        ("P(unsafe)", "-" if verdict.score is None else f"{verdict.score:.4f}"),
        ("category", " / ".join(x for x in (verdict.category, verdict.sub_category) if x) or "-"),
        ("stage", verdict.stage),
        ("mode", verdict.mode),
        ("model", verdict.model),
        ("latency", f"{verdict.latency_ms:.1f} ms"),
    ]
    for i, part in enumerate(verdict.stages, 1):  # a cascade: every stage guard's verdict, in order
        score = "" if part.score is None else f" {part.score:.4f}"
        rows.append((f"stage {i}", f"{part.model}: {part.label}{score}"))
    if verdict.error:
        rows.append(("error", verdict.error))
    if verdict.reasoning:
        rows.append(("reasoning", verdict.reasoning.replace("\n", " | ")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, the hooks each implements and what each registers."""
    info = plugins.describe()
    formats = {name: getattr(factory, "capabilities", None) for name, factory in sorted(plugins.registry("formats").items())}
    if as_json:
        for p in info:
            if p["provides"].get("formats"):
                p["capabilities"] = {n: dataclasses.asdict(c) if (c := formats.get(n)) else None for n in p["provides"]["formats"]}
        click.echo(json.dumps(info, indent=2))
        return
    for p in info:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["provides"].items() if v)
        click.echo(f"{p['name']}  [{p['distribution'] or '?'}]  hooks: {', '.join(p['hooks'])}")
        if provides:
            click.echo(f"    {provides}")
    click.echo("\nformats (what each can judge):")
    width = max((len(n) for n in formats), default=0)
    for name, caps in formats.items():
        click.echo(f"  {name:<{width}}  {caps.summary() if caps is not None else '(capabilities not declared)'}")


@cli.group("config")
def config_group() -> None:
    """Configuration files: guards, cascades, the policy and serving in one TOML file (docs/configuration.md)."""


@config_group.command("schema")
def config_schema_command() -> None:
    """Print the JSON Schema of a configuration file (for editors; docs/configuration.md lists every key)."""
    from visguard.config import config_schema

    click.echo(json.dumps(config_schema(), indent=2))


@config_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
def config_validate_command(file: str) -> None:
    """Check FILE without loading any model: every error on its own line (FILE:LINE: key.path: what is
    expected), exit 2; exit 0 and one line when it is valid."""
    from visguard.config import ConfigError, load_config

    try:
        config = load_config(file)
    except ConfigError as exc:
        for line in exc.lines():
            click.echo(f"Error: {line}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"{file}: valid ({len(config.guards)} guards, {len(config.cascades)} cascades; "
               f"runs {config.target()!r})")


@config_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
def config_show_command(file: str) -> None:
    """Print FILE resolved (every default filled in) as JSON; secrets masked (only whether each named
    environment variable is set)."""
    from visguard.config import load_config

    click.echo(json.dumps(load_config(file).resolved(), indent=2))


_commands_registered = False


def _register_plugin_commands() -> None:
    global _commands_registered
    if not _commands_registered:
        plugins.load_plugins()
        plugins.pm.hook.register_commands(cli=cli)
        _commands_registered = True


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        _register_plugin_commands()
    except VisguardError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    cli.main(args=argv, prog_name="visguard")


if __name__ == "__main__":  # pragma: no cover
    main()
