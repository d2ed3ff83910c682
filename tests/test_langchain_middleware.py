"""GuardMiddleware for LangChain v1 agents (issue 25).

The `langchain` v1 package (`create_agent`) and langgraph are not installed in this repository's
environment (only langchain-core 1.8 and langchain-openai), so the agent loop is reproduced here as
`create_agent` runs it (langchain-ai/langchain, libs/langchain_v1/langchain/agents/factory.py at
01b781e): before_model -> model -> after_model -> tools -> ..., a hook's "jump_to": "end" ends the run,
and state updates are merged by message id as add_messages does. The test with the real
`create_agent` runs where langchain v1 is installed. Chat models are langchain-core's fakes; the guard
is a rule-based keyword guard (visguard_testing) that also flags one image by its pixels.
"""

from __future__ import annotations

import base64
import io

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from PIL import Image
from visguard_testing.backends import KeywordBackend, pixel_sha256

from visguard import Guard, GuardrailViolation, Policy
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.integrations.langchain.middleware import GuardMiddleware

UNSAFE_IMAGE = Image.new("RGB", (24, 24), (255, 0, 0))


class ImageAndKeywordBackend(KeywordBackend):
    """Unsafe when the text holds a keyword or an image is UNSAFE_IMAGE."""

    def score(self, prompts):
        by_text = super().score(prompts)
        bad = pixel_sha256(UNSAFE_IMAGE)
        return [1.0 if any(pixel_sha256(i) == bad for i in p.images) else s for p, s in zip(prompts, by_text, strict=True)]


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def guard_and_backend():
    backend = ImageAndKeywordBackend("bomb")
    return Guard(backend, VisguardFormat(), Policy()), backend


class Tool:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, args: dict) -> str:
        self.calls.append(args)
        return "sunny"


def merge(state: dict, update: dict | None) -> bool:
    """Apply a hook's update as add_messages does (same id: replaced); True when it ends the run."""
    if not update:
        return False
    for message in update.get("messages", []):
        ids = [m.id for m in state["messages"]]
        if message.id is not None and message.id in ids:
            state["messages"][ids.index(message.id)] = message
        else:
            state["messages"].append(message)
    return update.get("jump_to") == "end"


def run_agent(model, tool: Tool, middleware: GuardMiddleware, messages: list) -> dict:
    state = {"messages": list(messages)}
    for _ in range(6):
        if merge(state, middleware.before_model(state, None)):
            break
        answer = model.invoke(state["messages"])
        state["messages"].append(answer)
        if merge(state, middleware.after_model(state, None)):
            break
        last = state["messages"][-1]
        if not last.tool_calls:
            break
        for call in last.tool_calls:
            state["messages"].append(ToolMessage(tool(call["args"]), tool_call_id=call["id"]))
    return state


def tool_call_answer(args: dict, id_: str = "ai-1") -> AIMessage:
    return AIMessage(content="", id=id_, tool_calls=[{"name": "get_weather", "args": args, "id": "call_1", "type": "tool_call"}])


def test_safe_agent_run_calls_the_tool_and_answers(guard_and_backend):
    guard, backend = guard_and_backend
    model = FakeMessagesListChatModel(responses=[tool_call_answer({"city": "Paris"}), AIMessage("Sunny.", id="ai-2")])
    tool = Tool()
    state = run_agent(model, tool, GuardMiddleware(guard), [SystemMessage("be brief"), HumanMessage("weather in Paris?")])
    assert tool.calls == [{"city": "Paris"}] and state["messages"][-1].content == "Sunny."
    checked = [text for stage, text, _ in backend.seen]
    assert "Tool: sunny" in checked  # the tool result going into the second call was pre-checked


def test_an_unsafe_image_request_never_reaches_the_model(guard_and_backend):
    guard, _ = guard_and_backend
    model = FakeMessagesListChatModel(responses=[AIMessage("a description", id="ai-1")])
    request = HumanMessage(content=[{"type": "text", "text": "what should I do with this?"},
                                    {"type": "image_url", "image_url": {"url": data_url(UNSAFE_IMAGE)}}])
    state = run_agent(model, Tool(), GuardMiddleware(guard), [request])
    last = state["messages"][-1]
    assert model.i == 0  # the fake model was never asked
    assert last.response_metadata["visguard"]["blocked"] is True and last.response_metadata["visguard"]["stage"] == "input"
    assert set(last.response_metadata["visguard"]["input_verdict"]) == {"label", "score", "category", "sub_category", "stage"}
    # the same image in LangChain's standard image block is seen as well
    block = {"type": "image", "base64": data_url(UNSAFE_IMAGE).split(",", 1)[1], "mime_type": "image/png"}
    state = run_agent(model, Tool(), GuardMiddleware(guard), [HumanMessage(content=[{"type": "text", "text": "hi"}, block])])
    assert state["messages"][-1].response_metadata["visguard"]["blocked"] is True and model.i == 0


def test_an_unsafe_tool_call_is_replaced_and_the_tool_never_runs(guard_and_backend):
    guard, _ = guard_and_backend
    model = FakeMessagesListChatModel(responses=[tool_call_answer({"recipe": "bomb"}), AIMessage("done", id="ai-2")])
    tool = Tool()
    state = run_agent(model, tool, GuardMiddleware(guard), [HumanMessage("help me")])
    assert tool.calls == []
    last = state["messages"][-1]
    assert last.id == "ai-1" and last.tool_calls == [] and "bomb" not in str(last.content)
    assert len(state["messages"]) == 2  # the answer was replaced, not appended to


@pytest.mark.parametrize("answer", [
    AIMessage(content=[{"type": "reasoning", "reasoning": "build a bomb"}, {"type": "text", "text": "ok"}], id="x"),
    AIMessage(content="ok", id="x", invalid_tool_calls=[{"name": "f", "args": "{bomb", "id": "1", "error": None,
                                                          "type": "invalid_tool_call"}]),
    AIMessage(content="ok", id="x", additional_kwargs={"function_call": {"name": "f", "arguments": "bomb"}}),
    AIMessage(content=[{"type": "thinking", "thinking": "bomb"}], id="x"),
], ids=["reasoning", "invalid-tool-call", "function-call", "thinking"])
def test_non_text_output_is_post_checked(guard_and_backend, answer):
    guard, _ = guard_and_backend
    model = FakeMessagesListChatModel(responses=[answer])
    state = run_agent(model, Tool(), GuardMiddleware(guard), [HumanMessage("hi")])
    assert "bomb" not in str(state["messages"][-1].content) and state["messages"][-1].tool_calls == []


def test_raise_policy_and_hook_declarations(guard_and_backend):
    guard, _ = guard_and_backend
    middleware = GuardMiddleware(guard, on_unsafe="raise")
    with pytest.raises(GuardrailViolation):
        middleware.before_model({"messages": [HumanMessage("a bomb")]}, None)
    for hook in ("before_model", "after_model", "abefore_model", "aafter_model"):
        assert getattr(GuardMiddleware, hook).__can_jump_to__ == ["end"]


def test_with_create_agent(guard_and_backend):
    agents = pytest.importorskip("langchain.agents", reason="langchain v1 (create_agent) is not installed here")
    guard, _ = guard_and_backend
    model = FakeMessagesListChatModel(responses=[tool_call_answer({"recipe": "bomb"})])

    def get_weather(recipe: str) -> str:
        """Weather."""
        raise AssertionError("the tool must not run")

    agent = agents.create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard)])
    result = agent.invoke({"messages": [HumanMessage("help")]})
    assert result["messages"][-1].tool_calls == []
