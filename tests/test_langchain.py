"""The LangChain Runnable around a guard, on a real tiny checkpoint."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.prompt_values import ChatPromptValue
from PIL import Image

from visguard import Guard, GuardrailViolation, InputError, Policy
from visguard.langchain import GuardCheck


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
