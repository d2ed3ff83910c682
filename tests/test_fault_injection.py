"""Fault injection: whatever breaks, the default policy gives ``unavailable``, never ``safe``.

Three kinds of faulty guard, all reached the way users reach backends:

- the ``faulty`` test backend plugin (``visguard_testing.faults``, registered through the
  ``visguard`` entry point of visguard-testing): raise, hang, MemoryError, garbage, NaN and ``None``
  scores, too few results, failed loads;
- the real ``transformers`` backend on the tiny Qwen2-VL checkpoint, with the fault planted in the
  model's forward pass (a forward hook that raises, runs out of memory, hangs or returns NaN logits);
- the real ``openai`` backend against a scripted HTTP server on loopback that answers HTTP 500,
  closes the connection, sends garbage, NaN logprobs or hangs.

Hangs wait on ``threading.Event`` objects; nothing sleeps to order events.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from visguard_testing.faults import FaultyBackend

from visguard import Guard, GuardUnavailableError, Policy, plugins
from visguard.core.errors import BackendError, VisguardError
from visguard.core.policy import DEFAULT_TIMEOUT_S

MODES = ("fast", "reason", "adaptive")
#: faults that end a call at once (the hang has tests of its own)
QUICK_FAULTS = ("raise", "memory", "garbage", "nan", "none", "short")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def faulty_guard(fault: str = "ok", **policy) -> Guard:
    """A guard on the ``faulty`` backend, built through the plugin registry as users would."""
    return Guard.from_pretrained("faulty-guard", backend="faulty", fault=fault, policy=Policy(**policy))


def _join_stalled(guard: Guard) -> None:
    with guard.batcher._lock:
        stuck = list(guard.batcher._stalled)
    for thread in stuck:
        thread.join(30)
        assert not thread.is_alive()


# ------------------------------------------------------------------ the faulty plugin backend


def test_the_faulty_backend_is_a_plugin_and_healthy_by_default():
    assert "faulty" in plugins.registry("backends")
    guard = faulty_guard()
    assert isinstance(guard.backend, FaultyBackend)
    assert guard.check_input(None, "hello").label == "safe"
    assert guard.check_input(None, "hello [[unsafe]]").label == "unsafe"
    assert guard.with_policy(mode="reason").check_input(None, "x [[unsafe]]").category == "Violent"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", QUICK_FAULTS)
def test_every_fault_is_unavailable_and_blocks_by_default(fault, mode):
    guard = faulty_guard(fault, mode=mode)
    verdict = guard.check_input(None, "a harmless request")
    assert verdict.label == "unavailable" and verdict.error, verdict
    assert guard.policy.action(verdict) == "block" and not guard.allows(verdict)
    assert guard.backend.faults == {fault: guard.backend.calls} and guard.backend.calls >= 1
    with pytest.raises(GuardUnavailableError):
        guard.with_policy(on_error="raise").check_input(None, "a harmless request")


@pytest.mark.parametrize("fault", [*QUICK_FAULTS, "hang"])
def test_a_fault_marker_in_the_request_fails_that_request_only(fault):
    guard = faulty_guard(timeout_s=0.3 if fault == "hang" else DEFAULT_TIMEOUT_S)
    try:
        bad = guard.check_input(None, f"please [[fault:{fault}]]")
        assert bad.label == "unavailable", bad
        if fault == "hang":
            assert "timed out" in bad.error
        assert guard.with_policy(timeout_s=DEFAULT_TIMEOUT_S).check_input(None, "please").label == "safe"
    finally:
        guard.backend.release.set()
        _join_stalled(guard)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", ["raise", "memory", "short"])
def test_a_failing_request_does_not_fail_the_requests_batched_with_it(fault, mode):
    """A batch whose backend call fails is checked again request by request: only the faulty request
    is unavailable (in a server, the others may be other callers' requests that shared the batch).
    The faults that raise; garbage outputs are read per request already."""
    guard = faulty_guard(mode=mode)
    texts = ["hello", f"please [[fault:{fault}]]", "x [[unsafe]]", "good day"]
    verdicts = guard.check_batch([guard.request(None, t) for t in texts])
    assert [v.label for v in verdicts] == ["safe", "unavailable", "unsafe", "safe"], verdicts
    assert verdicts[1].error and verdicts[1].stage == "input"
    assert guard.backend.faults[fault] >= 2  # the whole batch, then the faulty request alone


@pytest.mark.parametrize("fault", QUICK_FAULTS)
def test_a_cascade_stage_fault_escalates_and_stays_visible(fault):
    """Issue #24: a failing first stage escalates; the next stage decides and the failure is named
    in the final verdict (and kept in its stages); a cascade whose only stage fails is unavailable."""
    from visguard import Cascade

    cascade = Cascade([faulty_guard(fault), faulty_guard()])
    verdict = cascade.check_input(None, "a harmless request")
    assert verdict.label == "safe" and [s.label for s in verdict.stages] == ["unavailable", "safe"]
    assert verdict.error and "earlier stage unavailable" in verdict.error
    alone = Cascade([faulty_guard(fault)]).check_input(None, "a harmless request")
    assert alone.label == "unavailable" and not Cascade([faulty_guard(fault)]).allows(alone)


def test_a_cascade_stage_hang_ends_at_the_cascades_own_limit():
    from visguard import Cascade

    hung = faulty_guard("hang", timeout_s=30)
    try:
        verdict = Cascade([hung, faulty_guard()], policy=Policy(timeout_s=0.3)).check_input(None, "x")
        assert verdict.label == "unavailable" and "cascade timed out" in verdict.error
    finally:
        hung.backend.release.set()
        _join_stalled(hung)


def test_a_failed_load_is_a_typed_error():
    with pytest.raises(BackendError, match="injected load failure"):
        faulty_guard("load")


# ------------------------------------------------------------------ liveness (issue 10 #6)


def test_the_default_policy_has_a_time_limit():
    """Issue 10 #6: ``timeout_s`` defaulted to None, so a hung backend blocked its caller forever."""
    assert Policy().timeout_s == DEFAULT_TIMEOUT_S and 0 < DEFAULT_TIMEOUT_S <= 120


def test_a_hung_check_does_not_block_the_next_one():
    """Issue 10 #6: after one check timed out, the next one also timed out (the worker was stuck)."""
    guard = faulty_guard(timeout_s=0.3)
    backend: FaultyBackend = guard.backend
    try:
        hung = guard.check_input(None, "first [[fault:hang]]")
        assert hung.label == "unavailable" and "timed out" in hung.error
        assert backend.hanging.is_set() and not backend.release.is_set()  # still stuck in the backend
        later = guard.with_policy(timeout_s=30).check_input(None, "second")  # a healthy request
        assert later.label == "safe", later
        assert guard.batcher.abandoned == 1
    finally:
        backend.release.set()
        _join_stalled(guard)


def test_when_the_backend_stays_stuck_checks_fail_fast_with_the_reason():
    guard = faulty_guard("hang", timeout_s=0.3)
    backend: FaultyBackend = guard.backend
    try:
        for _ in range(guard.batcher.max_stalled):
            assert "timed out" in guard.check_input(None, "x").error
        patient = guard.with_policy(timeout_s=DEFAULT_TIMEOUT_S)
        verdict = patient.check_input(None, "y")  # answered at once, not after 60 s
        assert verdict.label == "unavailable" and "guard backend stalled" in verdict.error
        assert not patient.allows(verdict)
        backend.fault = "ok"
        backend.release.set()
        _join_stalled(guard)
        assert patient.check_input(None, "z").label == "safe"  # served again once the calls returned
    finally:
        backend.release.set()


# ------------------------------------------------------------------ the real transformers backend


@pytest.fixture(scope="module")
def tiny(qwen_path) -> Iterator[Guard]:
    guard = Guard.from_pretrained(qwen_path, device="cpu", dtype="float32")
    yield guard
    guard.close()


class _ForwardFault:
    """A forward hook on the real model: raise, run out of memory, hang on an Event, or return NaN logits."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, module, args, kwargs, output):
        if self.kind == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if self.kind == "memory":
            raise MemoryError("injected")
        if self.kind == "hang":
            self.entered.set()
            self.release.wait(120)
        if self.kind == "nan":
            output.logits.fill_(float("nan"))
        return output


@pytest.mark.parametrize("mode", ["fast", "reason"])
@pytest.mark.parametrize("kind", ["raise", "memory", "nan"])
def test_transformers_backend_faults_are_unavailable(tiny, kind, mode, images):
    fault = _ForwardFault(kind)
    handle = tiny.backend.model.register_forward_hook(fault, with_kwargs=True)
    try:
        verdict = tiny.with_policy(mode=mode, max_new_tokens=8).check_input(images[:1], "describe this")
    finally:
        handle.remove()
    assert verdict.label == "unavailable" and verdict.error, verdict
    assert not tiny.allows(verdict)


def test_transformers_backend_hang_times_out_and_the_guard_recovers(tiny, images):
    fault = _ForwardFault("hang")
    handle = tiny.backend.model.register_forward_hook(fault, with_kwargs=True)
    try:
        verdict = tiny.with_policy(timeout_s=0.3).check_input(images[:1], "describe this")
        assert verdict.label == "unavailable" and "timed out" in verdict.error
        assert fault.entered.is_set()
    finally:
        handle.remove()
        fault.release.set()
    _join_stalled(tiny)
    assert tiny.check_input(images[:1], "describe this").label in ("safe", "unsafe")


def test_transformers_backend_failed_loads_are_typed(tmp_path):
    with pytest.raises(VisguardError):
        Guard.from_pretrained(str(tmp_path / "missing"), device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(VisguardError):
        Guard.from_pretrained(str(broken), device="cpu")


# ------------------------------------------------------------------ the real openai backend


class _Script:
    """What the scripted server does with the next requests (``ok`` answers like a guard server)."""

    def __init__(self) -> None:
        self.behaviour = "ok"
        self.release = threading.Event()
        self.requests = 0


def _handler(script: _Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            script.requests += 1
            how = script.behaviour
            if how == "close":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if how == "hang":
                script.release.wait(60)
            if how == "500":
                return self._send(500, b'{"error": {"message": "engine dead"}}')
            if how == "garbage":
                return self._send(200, b"<html>proxy error</html>")
            if how == "empty":
                return self._send(200, b"{}")
            lp, lq = (float("nan"), float("nan")) if how == "nan" else (-0.1, -5.0)
            content = {"token": " safe", "logprob": lp, "top_logprobs": [{"token": " safe", "logprob": lp},
                                                                       {"token": " unsafe", "logprob": lq}]}
            text = "Verdict: safe" if how == "ok" else "\x00 no verdict here"
            reply = {"choices": [{"message": {"role": "assistant", "content": text},
                                  "logprobs": {"content": [content] if body.get("logprobs") else []}}]}
            self._send(200, json.dumps(reply).encode())

        def _send(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, _Script]]:
    script = _Script()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    script.release.set()
    server.shutdown()


def _openai_guard(url: str, **policy) -> Guard:
    return Guard.from_pretrained("scripted", backend="openai", base_url=url, max_retries=0, timeout_s=30,
                                 api_key_env=None, policy=Policy(**policy))


@pytest.mark.parametrize("mode", ["fast", "reason"])
@pytest.mark.parametrize("behaviour", ["500", "close", "garbage", "empty", "nan"])
def test_openai_backend_faults_are_unavailable(scripted, behaviour, mode):
    url, script = scripted
    guard = _openai_guard(url, mode=mode, max_new_tokens=8)
    try:
        script.behaviour = "ok"
        assert guard.check_input(None, "hello").label == "safe"  # the script answers like a guard server
        script.behaviour = behaviour
        verdict = guard.check_input(None, "hello")
    finally:
        script.behaviour = "ok"
        guard.close()
    assert verdict.label == "unavailable" and verdict.error, verdict
    assert not guard.allows(verdict)


def test_openai_backend_hang_times_out_and_recovers(scripted):
    url, script = scripted
    guard = _openai_guard(url, timeout_s=0.3)
    try:
        script.behaviour, script.release = "hang", threading.Event()
        verdict = guard.check_input(None, "hello")
        assert verdict.label == "unavailable" and "timed out" in verdict.error
        script.behaviour = "ok"
        assert guard.with_policy(timeout_s=30).check_input(None, "again").label == "safe"
    finally:
        script.release.set()
        _join_stalled(guard)
        guard.close()


def test_openai_backend_unreachable_server_is_unavailable():
    import socket

    # A port bound but never listened on, held for the whole check: connecting is refused, and no
    # other test's server can take the port in between (a freed ephemeral port can be reused).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        guard = _openai_guard(f"http://127.0.0.1:{port}/v1")
        try:
            verdict = guard.check_input(None, "hello")
        finally:
            guard.close()
    assert verdict.label == "unavailable" and "unreachable" in verdict.error


# ------------------------------------------------------------------ over HTTP (visguard serve)


@pytest.fixture(scope="module")
def faulty_server():
    from visguard.hosting.hosts import resolve_host
    from visguard.integrations.openai.server.app import ServeSettings, create_app
    from visguard.integrations.openai.server.upstream import ServerThread

    calls = []

    def host(images, text):
        calls.append(text)
        return "a harmless answer"

    guard = faulty_guard(timeout_s=0.5)
    app = create_app(guard, resolve_host(host), settings=ServeSettings(model_name="host"))
    with ServerThread(app) as server:
        yield server.url, calls, app.state.guard
    guard.backend.release.set()


@pytest.mark.parametrize("fault", [*QUICK_FAULTS, "hang"])
def test_faults_over_http_are_unavailable_and_block_the_chat(faulty_server, fault):
    import httpx

    url, calls, served_guard = faulty_server
    backend: FaultyBackend = served_guard.backend
    text = f"hello [[fault:{fault}]]"
    check = httpx.post(url + "/v1/guard/check", json={"text": text}, timeout=60)
    assert check.status_code == 200 and check.json()["label"] == "unavailable", check.text
    before = len(calls)
    chat = httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "host", "messages": [{"role": "user", "content": text}]})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["choices"][0]["finish_reason"] == "content_filter" and body["visguard"]["blocked"]
    assert body["visguard"]["reason"] == "unavailable" and len(calls) == before  # the host never saw it
    if fault == "hang":  # two calls are stuck in the backend: the next check fails fast, with the reason
        stalled = httpx.post(url + "/v1/guard/check", json={"text": "hello"}, timeout=60).json()
        assert stalled["label"] == "unavailable" and "guard backend stalled" in stalled["error"]
        backend.release.set()
        _join_stalled(served_guard)
        backend.release.clear()
    ok = httpx.post(url + "/v1/guard/check", json={"text": "hello"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["label"] == "safe"  # and the next request is served
