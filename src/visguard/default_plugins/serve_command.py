"""The ``visguard serve`` command (added to the CLI through ``register_commands``, like any plugin would).

Needs the ``serve`` extra (``pip install 'visguard[serve]'``: FastAPI, uvicorn, prometheus-client).
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from visguard.hookspecs import hookimpl


def _backend_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--backend-arg")
        try:
            out[key.strip()] = json.loads(raw)  # numbers, booleans, JSON objects (limit_mm_per_prompt)
        except ValueError:
            out[key.strip()] = raw
    return out


@click.command("serve")
@click.option("--model", "-m", required=True, help="Guard model: hub id or local path (openai backend: the served name).")
@click.option("--backend", "-b", default="transformers", show_default=True, help="Guard backend: transformers, openai, vllm ...")
@click.option("--format", "format_name", default="visguard", show_default=True, help="Guard format plugin name.")
@click.option("--backend-arg", "backend_args", multiple=True, metavar="KEY=VALUE",
              help="Backend keyword argument, repeatable; JSON values (tensor_parallel_size=2, dtype=float32).")
@click.option("--guard-url", default=None, help="openai backend: base URL of the guard's server, e.g. http://guard:8000/v1.")
@click.option("--device", default="auto", show_default=True, help="transformers backend/host: cpu, cuda, cuda:1 ...")
@click.option("--host", "bind_host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--upstream", default=None, help="OpenAI-compatible base URL of the host model to guard (…/v1).")
@click.option("--upstream-model", default=None, help="The upstream's model name (default: the first it lists).")
@click.option("--api-key-env", default=None, help="Environment variable holding the upstream's API key.")
@click.option("--host-model", default=None, help="A local host model (path or hub id) to serve guarded, in process.")
@click.option("--served-model-name", default=None, help="Model name chat clients use (default: the host's).")
@click.option("--max-concurrency", type=click.IntRange(1), default=64, show_default=True,
              help="Requests served at once; more get HTTP 429.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=32.0, show_default=True,
              help="Largest request body; larger gets HTTP 413.")
@click.option("--auth-token-env", default=None, help="Environment variable with the bearer token clients must send (401 otherwise).")
@click.option("--mode", type=click.Choice(["fast", "reason", "adaptive"]), default="fast", show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="P(unsafe) threshold.")
@click.option("--on-unsafe", type=click.Choice(["refuse", "error"]), default="refuse", show_default=True,
              help="refuse: a completion with the refusal; error: HTTP 400 content_filter.")
@click.option("--on-error", type=click.Choice(["block", "allow"]), default="block", show_default=True,
              help="What an unavailable guard does (block: fail closed).")
@click.option("--pre-check", type=click.Choice(["sequential", "parallel"]), default="sequential", show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1), default=8, show_default=True, help="Micro-batch size.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True, help="Micro-batch wait.")
@click.option("--timeout-s", type=click.FloatRange(0.001), default=None, help="Per-check time limit.")
@click.option("--log-level", default="info", show_default=True)
def serve(model: str, backend: str, format_name: str, backend_args: tuple[str, ...], guard_url: str | None, device: str,
          bind_host: str, port: int, upstream: str | None, upstream_model: str | None, api_key_env: str | None,
          host_model: str | None, served_model_name: str | None, max_concurrency: int, max_body_mb: float,
          auth_token_env: str | None, mode: str, threshold: float, on_unsafe: str, on_error: str, pre_check: str,
          max_batch_size: int, max_wait_ms: float, timeout_s: float | None, log_level: str) -> None:
    """Serve a guard over HTTP, optionally as a guarded OpenAI-compatible proxy.

    Endpoints: POST /v1/guard/check, POST /v1/chat/completions (with --upstream or --host-model),
    GET /v1/models, /healthz, /readyz, /metrics. See docs/serving.md.

    Example: visguard serve --model Tuwhy/Qwen2-VL-7B-MIRage --upstream http://127.0.0.1:8000/v1
    """
    try:
        import uvicorn

        from visguard.serve.app import ServeSettings, create_app
    except ImportError as exc:
        raise click.ClickException(f"visguard serve needs the serve extra: pip install 'visguard[serve]' ({exc})") from exc
    from visguard.guard import Guard
    from visguard.policy import Policy

    if upstream and host_model:
        raise click.UsageError("give --upstream or --host-model, not both")
    token = None
    if auth_token_env:
        token = os.environ.get(auth_token_env)
        if not token:  # asked for auth: never start open by mistake
            raise click.UsageError(f"--auth-token-env names {auth_token_env}, which is unset or empty")

    kwargs = _backend_args(backend_args)
    if backend == "transformers":
        kwargs.setdefault("device", device)
    if guard_url:
        kwargs["base_url"] = guard_url
    policy = Policy(mode=mode, threshold=threshold, on_error=on_error, timeout_s=timeout_s)
    guard = Guard.from_pretrained(model, backend=backend, format=format_name, policy=policy, **kwargs)

    host: str | None = upstream or host_model
    host_options: dict[str, Any] = {}
    if upstream:
        host_options["model"] = upstream_model
        if api_key_env:
            host_options["api_key_env"] = api_key_env
    elif host_model:
        host_options["device"] = device
    settings = ServeSettings(
        model_name=served_model_name or upstream_model or (os.path.basename(host_model.rstrip("/")) if host_model else None),
        max_concurrency=max_concurrency,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        auth_token=token,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        on_unsafe=on_unsafe,
        pre_check=pre_check,
    )
    app = create_app(guard, host, settings=settings, host_options=host_options)
    if upstream and not served_model_name and not upstream_model:
        app.state.model_name = _discover_model(app)
    click.echo(f"visguard serve: guard {model!r} ({backend}) on http://{bind_host}:{port}"
               + (f", guarding {host!r} as {app.state.model_name!r}" if host else ""), err=True)
    try:
        uvicorn.run(app, host=bind_host, port=port, log_level=log_level)
    finally:
        guard.close()


def _discover_model(app: Any) -> str:
    """Ask the upstream which model it serves (its ``/models``), so clients can name it."""
    host = app.state.host
    import httpx

    try:
        resp = httpx.get(host.models_url, headers=getattr(host, "headers", None), timeout=10)
        resp.raise_for_status()
        name = str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise click.ClickException(f"cannot list the upstream's models ({exc}); pass --upstream-model") from exc
    host.model = host.model_id = name
    return name


@hookimpl
def register_commands(cli):
    cli.add_command(serve)
