"""LangChain chains over real servers: ChatOpenAI -> visguard's upstream app -> a tiny Qwen2-VL.

Real pieces only: ``langchain-openai``'s ``ChatOpenAI`` talks HTTP on loopback to
``visguard.integrations.openai.server.upstream`` serving the tiny Qwen2-VL checkpoint (the host), and the guard is the
same tiny checkpoint through the transformers backend. Its weights are random, so verdicts are
forced by the policy threshold (0.0: every score is unsafe; 1.0: nothing reaches P(unsafe) = 1),
or, where the test needs to know which text is unsafe, by the rule-based ``KeywordBackend``.

Two set-ups: ``prompt | GuardedChatModel(ChatOpenAI(upstream)) | StrOutputParser()``, and the
same chain with ``visguard serve``'s guarded proxy as ChatOpenAI's endpoint (the guard's decision
comes back in ``x-visguard-*`` headers, the host's token counts in ``usage``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import runpy
import threading
from pathlib import Path

import openai
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from PIL import Image
from pydantic import BaseModel
from visguard_testing.backends import keyword_guard, pixel_sha256

from visguard import AuditLog, Guard, GuardrailViolation, load_images
from visguard.default_plugins.transformers_host import TransformersHost
from visguard.hosting.guarded import DEFAULT_REFUSAL, STREAM_REFUSAL_SEPARATOR, UNNAMED_CATEGORY
from visguard.integrations.langchain import GuardedChatModel
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app

MODEL = "tiny-qwen2-vl"
QUESTION = "what is in the picture?"
REFUSAL = DEFAULT_REFUSAL.format(category=UNNAMED_CATEGORY)
MAX_TOKENS = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingHost(TransformersHost):
    """The real transformers host, recording the pixels of every request and how streams ended."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[list[str]] = []
        self.cancels: list[threading.Event | None] = []

    def generate(self, images, text, *, usage=None, **kwargs):
        self.requests.append([pixel_sha256(g.image) for g in images])
        return super().generate(images, text, usage=usage, **kwargs)

    def stream(self, images, text, *, cancel=None, usage=None, **kwargs):
        self.requests.append([pixel_sha256(g.image) for g in images])
        self.cancels.append(cancel)
        yield from super().stream(images, text, cancel=cancel, usage=usage, **kwargs)


def fixed_length(request, host) -> dict:
    """Answers of exactly the requested length (EOS suppressed), so streams have many pieces."""
    return {"max_new_tokens": request.token_limit, "min_new_tokens": request.token_limit}


@pytest.fixture(scope="module")
def host(qwen_path) -> RecordingHost:
    return RecordingHost(qwen_path, max_new_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def upstream(host):
    with ServerThread(create_upstream_app(host, model_name=MODEL, generation_options=fixed_length)) as srv:
        yield srv


@pytest.fixture(scope="module")
def guard(qwen_path) -> Guard:
    return Guard.from_pretrained(qwen_path)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.new("RGB", (48, 40), (200, 30, 30))


def b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def prompt() -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages([
        ("system", "Answer briefly."),
        ("human", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,{image}"}},
                   {"type": "text", "text": "{question}"}]),
    ])


def chat_openai(url: str, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=url + "/v1", api_key="not-needed", model=MODEL, max_tokens=MAX_TOKENS,
                      max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def expected(upstream, prompt, image) -> str:
    """The host's own answer to the prompt (greedy decoding: the same every time)."""
    return (prompt | chat_openai(upstream.url) | StrOutputParser()).invoke({"image": b64png(image), "question": QUESTION})


def run_all(chain, inputs: dict) -> dict[str, str]:
    """The chain's answer through each of the six Runnable entry points."""

    async def async_ones():
        streamed = [piece async for piece in chain.astream(inputs)]
        return await chain.ainvoke(inputs), (await chain.abatch([inputs, inputs], config={"max_concurrency": 2})), streamed

    ainvoked, abatched, astreamed = asyncio.run(async_ones())
    batched = chain.batch([inputs, inputs], config={"max_concurrency": 2})
    assert batched[0] == batched[1] and abatched[0] == abatched[1]
    return {
        "invoke": chain.invoke(inputs),
        "ainvoke": ainvoked,
        "batch": batched[0],
        "abatch": abatched[0],
        "stream": "".join(chain.stream(inputs)),
        "astream": "".join(astreamed),
    }


# ------------------------------------------------------------------ GuardedChatModel around ChatOpenAI
def test_guarded_chat_openai_chain_blocks_unsafe_and_passes_safe(upstream, host, guard, prompt, image, expected):
    inputs = {"image": b64png(image), "question": QUESTION}
    strict = prompt | GuardedChatModel(guard=guard.with_policy(threshold=0.0), model=chat_openai(upstream.url)) | StrOutputParser()
    before = len(host.requests)
    answers = run_all(strict, inputs)
    assert answers == dict.fromkeys(answers, REFUSAL) and len(answers) == 6
    assert len(host.requests) == before  # sequential pre-check: the server never saw a blocked request

    lenient = prompt | GuardedChatModel(guard=guard.with_policy(threshold=1.0), model=chat_openai(upstream.url)) | StrOutputParser()
    answers = run_all(lenient, inputs)
    assert answers == dict.fromkeys(answers, expected) and expected
    # 8 calls reached the server (batches of two), each with the prompt's image as it was sent.
    assert host.requests[before:] == [[pixel_sha256(image)]] * 8


def test_decision_metadata_headers_events_and_run_names(upstream, guard, prompt, image):
    class Seen(BaseCallbackHandler):
        def __init__(self):
            self.starts, self.events = [], []

        def on_chat_model_start(self, serialized, messages, *, name=None, tags=None, **kwargs):
            self.starts.append((name, tags))

        def on_custom_event(self, name, data, **kwargs):
            self.events.append((name, data))

    seen = Seen()
    llm = GuardedChatModel(guard=guard.with_policy(threshold=1.0), model=chat_openai(upstream.url, include_response_headers=True))
    message = (prompt | llm).invoke({"image": b64png(image), "question": QUESTION},
                                    config={"callbacks": [seen], "tags": ["demo"], "run_name": "guarded-chain"})
    decision = message.response_metadata["visguard"]
    assert decision["blocked"] is False and decision["input_verdict"]["label"] == "safe"
    assert decision["output_verdict"]["label"] == "safe" and decision["output_checks"] == 1
    assert message.response_metadata["headers"]["content-type"].startswith("application/json")  # the model's own metadata kept
    assert message.usage_metadata["output_tokens"] == MAX_TOKENS  # the upstream's usage, passed through
    # One chat model run (the guarded one; the wrapped model runs without the chain's callbacks).
    assert len(seen.starts) == 1 and "demo" in seen.starts[0][1]
    assert [name for name, _ in seen.events] == ["visguard_verdict", "visguard_verdict", "visguard_result"]
    assert seen.events[-1][1]["request_id"] == decision["request_id"]
    llm.invoke(prompt.invoke({"image": b64png(image), "question": QUESTION}), config={"callbacks": [seen], "run_name": "guarded"})
    assert seen.starts[-1][0] == "guarded" and len(seen.events) == 6


def test_stream_never_releases_text_that_failed_a_check(upstream, prompt, image):
    inputs = {"image": b64png(image), "question": QUESTION}
    long_answer = chat_openai(upstream.url).bind(max_tokens=40)
    reference = [c.content for c in (prompt | long_answer).stream(inputs)]
    full = "".join(reference)
    asked = "System: Answer briefly.\nUser: " + QUESTION  # what the input check reads
    word = next(p.strip() for i, p in enumerate(reference)
                if i >= 6 and p.strip() and p.strip() not in "".join(reference[:i]) and p.strip() not in asked)
    kw_guard, backend = keyword_guard(word)

    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    tokens = Tokens()
    llm = GuardedChatModel(guard=kw_guard, model=chat_openai(upstream.url), stream_check_every=2)
    chunks = list((prompt | llm.bind(max_tokens=40)).stream(inputs, config={"callbacks": [tokens]}))
    texts = [c.content for c in chunks if c.content]
    decision = next(c.response_metadata["visguard"] for c in chunks if "visguard" in c.response_metadata)
    assert decision["blocked"] and (decision["reason"], decision["stage"]) == ("unsafe", "output")
    released = "".join(texts[:-1])
    assert texts[-1] == (STREAM_REFUSAL_SEPARATOR if released else "") + REFUSAL
    assert word not in released and full.startswith(released) and released
    # Every released prefix was judged safe before it went out; the failing text never went out,
    # not even to a streaming callback handler on the chain.
    judged = {text: score for stage, text, score in backend.seen if stage == "output"}
    prefix = ""
    for chunk in chunks:
        if chunk.content and chunk.content != texts[-1]:
            prefix += chunk.content
            assert any(t.startswith(prefix) and s == 0.0 for t, s in judged.items())
    assert prefix == released
    assert word not in "".join(tokens.tokens)
    failed = [text for text, score in judged.items() if score == 1.0]
    assert len(failed) == 1 and word in failed[0] and failed[0].startswith(released)


def test_parallel_pre_check_cancels_the_servers_generation(upstream, host, guard, prompt, image):
    llm = GuardedChatModel(guard=guard.with_policy(threshold=0.0), model=chat_openai(upstream.url), pre_check="parallel")
    cancels = len(host.cancels)
    message = (prompt | llm.bind(max_tokens=400)).invoke({"image": b64png(image), "question": QUESTION})
    decision = message.response_metadata["visguard"]
    assert message.content == REFUSAL and decision["blocked"] and decision["host_called"] and decision["host_cancelled"]
    assert message.response_metadata["finish_reason"] == "content_filter"
    # ChatOpenAI's stream was closed, the server saw the client go and told the host to stop.
    deadline = threading.Event()
    for _ in range(300):
        if len(host.cancels) > cancels:
            break
        deadline.wait(0.1)
    (cancel,) = host.cancels[cancels:]
    assert cancel is not None and cancel.wait(60), "the upstream did not cancel generation"


def test_same_pixels_reach_the_guard_and_the_host(upstream, host, prompt, image, tmp_path):
    red, blue = image, Image.new("RGB", (40, 48), (30, 30, 200))
    kw_guard, backend = keyword_guard("never-said")
    audit = tmp_path / "audit.jsonl"
    llm = GuardedChatModel(guard=kw_guard, model=chat_openai(upstream.url), audit=audit)
    messages = [
        ("human", [{"type": "image", "base64": b64png(red), "mime_type": "image/png"}, {"type": "text", "text": "first"}]),
        ("ai", "A red square."),
        ("human", [{"type": "image", "source_type": "base64", "data": b64png(blue), "mime_type": "image/png"},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64png(red)}},
                   {"type": "text", "text": "and these?"}]),
    ]
    before = len(host.requests)
    llm.invoke(messages)
    pixels = [pixel_sha256(red), pixel_sha256(blue), pixel_sha256(red)]
    assert backend.images_seen[0] == pixels  # the pre-check saw every image of every turn
    assert host.requests[before:] == [pixels]  # ChatOpenAI sent the same pixels upstream
    encoded = [hashlib.sha256(base64.b64decode(b64png(img))).hexdigest() for img in (red, blue, red)]
    assert [r["images"] for r in AuditLog.read(audit)] == [encoded, encoded]


def test_guard_wrap_takes_a_chat_model_as_host(upstream, guard, image, expected):
    # guard.wrap(chat_model): the GuardedModel API on a LangChain host, images sent as base64 blocks.
    with guard.with_policy(threshold=1.0).wrap(chat_openai(upstream.url)) as guarded:
        assert guarded.host.name == "langchain"
        result = guarded.generate([image], QUESTION)
        assert not result.blocked and result.text == result.response and result.response
        assert GuardedChatModel.from_guarded(guarded).guarded is guarded
    with pytest.raises(GuardrailViolation):
        guard.with_policy(threshold=0.0).wrap(chat_openai(upstream.url), on_unsafe="raise").generate(load_images([image]), QUESTION)
# ------------------------------------------------------------------ the guarded proxy as the endpoint
@pytest.fixture(scope="module")
def proxies(upstream, guard):
    def proxy(threshold: float):
        app = create_app(guard.with_policy(threshold=threshold), upstream.url + "/v1",
                         settings=ServeSettings(model_name=MODEL, max_wait_ms=0), host_options={"model": MODEL})
        return ServerThread(app)

    with proxy(0.0) as strict, proxy(1.0) as lenient:
        yield strict, lenient


def test_chat_openai_through_the_guarded_proxy(proxies, host, prompt, image, expected):
    strict, lenient = proxies
    inputs = {"image": b64png(image), "question": QUESTION}
    before = len(host.requests)
    answers = run_all(prompt | chat_openai(strict.url) | StrOutputParser(), inputs)
    assert answers == dict.fromkeys(answers, REFUSAL) and len(host.requests) == before
    answers = run_all(prompt | chat_openai(lenient.url) | StrOutputParser(), inputs)
    assert answers == dict.fromkeys(answers, expected)
    assert host.requests[before:] == [[pixel_sha256(image)]] * 8


def test_proxy_decision_in_headers_and_usage(proxies, prompt, image, expected):
    strict, lenient = proxies
    inputs = {"image": b64png(image), "question": QUESTION}
    blocked = (prompt | chat_openai(strict.url, include_response_headers=True)).invoke(inputs)
    headers = blocked.response_metadata["headers"]
    assert blocked.content == REFUSAL and blocked.response_metadata["finish_reason"] == "content_filter"
    assert (headers["x-visguard-blocked"], headers["x-visguard-reason"], headers["x-visguard-stage"]) == ("true", "unsafe", "input")
    assert headers["x-visguard-input-label"] == "unsafe" and float(headers["x-visguard-input-score"]) >= 0.0
    assert {k: blocked.usage_metadata[k] for k in ("input_tokens", "output_tokens", "total_tokens")} == {
        "input_tokens": 0, "output_tokens": 0, "total_tokens": 0}  # the host never ran

    passed = (prompt | chat_openai(lenient.url, include_response_headers=True)).invoke(inputs)
    headers = passed.response_metadata["headers"]
    assert passed.content == expected and headers["x-visguard-blocked"] == "false"
    assert headers["x-visguard-input-label"] == headers["x-visguard-output-label"] == "safe"
    assert len(headers["x-visguard-request-id"]) == 32
    usage = passed.usage_metadata
    assert usage["output_tokens"] == MAX_TOKENS and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    # A stream's headers carry the pre-check (the answer's checks come in its last chunk).
    chunks = list((prompt | chat_openai(lenient.url, include_response_headers=True, stream_usage=True)).stream(inputs))
    first = next(c for c in chunks if "headers" in c.response_metadata)
    assert first.response_metadata["headers"]["x-visguard-input-label"] == "safe"
    assert "".join(c.content for c in chunks) == expected
    streamed_usage = sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata)
    assert streamed_usage == MAX_TOKENS




def test_example_langchain_chain(upstream, qwen_path, monkeypatch, capsys):
    """examples/langchain_chain.py, against the tiny host on loopback and the tiny guard."""
    for key, value in {"VISGUARD_EXAMPLE_GUARD": qwen_path, "VISGUARD_EXAMPLE_HOST": upstream.url + "/v1",
                       "VISGUARD_EXAMPLE_HOST_MODEL": MODEL}.items():
        monkeypatch.setenv(key, value)
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "langchain_chain.py"), run_name="__main__")
    out = capsys.readouterr().out
    vg = re.search(r"^visguard: blocked=(True|False) pre-check=(safe|unsafe) P\(unsafe\)=[\d.]+ post-check=(\w+)$", out, re.M)
    assert vg, out
    answer = re.search(r"^answer: (.*)$", out, re.M | re.S).group(1)
    if vg.group(1) == "True":
        assert answer.startswith(REFUSAL.split(":")[0])
    assert re.search(r"^streamed: ", out, re.M) and re.search(r"^gated: ", out, re.M)
    if vg.group(2) == "unsafe":
        assert "gated: Sorry, I can't help with that." in out


class Answer(BaseModel):
    """An answer with a topic."""

    topic: str


def test_chat_openai_structured_output_and_tools_run_inside_the_guard(upstream, host, guard, prompt, image):
    inputs = {"image": b64png(image), "question": QUESTION}
    lenient = GuardedChatModel(guard=guard.with_policy(threshold=1.0), model=chat_openai(upstream.url))
    # ChatOpenAI's own structured output (function calling, raw kept): the tiny model answers in
    # text, so nothing parses, but the call went through the guard: the raw message carries its decision.
    structured = prompt | lenient.with_structured_output(Answer, method="function_calling", include_raw=True)
    out = structured.invoke(inputs)
    assert out["parsed"] is None and out["raw"].response_metadata["visguard"]["output_verdict"]["label"] == "safe"
    strict = GuardedChatModel(guard=guard.with_policy(threshold=0.0), model=chat_openai(upstream.url))
    before = len(host.requests)
    out = (prompt | strict.with_structured_output(Answer, method="function_calling", include_raw=True)).invoke(inputs)
    assert out["raw"].content == REFUSAL and len(host.requests) == before
    # The default json_schema method and bind_tools are the wrapped model's own, bound to the guarded model.
    for bound in (strict.with_structured_output(Answer), strict.bind_tools([Answer], tool_choice="Answer")):
        first = bound.first if hasattr(bound, "first") else bound
        assert first.bound is strict and ("response_format" in first.kwargs or "tools" in first.kwargs)


def test_proxy_error_mode_sends_the_decision_headers_too(upstream, guard, prompt, image):
    app = create_app(guard.with_policy(threshold=0.0), upstream.url + "/v1",
                     settings=ServeSettings(model_name=MODEL, on_unsafe="error", max_wait_ms=0), host_options={"model": MODEL})
    with ServerThread(app) as proxy:
        with pytest.raises(openai.BadRequestError) as info:
            (prompt | chat_openai(proxy.url)).invoke({"image": b64png(image), "question": QUESTION})
    headers = info.value.response.headers
    assert info.value.code == "content_filter"
    assert (headers["x-visguard-blocked"], headers["x-visguard-reason"], headers["x-visguard-input-label"]) == (
        "true", "unsafe", "unsafe")
