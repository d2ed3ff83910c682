"""The LangChain integration: GuardCheck on a real tiny checkpoint; GuardedChatModel's plumbing.

The plumbing tests (image shapes, tool calls, composition) use the rule-based ``KeywordBackend``
guard and LangChain's scripted chat models: what they show is what reaches the guard and what
comes back. Chains over a real model and a real server: tests/test_langchain_chat.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import threading

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image
from pydantic import BaseModel
from visguard_testing.backends import keyword_guard, pixel_sha256

from visguard import AuditLog, Guard, GuardrailViolation, ImageInputError, InputError, Policy
from visguard.integrations.langchain import GuardCheck, GuardedChatModel, split_chat


@pytest.fixture(scope="module")
def guard(qwen_path):
    return Guard.from_pretrained(qwen_path)


def _block(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"type": "image", "base64": base64.b64encode(buf.getvalue()).decode(), "mime_type": "image/png"}


class Events(BaseCallbackHandler):
    def __init__(self):
        self.events = []

    def on_custom_event(self, name, data, **kwargs):
        self.events.append((name, data))


def test_messages_dict_and_string_inputs_give_the_guards_verdict(guard, images):
    text = "use image 1 on image 2"
    msg = HumanMessage(content=[{"type": "text", "text": text}, _block(images[0]), _block(images[1])])
    expected = guard.check_input(images[:2], text)
    events = Events()
    got = GuardCheck(guard=guard).invoke([msg], config={"callbacks": [events], "tags": ["t"]})
    assert got.score == pytest.approx(expected.score, abs=1e-6)
    assert events.events and events.events[0][0] == "visguard_verdict" and events.events[0][1]["label"] == got.label
    got = GuardCheck(guard=guard).invoke({"images": images[:2], "text": text})
    assert got.score == pytest.approx(expected.score, abs=1e-6)
    assert GuardCheck(guard=guard).invoke(ChatPromptValue(messages=[msg])).score == pytest.approx(expected.score, abs=1e-6)
    assert GuardCheck(guard=guard).invoke("just text").label in ("safe", "unsafe")


def test_output_stage_reads_the_last_ai_message(guard, images):
    msgs = [HumanMessage(content=[{"type": "text", "text": "q"}, _block(images[0])]), AIMessage(content="the answer")]
    got = GuardCheck(guard=guard, stage="output").invoke(msgs)
    assert got.stage == "output"
    assert got.score == pytest.approx(guard.check_output(images[:1], "q", "the answer").score, abs=1e-6)
    with pytest.raises(InputError, match="needs a response"):
        GuardCheck(guard=guard, stage="output").invoke(msgs[:1])


def test_batch_async_and_raise_on_block(guard, images):
    runnable = GuardCheck(guard=guard)
    inputs = [{"images": images[:k], "text": f"t{k}"} for k in (1, 2, 3)]
    batch = runnable.batch(inputs, config={"max_concurrency": 2})
    assert [v.score for v in batch] == pytest.approx([guard.check_input(i["images"], i["text"]).score for i in inputs], abs=1e-6)
    assert asyncio.run(runnable.ainvoke(inputs[0])).score == pytest.approx(batch[0].score, abs=1e-6)
    strict = GuardCheck(guard=guard.with_policy(threshold=0.0), raise_on_block=True)
    with pytest.raises(GuardrailViolation):
        strict.invoke(inputs[0])
    assert GuardCheck(guard=guard.with_policy(threshold=1.0), raise_on_block=True).invoke(inputs[0]).label == "safe"


def test_bad_inputs_are_typed_errors(guard):
    with pytest.raises(InputError, match="unknown keys"):
        GuardCheck(guard=guard).invoke({"img": []})
    with pytest.raises(InputError, match="cannot read"):
        GuardCheck(guard=guard).invoke(42)
    with pytest.raises(InputError, match="no human message"):
        GuardCheck(guard=guard).invoke([AIMessage(content="x")])
    with pytest.raises(InputError, match="unsupported message content part"):
        GuardCheck(guard=guard).invoke([HumanMessage(content=[{"type": "audio", "data": "x"}])])


def test_policy_threshold_passes_through(guard, images):
    assert GuardCheck(guard=guard.with_policy(Policy(threshold=0.0))).invoke({"images": images[:1], "text": "x"}).label == "unsafe"


# ------------------------------------------------------------------ every image shape, one boundary
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_shapes(img: Image.Image) -> dict[str, dict]:
    """The same PNG in every content shape LangChain users send."""
    b64 = base64.b64encode(_png(img)).decode()
    url = "data:image/png;base64," + b64
    return {
        "openai image_url": {"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
        "openai image_url (string)": {"type": "image_url", "image_url": url},
        "openai responses input_image": {"type": "input_image", "image_url": url},
        "standard base64": {"type": "image", "base64": b64, "mime_type": "image/png"},
        "standard url": {"type": "image", "url": url},
        "source_type base64": {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},
        "source_type url": {"type": "image", "source_type": "url", "url": url},
        "anthropic source": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
    }


def test_every_image_shape_reaches_the_guard_as_the_same_pixels(images, tmp_path):
    kw_guard, backend = keyword_guard("never-said")
    audit = tmp_path / "audit.jsonl"
    shapes = image_shapes(images[0])
    fake = GenericFakeChatModel(messages=iter([AIMessage(content="fine")] * len(shapes)))
    llm = GuardedChatModel(guard=kw_guard, model=fake, audit=audit)
    for shape in shapes.values():
        llm.invoke([HumanMessage(content=[shape, {"type": "text", "text": "what is it?"}])])
    pixels = pixel_sha256(images[0])
    encoded = hashlib.sha256(_png(images[0])).hexdigest()
    assert backend.images_seen == [[pixels]] * (2 * len(shapes))  # pre- and post-check of each call
    assert [r["images"] for r in AuditLog.read(audit)] == [[encoded]] * (2 * len(shapes))


def test_several_images_per_message_and_in_earlier_turns(images):
    shapes = list(image_shapes(images[0]).values())
    messages = [
        SystemMessage(content="be brief"),
        HumanMessage(content=[shapes[0], image_shapes(images[1])["standard base64"], {"type": "text", "text": "compare"}]),
        AIMessage(content="two squares"),
        HumanMessage(content=[{"type": "text", "text": "and now?"}, image_shapes(images[2])["anthropic source"]]),
    ]
    chat = split_chat(messages)
    assert [pixel_sha256(g.image) for g in chat.images] == [pixel_sha256(i) for i in images]
    assert chat.prompt_text() == "System: be brief\nUser: [image 1]\n[image 2]\ncompare\nAssistant: two squares\nUser: and now?"
    kw_guard, backend = keyword_guard("never-said")
    GuardCheck(guard=kw_guard).invoke(messages)
    assert backend.images_seen == [[pixel_sha256(i) for i in images]]


def test_images_the_guard_cannot_see_are_refused(images):
    kw_guard, _ = keyword_guard("never-said")
    fake = GenericFakeChatModel(messages=iter([AIMessage(content="unreachable")]))
    llm = GuardedChatModel(guard=kw_guard, model=fake)
    for part in ({"type": "image", "file_id": "file-abc"}, {"type": "image", "source_type": "id", "id": "file-abc"},
                 {"type": "input_image", "file_id": "file-abc"}):
        with pytest.raises(ImageInputError, match="provider file id .*cannot be checked"):
            llm.invoke([HumanMessage(content=[part, {"type": "text", "text": "hi"}])])
    with pytest.raises(ImageInputError, match="remote image URL refused"):
        llm.invoke([HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}])])
    with pytest.raises(InputError, match="'audio'.*cannot check"):
        llm.invoke([HumanMessage(content=[{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])])
    with pytest.raises(InputError, match="no human message"):
        llm.invoke([SystemMessage(content="only a system prompt")])


# ------------------------------------------------------------------ composition
def test_passthrough_gate_and_short_circuit(images):
    kw_guard, backend = keyword_guard("bomb")
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    fake = GenericFakeChatModel(messages=iter([AIMessage(content="an answer")]))
    gate = GuardCheck(guard=kw_guard, passthrough=True)
    value = prompt.invoke({"question": "hello"})
    assert gate.invoke(value) is value
    assert (prompt | gate | fake | StrOutputParser()).invoke({"question": "hello"}) == "an answer"
    with pytest.raises(GuardrailViolation) as info:
        (prompt | gate | fake | StrOutputParser()).invoke({"question": "a bomb"})
    assert info.value.verdict.label == "unsafe"
    unused = GenericFakeChatModel(messages=iter([]))  # raises if ever called
    chain = prompt | GuardCheck(guard=kw_guard).short_circuit(unused | StrOutputParser(), "Sorry, no.")
    assert chain.invoke({"question": "a bomb"}) == "Sorry, no."
    assert asyncio.run(chain.ainvoke({"question": "a bomb"})) == "Sorry, no."


# ------------------------------------------------------------------ tools and structured output pass through
class ToolCallingFake(GenericFakeChatModel):
    """A scripted chat model that binds tools like real providers do (as ``tools=`` call kwargs)."""

    calls: list = []

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, **({"tool_choice": tool_choice} if tool_choice else {}), **kwargs)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls.append(kwargs)
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


class Weather(BaseModel):
    """The weather in a city."""

    city: str


def tool_message(city: str) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": "Weather", "args": {"city": city}, "id": "call_1"}])


def test_tool_calls_and_structured_output_pass_through_the_guard():
    kw_guard, backend = keyword_guard("Mordor")
    fake = ToolCallingFake(messages=iter([tool_message("Paris"), tool_message("Mordor"), tool_message("Oslo"),
                                          tool_message("Mordor")]), calls=[])
    llm = GuardedChatModel(guard=kw_guard, model=fake, on_unsafe="raise")
    with_tools = llm.bind_tools([Weather], tool_choice="Weather")
    answer = with_tools.invoke("weather in Paris?")
    assert answer.tool_calls == [{"name": "Weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]
    assert fake.calls[-1]["tools"][0]["function"]["name"] == "Weather" and fake.calls[-1]["tool_choice"] == "Weather"
    assert backend.seen[-1] == ("output", '\n[tool call Weather] {"city": "Paris"}', 0.0)  # the arguments were checked
    with pytest.raises(GuardrailViolation):
        with_tools.invoke("weather in the dark land?")
    structured = llm.with_structured_output(Weather)
    assert structured.invoke("weather in Oslo?") == Weather(city="Oslo")
    with pytest.raises(GuardrailViolation):
        structured.invoke("weather in the dark land?")
    assert len(fake.calls) == 4


def test_on_unsafe_return_and_bad_options():
    kw_guard, _ = keyword_guard("bomb")
    fake = GenericFakeChatModel(messages=iter([AIMessage(content="a bomb recipe")]))
    flagged = GuardedChatModel(guard=kw_guard, model=fake, on_unsafe="return").invoke("hi")
    assert flagged.content == "a bomb recipe"
    decision = flagged.response_metadata["visguard"]
    assert decision["flagged"] and not decision["blocked"] and decision["stage"] == "output"
    with pytest.raises(InputError, match="pre_check"):
        GuardedChatModel(guard=kw_guard, model=fake, pre_check="sometimes")
    with pytest.raises(InputError, match="chat model"):
        GuardedChatModel(guard=kw_guard, model="gpt-4o")


def test_stream_raise_and_refusal_after_checked_text():
    script = "First part is fine. Then the bomb appears. And more text after it."
    for on_unsafe in ("refuse", "raise"):
        kw_guard, backend = keyword_guard("bomb")
        fake = GenericFakeChatModel(messages=iter([AIMessage(content=script)]))
        llm = GuardedChatModel(guard=kw_guard, model=fake, stream_check_every=2, on_unsafe=on_unsafe)
        out: list[str] = []
        if on_unsafe == "raise":
            with pytest.raises(GuardrailViolation):
                for chunk in llm.stream("tell me"):
                    out.append(chunk.content)
        else:
            chunks = list(llm.stream("tell me"))
            out = [c.content for c in chunks]
            assert chunks[-1].response_metadata["visguard"]["blocked"]
            assert out[-2].endswith("I can't help with that: it may involve unsafe content.")
            out = out[:-2]  # the refusal and the decision chunk
        released = "".join(out)
        assert "bomb" not in released and script.startswith(released) and released.startswith("First part is fine.")
        safe_texts = [t for stage, t, s in backend.seen if stage == "output" and s == 0.0]
        assert any(t.startswith(released) for t in safe_texts)  # everything released was checked


class PairedFake(GenericFakeChatModel):
    """Answers only while another call is in flight too (a barrier of two), and records the peak.

    With ``max_concurrency=2`` every call finds its pair and the peak is exactly 2; a batch that ran
    more calls at once would show a higher peak, one that ran them one by one would break the barrier.
    """

    state: dict = {}

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        with self.state["lock"]:
            self.state["active"] += 1
            self.state["peak"] = max(self.state["peak"], self.state["active"])
        try:
            self.state["barrier"].wait(timeout=60)
            return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            with self.state["lock"]:
                self.state["active"] -= 1


@pytest.mark.parametrize("method", ["batch", "abatch"])
def test_batch_and_abatch_honour_max_concurrency(method):
    kw_guard, _ = keyword_guard("never-said")
    state = {"lock": threading.Lock(), "active": 0, "peak": 0, "barrier": threading.Barrier(2)}
    fake = PairedFake(messages=iter([AIMessage(content=f"answer {i}") for i in range(4)]), state=state)
    llm = GuardedChatModel(guard=kw_guard, model=fake)
    inputs = [f"question {i}" for i in range(4)]
    config = {"max_concurrency": 2}
    out = llm.batch(inputs, config=config) if method == "batch" else asyncio.run(llm.abatch(inputs, config=config))
    assert sorted(m.content for m in out) == [f"answer {i}" for i in range(4)]
    assert fake.state["peak"] == 2  # (pydantic copied the dict; its lock and barrier are shared)
