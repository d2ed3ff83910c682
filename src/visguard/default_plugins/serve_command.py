"""The ``visguard serve`` command (added to the CLI through ``register_commands``, like any plugin would).

Needs the ``serve`` extra (``pip install 'visguard[serve]'``: FastAPI, uvicorn, prometheus-client).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import click

from visguard.cli import (
    backend_arg_option,
    checker_from,
    config_option,
    device_option,
    format_option,
    given,
    key_values,
    mode_option,
    on_error_option,
    policy_from,
    read_config,
    say_override,
    stage_option,
    threshold_option,
)
from visguard.core.policy import DEFAULT_TIMEOUT_S
from visguard.core.redact import redact
from visguard.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from visguard.core.policy import Mode


@click.command("serve")
@click.option("--model", "-m", default=None,
              help="Guard model: hub id or local path (openai backend: the served name); or --stage, for a cascade.")
@stage_option
@config_option
@click.option("--backend", "-b", default="transformers", show_default=True, help="Guard backend: transformers, openai, vllm ...")
@format_option
@backend_arg_option
@click.option("--guard-url", default=None,
              help="Base URL of the guard's server, e.g. http://guard:8000/v1 (backends that take `base_url`).")
@device_option
@click.option("--host", "bind_host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--upstream", default=None, help="OpenAI-compatible base URL of the host model to guard (…/v1).")
@click.option("--upstream-model", default=None, help="The upstream's model name (default: the first it lists).")
@click.option("--api-key-env", default=None, help="Environment variable holding the upstream's API key.")
@click.option("--host-model", default=None, help="A local host model (path or hub id) to serve guarded, in process.")
@click.option("--host-arg", "host_args", multiple=True, metavar="KEY=VALUE",
              help="Host keyword argument, repeatable; JSON values (timeout_s=120, system_prompt=...).")
@click.option("--served-model-name", default=None, help="Model name chat clients use (default: the host's).")
@click.option("--max-concurrency", type=click.IntRange(1), default=64, show_default=True,
              help="Requests served at once; more get HTTP 429.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=32.0, show_default=True,
              help="Largest request body; larger gets HTTP 413.")
@click.option("--auth-token-env", default=None, help="Environment variable with the bearer token clients must send (401 otherwise); "
                   "several, comma-separated: one per tenant, each with its own guard cache salt.")
@mode_option
@threshold_option
@click.option("--on-unsafe", type=click.Choice(["refuse", "safe_answer", "error"]), default="refuse", show_default=True,
              help="refuse: a completion with the refusal; safe_answer: with the guard's own safe reply "
                   "(mirage format, --mode reason), else the refusal; error: HTTP 400 content_filter.")
@on_error_option
@click.option("--pre-check", type=click.Choice(["sequential", "parallel"]), default="sequential", show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1), default=8, show_default=True, help="Micro-batch size.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True, help="Micro-batch wait.")
@click.option("--timeout-s", type=click.FloatRange(0.001), default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Per-check time limit, queueing included; past it the check is unavailable.")
@click.option("--allow-remote-images", is_flag=True,
              help="Fetch http(s) image URLs that clients send (off: only data URLs; paths are never read).")
@click.option("--audit", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per decision to this file (verdict, action, image hashes; no texts).")
@click.option("--log-level", default="info", show_default=True)
@click.pass_context
def serve(ctx: click.Context, model: str | None, stages: tuple[str, ...], config_file: str | None, backend: str, format_name: str | None, backend_args: tuple[str, ...], guard_url: str | None, device: str,
          bind_host: str, port: int, upstream: str | None, upstream_model: str | None, api_key_env: str | None,
          host_model: str | None, host_args: tuple[str, ...], served_model_name: str | None, max_concurrency: int, max_body_mb: float,
          auth_token_env: str | None, mode: Mode | None, threshold: float,
          on_unsafe: Literal["refuse", "safe_answer", "error"], on_error: Literal["block", "allow"],
          pre_check: Literal["sequential", "parallel"],
          max_batch_size: int, max_wait_ms: float, timeout_s: float, allow_remote_images: bool, audit: str | None,
          log_level: str) -> None:
    """Serve a guard over HTTP, optionally as a guarded OpenAI-compatible proxy.

    Endpoints: POST /v1/guard/check, POST /v1/moderations, POST /v1/chat/completions (with --upstream
    or --host-model; with --upstream a transparent passthrough), POST /v1/responses (with --upstream),
    GET /v1/models, /healthz, /readyz, /metrics. See docs/serving.md.

    \b
    Examples:
      visguard serve --model Tuwhy/Qwen2-VL-7B-MIRage --upstream http://127.0.0.1:8000/v1
      visguard serve --stage Qwen/Qwen3Guard-Gen-0.6B --stage yueliu1999/GuardReasoner-VL-3B \\
          --upstream http://127.0.0.1:8000/v1
      visguard serve --config examples/configs/cascade-proxy.toml

    With --config FILE, the file's guard or cascade, policy and [serve] table are used; flags given
    on the command line override them (each said on stderr).
    """
    try:
        import uvicorn

        from visguard.integrations.openai.server.app import create_app
    except ImportError as exc:
        raise click.ClickException(f"visguard serve needs the serve extra: pip install 'visguard[serve]' ({exc})") from exc

    from visguard import plugins
    from visguard.config import ServeSpec
    from visguard.hosting.hosts import default_host_name

    config = read_config(config_file)  # the whole file is checked (env variables too) before anything loads
    # the [serve] table, then each flag given on the command line (without a file: every flag)
    spec_flags: dict[str, Any] = {"host": bind_host, "port": port, "upstream": upstream, "upstream_model": upstream_model,
                  "api_key_env": api_key_env, "host_model": host_model, "served_model_name": served_model_name,
                  "max_concurrency": max_concurrency, "max_body_mb": max_body_mb, "auth_token_env": auth_token_env,
                  "on_unsafe": on_unsafe, "pre_check": pre_check, "max_batch_size": max_batch_size,
                  "max_wait_ms": max_wait_ms, "audit": audit}
    option_of = {"host": "bind_host"}
    if config is None:
        spec = ServeSpec.model_validate({k: v for k, v in spec_flags.items() if v is not None})
    else:
        changes = {}
        for key, value in spec_flags.items():
            if given(ctx, option_of.get(key, key)):
                changes[key] = value
                say_override("host" if key == "host" else key, value, f"serve.{key}", config_file)
        spec = ServeSpec.model_validate({**config.serve.model_dump(), **changes})
    if spec.upstream and spec.host_model:
        raise click.UsageError("give --upstream or --host-model (serve.upstream or serve.host_model), not both")
    if spec.auth_token_env and not os.environ.get(spec.auth_token_env, "").replace(",", "").strip():
        # asked for auth: never start open by mistake
        raise click.UsageError(f"--auth-token-env names {spec.auth_token_env}, which is unset or empty")

    if guard_url and not stages and config is None and "base_url" not in plugins.option_names(plugins.get("backends", backend)):
        raise click.UsageError(f"--guard-url: the {backend!r} backend takes no base_url")
    policy = policy_from(config, ctx, config_file, mode=("mode", mode), threshold=("threshold", threshold),
                         on_error=("on_error", on_error), timeout_s=("timeout_s", timeout_s))
    if config is None or given(ctx, "allow_remote_images"):
        policy = policy.updated(limits=policy.limits.model_copy(update={"allow_remote": allow_remote_images}))
    guard = checker_from(config, ctx, config_file, model, stages, policy=policy, backend=backend,
                         format_name=format_name, backend_args=backend_args, device=device, base_url=guard_url)

    host: str | None = spec.upstream or spec.host_model
    host_options: dict[str, Any] = {}
    if host:
        shorthands = ({"model": spec.upstream_model, "api_key_env": spec.api_key_env} if spec.upstream
                      else {"device": device})
        host_options = {**plugins.supported_options("hosts", default_host_name(host), shorthands),
                        **spec.host_options, **key_values(host_args, "--host-arg")}
    settings = spec.settings()
    bind_host, port, served_model_name, upstream_model = spec.host, spec.port, spec.served_model_name, spec.upstream_model
    upstream = spec.upstream
    app = create_app(guard, host, settings=settings, host_options=host_options)
    if upstream and not served_model_name and not upstream_model:
        app.state.model_name = _discover_model(app)
    about = guard.describe()
    click.echo(redact(f"visguard serve: guard {about['model']!r} ({about['backend']}) on http://{bind_host}:{port}"
                      + (f", guarding {host!r} as {app.state.model_name!r}" if host else "")), err=True)
    try:
        uvicorn.run(app, host=bind_host, port=port, log_level=log_level)
    finally:
        guard.close()


def _discover_model(app: Any) -> str:
    """Ask the upstream which model it serves (:meth:`Host.served_model`), so clients can name it."""
    from visguard.core.errors import VisguardError

    try:
        return app.state.host.served_model()
    except VisguardError as exc:
        raise click.ClickException(f"cannot list the upstream's models ({exc}); pass --upstream-model") from exc


@hookimpl
def register_commands(cli):
    cli.add_command(serve)
