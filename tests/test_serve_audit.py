"""``visguard serve --audit FILE``: one JSON line per decision, hashes only (issue 10 #7).

The guard is the ``faulty`` test backend plugin (healthy: ``[[unsafe]]`` in the text is unsafe;
``[[fault:raise]]`` fails that check), so every label and the ``raise`` action can be produced on
purpose; the host is a callable.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from PIL import Image

from visguard import AuditLog, Guard
from visguard.hosting.hosts import resolve_host
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread

SECRET_TEXT = "my very private question about the picture"


def _data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (1, 2, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _guard(**policy) -> Guard:
    guard = Guard.from_pretrained("faulty-guard", backend="faulty")
    return guard.with_policy(**policy) if policy else guard


def test_guard_checks_are_audited_once_each_with_hashes_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    image = _data_url()
    texts = [SECRET_TEXT, f"{SECRET_TEXT} [[unsafe]]", f"{SECRET_TEXT} [[fault:raise]]"]
    with ServerThread(create_app(_guard(), settings=ServeSettings(audit=str(path)))) as server:
        replies = [httpx.post(server.url + "/v1/guard/check", json={"images": [image], "text": t}, timeout=60)
                   for t in texts]
    assert [r.json()["label"] for r in replies] == ["safe", "unsafe", "unavailable"]
    records = AuditLog.read(path)
    assert [r["request_id"] for r in records] == [r.headers["x-visguard-request-id"] for r in replies]
    assert [r["action"] for r in records] == ["pass", "block", "block"]
    assert all(len(r["images"]) == 1 and len(r["images"][0]) == 64 for r in records)  # SHA-256, no pixels
    assert SECRET_TEXT not in path.read_text()  # no texts


def test_a_raised_decision_is_audited_too(tmp_path):
    path = tmp_path / "audit.jsonl"
    with ServerThread(create_app(_guard(on_error="raise"), settings=ServeSettings(audit=str(path)))) as server:
        reply = httpx.post(server.url + "/v1/guard/check", json={"text": "x [[fault:raise]]"}, timeout=60)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "guard_unavailable"
    (record,) = AuditLog.read(path)
    assert record["action"] == "raise" and record["label"] == "unavailable"
    assert record["request_id"] == reply.headers["x-visguard-request-id"]


def test_chat_calls_audit_every_check(tmp_path):
    path = tmp_path / "audit.jsonl"
    app = create_app(_guard(), resolve_host(lambda images, text: "a harmless answer"),
                     settings=ServeSettings(audit=str(path), model_name="host"))
    with ServerThread(app) as server:
        ok = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                        json={"model": "host", "messages": [{"role": "user", "content": SECRET_TEXT}]})
        blocked = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                             json={"model": "host", "messages": [{"role": "user", "content": "x [[unsafe]]"}]})
    records = AuditLog.read(path)
    by_call: dict[str, list[str]] = {}
    for r in records:
        by_call.setdefault(r["request_id"], []).append(f"{r['stage']}:{r['action']}")
    assert by_call == {ok.json()["visguard"]["request_id"]: ["input:pass", "output:pass"],
                       blocked.json()["visguard"]["request_id"]: ["input:block"]}
    assert SECRET_TEXT not in path.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_flag_writes_the_log(tmp_path):
    path, port = tmp_path / "serve-audit.jsonl", _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visguard.cli", "serve", "--model", "faulty-guard", "--backend", "faulty",
                             "--port", str(port), "--audit", str(path), "--log-level", "warning"],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/guard/check", json={"text": "hi"}, timeout=60)
        assert reply.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    (record,) = AuditLog.read(path)
    assert record["label"] == "safe" and record["request_id"] == reply.headers["x-visguard-request-id"]
