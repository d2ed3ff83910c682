"""Credentials never leak (issue 10 #5): not into verdicts, HTTP answers, audit records, eval rows or the CLI.

The guard is the real ``openai`` backend pointed at URLs that carry credentials: a port nobody
listens on (connection refused, the error quotes the URL) and a server on loopback that echoes the
``Authorization`` header and the URL in a 401 body, as misconfigured proxies do.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from click.testing import CliRunner

from visguard import AuditLog, Guard, GuardUnavailableError, Policy
from visguard.cli import cli
from visguard.core.redact import redact
from visguard.eval.benchmarks import EvalItem
from visguard.eval.runner import evaluate_guard
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread

PASSWORD = "hunter2-secret-pw"
API_KEY = "sk-test-0123456789abcdef"
SECRETS = (PASSWORD, API_KEY)


def _no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into: {text[:300]}"


@pytest.fixture(scope="module")
def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://admin:{PASSWORD}@127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def echoing_url() -> Iterator[str]:
    """A server that answers 401 quoting the bearer token and the URL it was reached at."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = json.dumps({"error": f"bad credentials {self.headers.get('authorization')} "
                                        f"for http://admin:{PASSWORD}@guard.internal{self.path}?api_key={API_KEY}"})
            payload = body.encode()
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _guard(url: str, monkeypatch, **policy) -> Guard:
    monkeypatch.setenv("RELOPS_TEST_KEY", API_KEY)
    return Guard.from_pretrained("remote-guard", backend="openai", base_url=url, max_retries=0,
                                 api_key_env="RELOPS_TEST_KEY", policy=Policy(**policy))


def test_redact_masks_userinfo_bearer_tokens_and_keys():
    from visguard.core.redact import redact_fields

    text = f"GET http://u:{PASSWORD}@h/v1?api_key={API_KEY} Authorization: Bearer abc.def-ghi"
    out = redact(text)
    _no_secret(out)
    assert "abc.def-ghi" not in out and "http://***@h/v1" in out
    assert redact_fields({"a": [text, 1], "b": (text,)}) == {"a": [out, 1], "b": (out,)}


@pytest.mark.parametrize("which", ["closed", "echoing"])
def test_verdicts_and_errors_carry_no_credentials(which, closed_url, echoing_url, monkeypatch):
    """Issue 10 #5: the password in the guard URL came back in verdict.error."""
    guard = _guard(closed_url if which == "closed" else echoing_url, monkeypatch)
    try:
        verdict = guard.check_input(None, "hello")
        assert verdict.label == "unavailable"
        assert ("unreachable" if which == "closed" else "401") in verdict.error
        _no_secret(verdict.model_dump_json())
        with pytest.raises(GuardUnavailableError) as err:
            guard.with_policy(on_error="raise").check_input(None, "hello")
        _no_secret(str(err.value))
    finally:
        guard.close()


def test_http_answers_carry_no_credentials(closed_url, echoing_url, monkeypatch):
    for url in (closed_url, echoing_url):
        guard = _guard(url, monkeypatch)
        try:
            for policy, status in (("block", 200), ("raise", 503)):
                app = create_app(guard.with_policy(on_error=policy), settings=ServeSettings())
                with ServerThread(app) as server:
                    reply = httpx.post(server.url + "/v1/guard/check", json={"text": "hello"}, timeout=60)
                assert reply.status_code == status, reply.text
                assert "unavailable" in reply.text
                _no_secret(reply.text)
        finally:
            guard.close()


def test_audit_records_and_eval_rows_carry_no_credentials(tmp_path, closed_url, monkeypatch):
    guard = _guard(closed_url, monkeypatch)
    try:
        verdict = guard.check_input(None, "hello")
        with AuditLog(tmp_path / "audit.jsonl") as log:
            log.record_verdict(verdict, request_id="r1", images=[], action="block", host_model=closed_url)
        _no_secret((tmp_path / "audit.jsonl").read_text())

        items = [EvalItem(id=f"i{n}", images=(), text=f"request {n}", label="safe") for n in range(3)]
        out = tmp_path / "eval"
        summary = evaluate_guard(guard, items, out_dir=out, benchmark=closed_url, progress=False, plots=False)
        assert summary["n"] == 3
        for name in ("results.jsonl", "run.json", "summary.json", "report.md"):
            _no_secret((out / name).read_text())
        # the redacted run metadata still matches on a rerun: it resumes instead of refusing
        again = evaluate_guard(guard, items, out_dir=out, benchmark=closed_url, progress=False, plots=False)
        assert again["resumed"] == 3
    finally:
        guard.close()


def test_cli_errors_carry_no_credentials(closed_url):
    result = CliRunner().invoke(cli, ["check", "--model", "m", "--backend", "openai", "--text", "hi",
                                      "--backend-arg", f"base_url={closed_url}", "--backend-arg", "max_retries=0"])
    assert result.exit_code == 2
    assert "unreachable" in result.output
    _no_secret(result.output)
