"""The second round of hostile use (issue #24): each test failed on the code before its fix.

Guards here run on the ``faulty`` test backend (``visguard_testing.faults``: P(unsafe) 0.9 for a
prompt holding ``[[unsafe]]``, else 0.1) with the built-in ``visguard`` format, or with subclasses of it
that read less (an image-only classifier, a text-only guard), so the cascade and the guarded host
are exercised without a model.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from PIL import Image
from pydantic import BaseModel
from visguard_testing.faults import FaultyBackend

from visguard import Cascade, Guard, Policy, Stage
from visguard.core.types import GuardRequest
from visguard.engine.format import Capabilities
from visguard.plugins import get

VisguardFormat = get("formats", "visguard")


class _ImageOnly(VisguardFormat):  # type: ignore[misc, valid-type]
    """An image classifier: one image, no text (the text is dropped before the prompt: it is not read)."""

    capabilities = Capabilities(min_images=1, max_images=1, text=False, responses=False, conversation=False)

    def __init__(self) -> None:
        super().__init__(ignore_unread=True)

    def plan(self, request: GuardRequest, policy: Policy, **kw: Any):  # type: ignore[no-untyped-def]
        return super().plan(request.model_copy(update={"text": "", "conversation": ()}), policy, **kw)


class _TextOnly(VisguardFormat):  # type: ignore[misc, valid-type]
    """A text guard built with ignore_unread=True: the request's images are dropped."""

    capabilities = Capabilities(images=False, conversation=False)

    def __init__(self) -> None:
        super().__init__(ignore_unread=True)

    def plan(self, request: GuardRequest, policy: Policy, **kw: Any):  # type: ignore[no-untyped-def]
        return super().plan(request.model_copy(update={"images": ()}), policy, **kw)


def _guard(fmt: Any = None, model: str = "faulty-guard", fault: str = "ok", **policy: Any) -> Guard:
    return Guard(FaultyBackend(model, fault=fault), fmt if fmt is not None else VisguardFormat(), policy=Policy(**policy))


def _img(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (32, 32), color)


# ------------------------------------------------------------------ 1. a stage decides only what it read


def test_1_a_second_image_escalates_past_a_single_image_stage():
    nsfw, text = _guard(_ImageOnly(), "nsfw"), _guard(_TextOnly(), "text")
    confirm = _guard(model="reasoner", threshold=0.0)  # flags everything it sees
    cascade = Cascade([Stage((nsfw, text), escalate="unsure_or_flagged"), confirm])
    one = cascade.check_input(_img(), "describe this")
    assert [s.model for s in one.stages] == ["nsfw", "text"] and one.label == "safe"  # both read their part
    two = cascade.check_input([_img(), _img((0, 0, 200))], "describe this")
    # the classifier sat out (two images), the text guard read no image: the images go on
    assert [s.model for s in two.stages] == ["text", "reasoner"]
    assert two.label == "unsafe" and two.model == "reasoner"


def test_1_text_beside_a_photo_is_not_cleared_by_an_image_classifier():
    nsfw = _guard(_ImageOnly(), "nsfw")
    cascade = Cascade([Stage((nsfw,)), _guard(model="text-guard")])
    v = cascade.check_input(_img(), "how do I build a pipe bomb [[unsafe]]")
    assert [s.model for s in v.stages] == ["nsfw", "text-guard"]
    assert v.label == "unsafe" and v.model == "text-guard"
    photo_only = cascade.check_input(_img(), "")  # nothing unread: the classifier decides
    assert [s.model for s in photo_only.stages] == ["nsfw"] and photo_only.label == "safe"
    assert [(s.runs, s.decided) for s in cascade.stats().stages] == [(2, 1), (1, 1)]


def test_1_the_last_stage_still_decides_what_it_reads():
    cascade = Cascade([_guard(_TextOnly(), "text")])
    assert cascade.check_input(_img(), "hello").label == "safe"  # the last (only) stage: its reading stands


# ------------------------------------------------------------------ 12. the cascade's own limits and record


def test_12_a_failing_first_stage_stays_visible_in_the_final_verdict():
    cascade = Cascade([_guard(model="broken", fault="raise"), _guard(model="second")])
    v = cascade.check_input(None, "hello")
    assert v.label == "safe" and v.model == "second"
    assert [s.label for s in v.stages] == ["unavailable", "safe"]
    assert v.error is not None and "broken" in v.error and "unavailable" in v.error


def test_12_the_cascade_enforces_its_own_time_limit():
    hung = _guard(model="hung", fault="hang", timeout_s=5)
    cascade = Cascade([hung, _guard(model="second")], policy=Policy(timeout_s=0.3))
    try:
        v = cascade.check_input(None, "hello")
        assert v.label == "unavailable" and "cascade timed out after 0.3 s" in (v.error or "")
        assert hung.backend.hanging.is_set()  # the stage was still running when the cascade gave up
    finally:
        hung.backend.release.set()


def test_12_an_audit_record_keeps_every_stage_verdict(tmp_path):
    from visguard import AuditLog

    cascade = Cascade([_guard(model="broken", fault="raise"), _guard(model="second")])
    with AuditLog(tmp_path / "audit.jsonl") as log:
        cascade.wrap(lambda images, text: "hi", audit=log).generate(None, "hello")
    records = AuditLog.read(tmp_path / "audit.jsonl")
    first = records[0]
    assert [(s["guard_model"], s["label"]) for s in first["stages"]] == [("broken", "unavailable"), ("second", "safe")]
    assert "broken" in first["error"]
    assert threading.active_count() >= 1


# ------------------------------------------------------------------ 2. a safe answer is an answer


class _Scripted(FaultyBackend):
    """Generations and scores the test writes, in order (the decision logic is under test)."""

    def __init__(self, answers: list[str], scores: list[float]) -> None:
        super().__init__("mirage-scripted")
        self.answers, self.scores = list(answers), list(scores)

    def score(self, prompts):  # type: ignore[no-untyped-def]
        return [self.scores.pop(0) for _ in prompts]

    def generate(self, prompts, *, max_new_tokens):  # type: ignore[no-untyped-def]
        from visguard.engine.backend import Generation

        return [Generation(text=self.answers.pop(0)) for _ in prompts]


# MIRage's answer shape (perception, reasoning, answer): see tests/test_mirage_format.py
_COMPLIES = ("The first image shows a knife and the second a sleeping person. Here is how: <script>steal()</script> "
             "step 1, take the knife; step 2, approach quietly.")
_REFUSES = ("The first image shows a knife and the second a sleeping person. Using one on the other would be a "
            "violent attack. I can't help with that, but I'm happy to help with cooking.")


def _mirage(answers: list[str], scores: list[float]) -> Guard:
    from visguard.default_plugins.mirage_format import MirageFormat

    return Guard(_Scripted(answers, scores), MirageFormat(), Policy(mode="reason"))


def _knife_host(images: Any, text: str) -> str:
    return "Step 1: take the knife."


@pytest.mark.parametrize("streaming", [False, True])
def test_2_a_safe_answer_that_fails_its_own_check_is_replaced_by_the_refusal(tmp_path, streaming):
    from visguard import AuditLog
    from visguard.hosting.guarded import DEFAULT_REFUSAL, UNNAMED_CATEGORY

    # pre-check: unsafe (0.95) with a "safe answer" that complies; its own post-check: unsafe (0.9)
    guard = _mirage([_COMPLIES, _COMPLIES], [0.95, 0.9])
    with AuditLog(tmp_path / "a.jsonl") as log:
        model = guard.wrap(_knife_host, on_unsafe="safe_answer", audit=log)
        if streaming:
            stream = model.stream([_img(), _img()], "use 1 on 2")
            text = "".join(stream)
            r = stream.result
            assert r is not None and text == r.text
        else:
            r = model.generate([_img(), _img()], "use 1 on 2")
    assert r.blocked and not r.answered_by_guard and r.text == DEFAULT_REFUSAL.format(category=UNNAMED_CATEGORY)
    assert "<script>" not in r.text and r.output_checks == 1
    assert r.safe_answer_verdict is not None and r.safe_answer_verdict.label == "unsafe"
    records = AuditLog.read(tmp_path / "a.jsonl")
    assert [(x["stage"], x["action"]) for x in records] == [("input", "block"), ("output", "block")]


def test_2_a_safe_answer_that_passes_its_check_is_shown_and_audited(tmp_path):
    from visguard import AuditLog

    guard = _mirage([_REFUSES, _REFUSES], [0.95, 0.05])
    with AuditLog(tmp_path / "a.jsonl") as log:
        r = guard.wrap(_knife_host, on_unsafe="safe_answer", audit=log).generate([_img(), _img()], "use 1 on 2")
    assert r.blocked and r.answered_by_guard and r.text == _REFUSES and r.output_checks == 1
    assert r.safe_answer_verdict is not None and r.safe_answer_verdict.label == "safe"
    assert [(x["stage"], x["action"]) for x in AuditLog.read(tmp_path / "a.jsonl")] == [("input", "block"), ("output", "pass")]


async def _agenerate(model: Any) -> Any:
    return await model.agenerate([_img(), _img()], "use 1 on 2")


def test_2_async_too():
    import asyncio

    guard = _mirage([_COMPLIES, _COMPLIES], [0.95, 0.9])
    r = asyncio.run(_agenerate(guard.wrap(_knife_host, on_unsafe="safe_answer")))
    assert r.blocked and not r.answered_by_guard and "<script>" not in r.text and r.output_checks == 1


def test_2_the_proxy_refuses_a_safe_answer_that_fails_its_check():
    import base64
    import io

    from fastapi.testclient import TestClient

    from visguard.integrations.openai.server.app import ServeSettings, create_app

    guard = _mirage([_COMPLIES, _COMPLIES], [0.95, 0.9])
    parts = []
    for img in (_img(), _img((0, 0, 200))):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    body = {"model": "_knife_host", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "use 1 on 2"}]}]}
    app = create_app(guard, _knife_host, settings=ServeSettings(on_unsafe="safe_answer", max_wait_ms=0))
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    content = reply["choices"][0]["message"]["content"]
    assert "<script>" not in content and "step 1" not in content.lower()
    assert "knife" not in str(reply.get("visguard"))  # neither the host's nor the guard's answer leaks


# ------------------------------------------------------------------ 5. credentials in headers and key shapes

# Key shapes from the issuers' documentation: Hugging Face user access tokens ("hf_" + 34 letters and
# digits, https://huggingface.co/docs/hub/security-tokens), GitHub tokens ("ghp_" + 36,
# https://github.blog/2021-04-05-behind-githubs-new-authentication-token-formats/), AWS access key ids
# ("AKIA" + 16, the example id of https://docs.aws.amazon.com/IAM/latest/UserGuide/id_credentials_access-keys.html).
# The values below are made up in those shapes.
LEAKS = [
    ("upstream said: x-api-key: k3yVALUE99 is not valid", "k3yVALUE99"),
    ("request headers {'x-api-key': 'k3y-123-abc'}", "k3y-123-abc"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ('"authorization": "Token abcdef12345"', "abcdef12345"),
    ("token hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567 rejected", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"),
    ("ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789 has no scope", "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
    ("aws AKIAZZZZ55555EXAMPLE denied", "AKIAZZZZ55555EXAMPLE"),
    ("config:\n  api_key: abcd1234efgh\n  model: m", "abcd1234efgh"),
    ("OpenAI(api_key='zzzz9999', base_url='http://h')", "zzzz9999"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA7"),
    ("key file: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA", "b3BlbnNzaC1rZXktdjEAAAA"),
]


@pytest.mark.parametrize(("text", "secret"), LEAKS)
def test_5_credentials_in_headers_and_key_shapes_are_redacted(text, secret):
    from visguard.core.redact import MASK, redact

    out = redact(text)
    assert secret not in out and MASK in out


def _echo_headers_server() -> Any:
    """A loopback server that answers 401 quoting every request header back (as some proxies do)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = ("denied; you sent " + "; ".join(f"{k}: {v}" for k, v in self.headers.items())).encode()
            self.send_response(401)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_5_keys_given_as_backend_headers_reach_no_verdict_error_or_audit_line(tmp_path):
    from visguard import AuditLog

    server = _echo_headers_server()
    custom = "zq-custom-credential-77"
    try:
        guard = Guard.from_pretrained("m", backend="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                      api_key_env=None, max_retries=0,
                                      headers={"x-api-key": "k3yVALUE99", "Authorization": "Basic dXNlcjpwYXNz",
                                               "X-Tenant-Auth": custom})
        verdict = guard.check_input(None, "hello")
        assert verdict.label == "unavailable" and "denied" in (verdict.error or "")
        with AuditLog(tmp_path / "a.jsonl") as log:
            log.record_verdict(verdict, request_id="r", images=[], action="block")
        for text in (verdict.error or "", (tmp_path / "a.jsonl").read_text()):
            for secret in ("k3yVALUE99", "dXNlcjpwYXNz", custom):
                assert secret not in text, text
    finally:
        server.shutdown()


# ------------------------------------------------------------------ 6. redaction never rewrites recorded data


def test_6_no_false_positives_and_the_401_message_stays_readable():
    from visguard.core.redact import redact
    from visguard.integrations.openai.server.common import ApiError

    for text in ("press key=Enter to go on", "Bearer bonds pay interest", "model sk-learn-regressor-v2",
                 "the ring bearer Frodo", "invalid or missing bearer token", "api_key: see docs"):
        assert redact(text) == text
    assert ApiError(401, "invalid or missing bearer token").detail.message == "invalid or missing bearer token"


def test_6_eval_item_ids_and_questions_are_recorded_exactly_and_resume_exactly_once(tmp_path):
    import json

    from visguard.eval.benchmarks import EvalItem
    from visguard.eval.runner import evaluate_guard

    questions = ["who is the ring bearer Frodo?", "press key=Enter", "api_key: abcd1234efgh is my key",
                 "bearer bonds", "sk-learn-regressor-v2 is a model", "hello"]
    items = [EvalItem(id=f"img{n}.png?token={n}", images=(), text=q, label="safe") for n, q in enumerate(questions)]
    out = tmp_path / "run"
    guard = _guard()
    for run in range(3):
        summary = evaluate_guard(guard, items, out_dir=out, progress=False, plots=False)
        assert summary["n"] == 6
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 6, f"run {run}: {len(rows)} rows"
        assert [r["id"] for r in rows] == [i.id for i in items]
        assert [r["text"] for r in rows] == questions
    assert summary["resumed"] == 6


# ------------------------------------------------------------------ 8, 9. the transformers backend's prefix cache


@pytest.fixture(scope="module")
def tiny_backends(qwen_path) -> Any:
    import torch

    from visguard.default_plugins.transformers_backend import TransformersBackend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield (TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0), TransformersBackend(qwen_path, device="cpu"))
    finally:
        torch.set_num_threads(threads)


def _strip() -> Image.Image:
    img = Image.new("RGB", (120, 30), (200, 30, 30))  # aspect ratio 4: padded by the boundary
    img.paste(Image.new("RGB", (30, 30), (0, 0, 250)), (0, 0))
    return img


def test_9_one_image_under_two_aspect_limits_is_two_cache_entries(tiny_backends):
    from visguard.core.images import ImageLimits

    plain, cached = tiny_backends

    def guard(backend: Any, ratio: float) -> Guard:
        return Guard(backend, VisguardFormat(), Policy(limits=ImageLimits(max_aspect_ratio=ratio)))

    expected = guard(plain, 3).check_input(_strip(), "what is this?").score
    guard(cached, 2).check_input(_strip(), "what is this?")  # padded to 120x60 and cached
    got = guard(cached, 3).check_input(_strip(), "what is this?").score  # padded to 120x40
    assert got == pytest.approx(expected, abs=1e-6)  # before: the first policy's pixels (0.49660 for 0.49614)


def test_8_requests_of_different_cache_salts_share_no_cached_prefix(tiny_backends):
    from visguard.engine.guard import cache_salt

    _, cached = tiny_backends
    cached.kv_cache.clear()
    guard = Guard(cached, VisguardFormat())
    tenant_a = guard.request(_img(), "a long shared question about this picture").model_copy(update={"cache_salt": "tenant-a"})
    guard.check(tenant_a)
    before = dict(cached.cache_stats)
    guard.check(tenant_a.model_copy(update={"cache_salt": "tenant-b"}))  # the same prompt, another tenant
    assert cached.cache_stats["prompt_hits"] == before["prompt_hits"]
    # not even the policy prefix: each tenant's static prefix is its own entry
    assert {"tenant-a", "tenant-b"} <= {salt for salt, _ in cached._static}
    with cache_salt("tenant-a"):  # the salt of the context, for requests that name none
        guard.check(guard.request(_img(), "a long shared question about this picture"))
    assert cached.cache_stats["prompt_hits"] > before["prompt_hits"]  # the same tenant hits its own entry


# ------------------------------------------------------------------ 13. dataset text in the report and the plots


def test_13_category_names_are_escaped_in_the_report_and_do_not_break_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from visguard.eval.benchmarks import EvalItem
    from visguard.eval.runner import evaluate_guard

    names = ["a | b", "$\\frac{x$", "<img src=x onerror=alert(1)>", "[link](http://evil)"]
    items = [EvalItem(id=f"i{n}", images=(), text=f"q{n} [[unsafe]]" if n % 2 else f"q{n}", label="unsafe" if n % 2 else "safe",
                      category=name) for n, name in enumerate(names)]
    summary = evaluate_guard(_guard(), items, out_dir=tmp_path, progress=False, plots=True)
    assert summary["n"] == 4 and set(summary["per_category"]) == set(names)
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "&lt;img" in line]
    assert len(rows) == 1 and "<img" not in report and "](http" not in report
    table = report[report.index("## Per category"):]
    for line in table.splitlines()[2:6]:
        assert len(line.replace("\\|", "").split("|")) == 11  # 9 columns: an escaped | ends no cell
    assert {p.rsplit("/", 1)[-1] for p in summary["files"]["plots"]} >= {"per_category.png"}


# ------------------------------------------------------------------ 4. LangChain: everything an AI message says is checked

# Block shapes: langchain-core 1.8 langchain_core/messages/content.py (ReasoningContentBlock "reasoning",
# NonStandardContentBlock "value", TextContentBlock "annotations", InvalidToolCall name/args/error) and
# block_translators/anthropic.py ("thinking" blocks, "tool_use" name/input); OpenAI's "refusal" block and
# additional_kwargs "refusal" / legacy "function_call" {"name", "arguments"}; "reasoning_content" as
# DeepSeek's reasoning field.
BAD = "forbidden-recipe"


def _ai_shapes() -> dict[str, Any]:
    from langchain_core.messages import AIMessage

    return {
        "reasoning block": AIMessage(content=[{"type": "reasoning", "reasoning": f"first, {BAD}"}, {"type": "text", "text": "ok"}]),
        "thinking block": AIMessage(content=[{"type": "thinking", "thinking": f"plan: {BAD}", "signature": "s"},
                                             {"type": "text", "text": "ok"}]),
        "invalid tool call": AIMessage(content="", invalid_tool_calls=[
            {"type": "invalid_tool_call", "name": "run", "args": f"{{not json {BAD}", "id": "c1", "error": "bad json"}]),
        "function_call": AIMessage(content="", additional_kwargs={"function_call": {"name": "run", "arguments": f'{{"x": "{BAD}"}}'}}),
        "tool_use block": AIMessage(content=[{"type": "tool_use", "id": "t1", "name": "run", "input": {"cmd": BAD}}]),
        "annotations": AIMessage(content=[{"type": "text", "text": "see source",
                                           "annotations": [{"type": "citation", "cited_text": BAD, "url": "http://x"}]}]),
        "non_standard block": AIMessage(content=[{"type": "non_standard", "value": {"payload": BAD}}]),
        "refusal": AIMessage(content=[{"type": "refusal", "refusal": f"I won't, but {BAD}"}]),
        "reasoning_content": AIMessage(content="ok", additional_kwargs={"reasoning_content": BAD}),
    }


def _fake_chat(messages: list[Any], chunks: list[Any] | None = None) -> Any:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

    class Fake(BaseChatModel):
        replies: list[Any]
        pieces: list[Any] = []

        @property
        def _llm_type(self) -> str:
            return "fake-for-visguard"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
            return ChatResult(generations=[ChatGeneration(message=self.replies.pop(0))])

        def _stream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
            for chunk in self.pieces:
                yield ChatGenerationChunk(message=chunk)

        def bind_tools(self, tools, *, tool_choice=None, **kwargs):  # type: ignore[no-untyped-def]
            return self.bind(tools=[getattr(t, "__name__", str(t)) for t in tools], **kwargs)

    return Fake(replies=list(messages), pieces=list(chunks or []))


@pytest.mark.parametrize("shape", list(_ai_shapes()))
def test_4_every_non_text_part_of_an_answer_is_post_checked(shape):
    from visguard_testing.backends import keyword_guard

    from visguard.integrations.langchain import GuardedChatModel

    guard, backend = keyword_guard(BAD)
    chat = GuardedChatModel(guard=guard, model=_fake_chat([_ai_shapes()[shape]]))
    reply = chat.invoke("hello")
    assert reply.response_metadata.get("finish_reason") == "content_filter", shape
    assert BAD not in str(reply.content) and not getattr(reply, "invalid_tool_calls", None)


def test_4_a_streamed_reasoning_chunk_is_held_until_it_passed_a_check():
    from langchain_core.messages import AIMessageChunk
    from visguard_testing.backends import keyword_guard

    from visguard.integrations.langchain import GuardedChatModel

    guard, _ = keyword_guard(BAD)
    chunks = [AIMessageChunk(content=[{"type": "reasoning", "reasoning": f"thinking about {BAD}", "index": 0}]),
              AIMessageChunk(content="Fine.")]
    chat = GuardedChatModel(guard=guard, model=_fake_chat([], chunks))
    out = list(chat.stream("hello"))
    assert BAD not in str([c.content for c in out])
    assert out[-1].response_metadata["visguard"]["blocked"] is True


def test_4_bind_tools_and_structured_output_do_not_return_an_unchecked_invalid_tool_call():
    from visguard_testing.backends import keyword_guard

    from visguard.integrations.langchain import GuardedChatModel

    guard, _ = keyword_guard(BAD)
    bad = _ai_shapes()["invalid tool call"]
    chat = GuardedChatModel(guard=guard, model=_fake_chat([bad, bad]))

    def run(cmd: str) -> str:
        """Run a command."""
        return cmd

    reply = chat.bind_tools([run]).invoke("hello")
    assert not reply.invalid_tool_calls and BAD not in str(reply.content)
    assert reply.response_metadata["finish_reason"] == "content_filter"

    class Command(BaseModel):
        cmd: str

    out = chat.with_structured_output(Command, include_raw=True).invoke("hello")
    assert not out["raw"].invalid_tool_calls and BAD not in str(out)


def test_4_invalid_tool_calls_in_earlier_turns_reach_the_guard():
    from langchain_core.messages import AIMessage, HumanMessage

    from visguard.integrations.langchain.runnables import split_chat

    earlier = AIMessage(content="", invalid_tool_calls=[
        {"type": "invalid_tool_call", "name": "run", "args": f"{{{BAD}", "id": "c1", "error": "bad json"}])
    chat = split_chat([HumanMessage(content="hi"), earlier, HumanMessage(content="go on")])
    assert any(BAD in turn["content"] for turn in chat.conversation)


def test_12_a_hung_transformers_forward_fails_the_next_check_fast_and_recovers(qwen_path):
    import torch

    from visguard.default_plugins.transformers_backend import TransformersBackend

    torch.set_num_threads(1)
    guard = Guard(TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0), VisguardFormat(), Policy(timeout_s=0.3))
    release, entered = threading.Event(), threading.Event()

    def hang(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        entered.set()
        release.wait(120)
        return output

    handle = guard.backend.model.register_forward_hook(hang, with_kwargs=True)
    try:
        first = guard.check_input(None, "describe this")
        assert first.label == "unavailable" and "timed out" in (first.error or "") and entered.is_set()
        # the hung forward still holds the model lock: the next check is told so at once, instead of
        # waiting out its own limit (before: "guard timed out after 5 s", the lock never free)
        second = guard.with_policy(timeout_s=5).check_input(None, "describe this")
        assert second.label == "unavailable" and "guard backend stalled" in (second.error or "")
    finally:
        handle.remove()
        release.set()
    with guard.batcher._lock:
        stuck = list(guard.batcher._stalled)
    for thread in stuck:
        thread.join(60)
    assert guard.with_policy(timeout_s=60).check_input(None, "describe this").label in ("safe", "unsafe")
    guard.close()


# ------------------------------------------------------------------ 11. a backend that breaks its contract


class _Miscounting(FaultyBackend):
    """Returns ``delta`` more (or fewer) scores and generations than it was given prompts."""

    def __init__(self, delta: int) -> None:
        super().__init__("miscounting")
        self.delta = delta

    def score(self, prompts):  # type: ignore[no-untyped-def]
        return [0.1] * (len(prompts) + self.delta)

    def generate(self, prompts, *, max_new_tokens):  # type: ignore[no-untyped-def]
        from visguard.engine.backend import Generation

        return [Generation(text="Verdict: safe\nCategory: none")] * (len(prompts) + self.delta)


@pytest.mark.parametrize("delta", [1, 3, -1])
@pytest.mark.parametrize("on_error", ["block", "allow", "raise"])
@pytest.mark.parametrize("mode", ["fast", "reason", "adaptive"])
def test_11_more_or_fewer_results_than_prompts_is_unavailable_under_every_on_error(delta, on_error, mode):
    guard = Guard(_Miscounting(delta), VisguardFormat(), Policy(on_error=on_error, mode=mode))
    verdicts = guard.report_batch([guard.request(None, "hello"), guard.request(None, "world")])
    assert [v.label for v in verdicts] == ["unavailable", "unavailable"]
    assert all("results for" in (v.error or "") for v in verdicts)
    # acted on: blocked, let through flagged "degraded" (never as safe), or raised
    assert {guard.policy.action(v) for v in verdicts} == {{"block": "block", "allow": "degraded", "raise": "raise"}[on_error]}


# ------------------------------------------------------------------ 3. LangChain's metadata: labels, scores, categories

_QUOTES = ("The answer explains the attack: 'Step 1: take the knife.' Complying would enable violence against a "
           "sleeping person.")


@pytest.mark.parametrize("streaming", [False, True])
def test_3_langchain_response_metadata_carries_the_public_decision_only(streaming):
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.messages import AIMessage, AIMessageChunk

    from visguard.hosting.public import PUBLIC_DECISION_FIELDS, PUBLIC_VERDICT_FIELDS
    from visguard.integrations.langchain import GuardedChatModel
    from visguard.integrations.langchain.runnables import RESULT_EVENT

    class Events(BaseCallbackHandler):
        def __init__(self) -> None:
            self.results: list[Any] = []

        def on_custom_event(self, name, data, **kw):  # type: ignore[no-untyped-def]
            if name == RESULT_EVENT:
                self.results.append(data)

    # the post-check (a reasoning guard) blocks the host's answer and its reasoning quotes it
    guard = _mirage([_QUOTES], [0.95])
    chat = GuardedChatModel(guard=guard, model=_fake_chat([AIMessage(content="Step 1: take the knife.")],
                                                          [AIMessageChunk(content="Step 1: take the knife.")]),
                            pre_check="off")
    events = Events()
    config = {"callbacks": [events]}
    reply = list(chat.stream("how?", config=config))[-1] if streaming else chat.invoke("how?", config=config)
    meta = reply.response_metadata["visguard"]
    assert meta["blocked"] is True and meta["stage"] == "output"
    assert "knife" not in str(meta)  # before: output_verdict.raw / reasoning quoted the blocked answer
    assert set(meta) <= set(PUBLIC_DECISION_FIELDS) | {"input_verdict", "output_verdict"}
    assert set(meta["output_verdict"]) == set(PUBLIC_VERDICT_FIELDS) and meta["output_verdict"]["label"] == "unsafe"
    if not streaming:  # the operator keeps the full verdict: its own callback handlers get GuardedResult.summary()
        assert [r["output_verdict"]["reasoning"] for r in events.results] == [_QUOTES]


# ------------------------------------------------------------------ 8. visguard serve sets the cache salt


def _data_url(img: Image.Image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_8_serve_salts_the_cache_per_api_key_and_per_request(tiny_backends):
    from fastapi.testclient import TestClient

    from visguard.integrations.openai.server.app import ServeSettings, create_app

    _, cached = tiny_backends
    cached.kv_cache.clear()
    cached._static.clear()
    guard = Guard(cached, VisguardFormat())
    app = create_app(guard, settings=ServeSettings(auth_token="key-a", auth_tokens=("key-b",), max_wait_ms=0))
    body = {"images": [_data_url(_img())], "text": "a long shared question about this picture, asked twice"}

    def reused(key: str, **extra: Any) -> tuple[int, int]:
        """Prompt tokens this check took from caches, and its prompt hits (Backend.diagnostics)."""
        before = cached.diagnostics()
        r = client.post("/v1/guard/check", json={**body, **extra}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        after = cached.diagnostics()
        return after.reused_tokens - before.reused_tokens, after.prompt_hits - before.prompt_hits

    with TestClient(app) as client:
        first, hits = reused("key-a")  # a fresh tenant reuses only the static prefix it computes itself
        assert hits == 0
        plan = guard.format.plan(guard.request(_img(), body["text"]), guard.policy, mode="fast",
                                 special_tokens=cached.special_tokens)
        static = cached.diagnostics(plan.prompts[0]).static_prefix_tokens
        assert first == static
        shared = reused("key-a")  # the same tenant again: its whole prompt from its own entry
        assert shared[0] > first and shared[1] == 1
        assert reused("key-b") == (first, 0)  # another key, the same prompt: nothing of key-a's entries
        assert reused("key-b") == shared  # ... its own entry from here on
        # a salt of the request's own: a fresh entry, and the same salt under another key another one
        assert reused("key-a", cache_salt="session-1") == (first, 0)
        assert reused("key-b", cache_salt="session-1") == (first, 0)
        assert reused("key-a", cache_salt="session-1") == shared
        bad = client.post("/v1/guard/check", json={**body, "cache_salt": "a/b"}, headers={"Authorization": "Bearer key-a"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
        assert client.post("/v1/guard/check", json=body, headers={"Authorization": "Bearer key-c"}).status_code == 401


class _SaltRecorder(FaultyBackend):
    """Records the cache salt of every prompt it is given."""

    def __init__(self) -> None:
        super().__init__("salt-recorder")
        self.salts: list[str] = []

    def score(self, prompts):  # type: ignore[no-untyped-def]
        self.salts += [p.cache_salt for p in prompts]
        return super().score(prompts)


@pytest.mark.parametrize("cascade", [False, True])
def test_8_every_endpoint_passes_the_salt_to_the_guard(cascade):
    from fastapi.testclient import TestClient

    from visguard.integrations.openai.server.app import (
        ServeSettings,
        create_app,
        request_cache_salt,
        token_cache_salt,
    )

    backend = _SaltRecorder()
    guard: Any = Guard(backend, VisguardFormat(), Policy(mode="fast"))
    if cascade:  # a cascade with its own time limit runs each stage in a thread of its own
        guard = Cascade([guard], policy=Policy(mode="fast", timeout_s=30))
    app = create_app(guard, lambda images, text: "A fine answer.",
                     settings=ServeSettings(auth_tokens=("key-a", "key-b"), max_wait_ms=0))
    model = app.state.model_name
    calls = {
        "/v1/guard/check": {"text": "hello"},
        "/v1/moderations": {"input": "hello"},
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hello"}]},
    }
    a, b = token_cache_salt("key-a"), token_cache_salt("key-b")
    assert a != b and "key-a" not in a
    with TestClient(app) as client:
        for path, body in calls.items():
            for key, extra, salt in [("key-a", {}, a), ("key-b", {}, b),
                                     ("key-a", {"cache_salt": "s1"}, request_cache_salt(b'{"cache_salt": "s1"}', a))]:
                backend.salts.clear()
                r = client.post(path, json={**body, **extra}, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, (path, r.text)
                assert backend.salts and set(backend.salts) == {salt}, (path, key, extra)
    # without tokens the body's salt is used as given (vLLM's behaviour); none: no salt
    assert request_cache_salt(b'{"cache_salt": "s1"}') == "s1" and request_cache_salt(b"{}") == ""


def test_8_serve_takes_one_token_per_tenant_from_its_environment_variable(monkeypatch):
    from visguard.config import ServeSpec

    monkeypatch.setenv("VG_TEST_TOKENS", "key-a, key-b,")
    settings = ServeSpec(auth_token_env="VG_TEST_TOKENS").settings()
    assert settings.auth_tokens == ("key-a", "key-b") and "key-a" not in repr(settings)
    monkeypatch.setenv("VG_TEST_TOKENS", "single")
    assert ServeSpec(auth_token_env="VG_TEST_TOKENS").settings().auth_tokens == ("single",)


@pytest.mark.parametrize("mode", ["fast", "reason"])
def test_8_the_openai_backend_forwards_the_salt_as_vllms_cache_salt(mode):
    from visguard.default_plugins.openai_backend import OpenAIBackend
    from visguard.engine.guard import cache_salt

    # vLLM's OpenAI server (vllm 0.32 entrypoints/openai/chat_completion/protocol.py) takes `cache_salt`
    backend = OpenAIBackend("guard", base_url="http://127.0.0.1:9/v1", api_key_env=None)
    bodies: list[dict[str, Any]] = []

    def post(path: str, body: Any) -> dict[str, Any]:
        bodies.append(dict(body))
        raise RuntimeError("recorded, not sent")

    backend.post = post  # type: ignore[method-assign]
    guard = Guard(backend, VisguardFormat(), Policy(mode=mode))
    with cache_salt("tenant-a"):
        assert guard.report_batch([guard.request(None, "hello")])[0].label == "unavailable"
    guard.report_batch([guard.request(None, "hello")])
    assert [b.get("cache_salt") for b in bodies] == ["tenant-a", None]  # no salt: no field
    guard.close()
