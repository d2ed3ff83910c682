"""Load on loopback: 32 clients for 30 s against ``visguard serve`` (``/v1/guard/check`` and the chat proxy).

Real pieces: the ``visguard serve`` CLI in its own process (the tiny Qwen2-VL guard on the
transformers backend, ``--max-concurrency 8``, ``--audit FILE``) in front of the upstream app
serving the tiny Qwen2-VL host. 32 asyncio clients (httpx) send guard checks, chat completions and
streamed chat completions, each with an image, as fast as they are answered. Promised:

- no 5xx, and no other status than 200 or 429;
- above ``--max-concurrency`` the server answers 429 with ``Retry-After`` (the server's own
  rejection counter agrees with what the clients saw);
- every decision is audited exactly once: the audit log holds one record per guard check and, per
  chat call, one per check the call reports (pre-check plus post-checks), under the request id
  the client got; no record for a refused request, none missing, none twice;
- slow senders (issue 24, item 10): during the last seconds of the run, 4 more clients send a
  request's headers and then trickle its body one byte a second; while they are mid-body the
  server's in-flight gauge is 0 (a trickling client holds none of the ``--max-concurrency`` slots,
  it is cut off with 408 after ``read_timeout_s``).

Marked ``load``: deselected by default, run by ``make test-load`` (part of ``make test``, so CI runs
it). ``VISGUARD_LOAD_SECONDS`` shortens or lengthens the run; ``VISGUARD_LOAD_REPORT=FILE`` writes
the figures as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from visguard import AuditLog, plugins
from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app

pytestmark = pytest.mark.load

CLIENTS = 32
MAX_CONCURRENCY = 8
DURATION_S = float(os.environ.get("VISGUARD_LOAD_SECONDS", "30"))
HOST_MODEL = "tiny-host"


def _data_url(seed: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32 + seed % 7, 24 + seed % 5), (seed * 37 % 256, 90, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream(qwen_path):
    host = plugins.get("hosts", "transformers")(qwen_path, device="cpu", dtype="float32", max_new_tokens=8)
    with ServerThread(create_upstream_app(host, model_name=HOST_MODEL)) as server:
        yield server.url + "/v1"
    host.close()


@pytest.fixture(scope="module")
def server(qwen_path, upstream, tmp_path_factory):
    audit = tmp_path_factory.mktemp("load") / "audit.jsonl"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "visguard.cli", "serve", "--model", qwen_path, "--device", "cpu",
         "--upstream", upstream, "--upstream-model", HOST_MODEL, "--port", str(port),
         "--max-concurrency", str(MAX_CONCURRENCY), "--audit", str(audit), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "visguard serve did not start"
        time.sleep(0.2)
    yield url, audit
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


class _Tally:
    def __init__(self) -> None:
        self.status: Counter[tuple[str, int]] = Counter()
        self.expected: dict[str, int] = {}  # request id -> audit records it must have
        self.kind: dict[str, str] = {}
        self.no_retry_after = 0
        self.errors: list[str] = []


async def _client(n: int, url: str, deadline: float, tally: _Tally) -> None:
    image = _data_url(n)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        i = 0
        while time.monotonic() < deadline:
            kind = ("check", "chat", "stream")[(n + i) % 3]
            text = f"client {n} request {i}: what does the picture show?"
            try:
                rid, checks, status, retry_after = await _one(client, kind, image, text)
            except httpx.HTTPError as exc:  # a lost request is a failure, never skipped
                tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                i += 1
                continue
            tally.status[(kind, status)] += 1
            if status == 429:
                tally.no_retry_after += not retry_after
                await asyncio.sleep(0.05)  # back off a little, as clients do (not an ordering device)
            if status == 200:
                assert rid and rid not in tally.expected, f"request id {rid!r} missing or repeated"
                tally.expected[rid], tally.kind[rid] = checks, kind
            i += 1


async def _one(client: httpx.AsyncClient, kind: str, image: str, text: str) -> tuple[str, int, int, bool]:
    """(request id, decisions it made, HTTP status, Retry-After present) of one request."""
    if kind == "check":
        r = await client.post("/v1/guard/check", json={"images": [image], "text": text})
        return r.headers.get("x-visguard-request-id", ""), 1, r.status_code, "retry-after" in r.headers
    body = {"model": HOST_MODEL, "max_tokens": 8, "stream": kind == "stream",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": text}]}]}
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return "", 0, r.status_code, "retry-after" in r.headers
        return _decisions(r.json()["visguard"]) + (200, False)
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return "", 0, r.status_code, "retry-after" in r.headers
        summary = None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                summary = event.get("visguard", summary)
        assert summary is not None, "stream ended without its visguard summary"
        return _decisions(summary) + (200, False)


SLOW_SENDERS = 4


async def _slow_sender(url: str, stop: asyncio.Event) -> None:
    """Send a guard check's headers, then its body one byte a second until ``stop`` (slowloris)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"images": [], "text": "x" * 200}).encode()
    writer.write(f"POST /v1/guard/check HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    await writer.drain()
    try:
        for byte in body[:-1]:  # never the last byte: the request stays incomplete
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
                return
            except TimeoutError:
                continue
    finally:
        writer.close()


def _decisions(summary: dict) -> tuple[str, int]:
    return summary["request_id"], (summary["input_verdict"] is not None) + summary["output_checks"]


def test_32_clients_for_30_seconds(server):
    url, audit = server
    tally = _Tally()
    start = time.monotonic()

    inflight_with_slow_senders: list[float] = []

    async def main() -> None:
        deadline = time.monotonic() + DURATION_S
        stop = asyncio.Event()

        async def slow_senders() -> None:
            await asyncio.sleep(max(0.0, DURATION_S - 10.0))  # mid-body when the others finish
            await asyncio.gather(*(_slow_sender(url, stop) for _ in range(SLOW_SENDERS)))

        slow = asyncio.ensure_future(slow_senders())
        await asyncio.gather(*(_client(n, url, deadline, tally) for n in range(CLIENTS)))
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            text = (await client.get("/metrics")).text
        gauge = re.search(r"^visguard_http_inflight_requests (\S+)$", text, re.M)
        inflight_with_slow_senders.append(float(gauge.group(1)) if gauge else float("nan"))
        stop.set()
        await slow

    asyncio.run(main())
    elapsed = time.monotonic() - start
    metrics = httpx.get(url + "/metrics", timeout=30).text

    assert not tally.errors, tally.errors[:5]
    statuses = Counter(status for (_, status), count in tally.status.items() for _ in range(count))
    assert set(statuses) <= {200, 429}, statuses  # no 5xx, nothing else either
    served = statuses[200]
    refused = statuses[429]
    assert refused > 0 and tally.no_retry_after == 0  # 32 clients over a limit of 8
    rejected = re.search(r'visguard_http_rejected_total\{reason="overloaded"\} (\d+)', metrics)
    assert rejected and int(float(rejected.group(1))) == refused
    for kind in ("check", "chat", "stream"):
        assert tally.status[(kind, 200)] > 0, f"no {kind} request was served"
    assert inflight_with_slow_senders == [0.0], f"slow senders held slots: {inflight_with_slow_senders}"

    records = AuditLog.read(audit)
    per_request = Counter(r["request_id"] for r in records)
    assert set(per_request) == set(tally.expected), "audit records for requests never served, or missing ones"
    wrong = {rid: (per_request[rid], want) for rid, want in tally.expected.items() if per_request[rid] != want}
    assert not wrong, f"decisions not audited exactly once: {list(wrong.items())[:5]}"
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for r in records for h in r["images"])

    figures = {
        "clients": CLIENTS, "seconds": round(elapsed, 1), "max_concurrency": MAX_CONCURRENCY,
        "served": served, "rejected_429": refused, "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "by_kind": {f"{k}:{s}": v for (k, s), v in sorted(tally.status.items())},
        "decisions_audited": len(records), "decisions_expected": sum(tally.expected.values()),
        "lost_or_duplicated": sum(abs(per_request[rid] - want) for rid, want in tally.expected.items()),
        "slow_senders": SLOW_SENDERS, "inflight_while_slow_senders_mid_body": inflight_with_slow_senders[0],
    }
    print("load figures:", json.dumps(figures), file=sys.stderr)
    if os.environ.get("VISGUARD_LOAD_REPORT"):
        Path(os.environ["VISGUARD_LOAD_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")
