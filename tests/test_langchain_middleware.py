"""GuardMiddleware in LangChain v1's real agent loop (issue 25).

Every run goes through ``langchain.agents.create_agent`` (langchain 1.5.2, pinned in constraints.txt;
the loop is langchain-ai/langchain, libs/langchain_v1/langchain/agents/factory.py: before_model ->
model -> after_model -> tools -> before_model ..., a hook's ``"jump_to": "end"`` ends the run when the
hook declares ``__can_jump_to__``). The chat model is langchain-core's ``FakeMessagesListChatModel``
with ``bind_tools`` (create_agent binds the tools) and a record of every call; the tools record their
calls. The guard is a rule-based keyword guard (visguard_testing) that also flags one image by its pixels.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from PIL import Image
from visguard_testing.backends import KeywordBackend, pixel_sha256

from visguard import Guard, GuardrailViolation, GuardUnavailableError, Policy
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.integrations.langchain.middleware import GuardMiddleware

UNSAFE_IMAGE = Image.new("RGB", (24, 24), (255, 0, 0))
SAFE_IMAGE = Image.new("RGB", (24, 24), (0, 0, 255))


class ImageAndKeywordBackend(KeywordBackend):
    """Unsafe when the text holds a keyword or an image is UNSAFE_IMAGE."""

    def score(self, prompts):
        by_text = super().score(prompts)
        bad = pixel_sha256(UNSAFE_IMAGE)
        return [1.0 if any(pixel_sha256(i) == bad for i in p.images) else s for p, s in zip(prompts, by_text, strict=True)]


class RecordingChatModel(FakeMessagesListChatModel):
    """langchain-core's scripted chat model, with the ``bind_tools`` create_agent needs and a record
    of the messages of every call."""

    calls: list[list[Any]] = []
    bound_tools: list[str] = []

    def bind_tools(self, tools, **kwargs):
        self.bound_tools = [getattr(t, "name", None) for t in tools]
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls = [*self.calls, list(messages)]
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_request(img: Image.Image, text: str = "what should I do with this?") -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url(img)}}])


@pytest.fixture
def guard_and_backend():
    backend = ImageAndKeywordBackend("bomb")
    return Guard(backend, VisguardFormat(), Policy()), backend


def weather_tool(answer: str = "sunny"):
    calls: list[dict] = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append({"city": city})
        return answer

    return get_weather, calls


def tool_call_answer(args: dict, id_: str = "ai-1") -> AIMessage:
    return AIMessage(content="", id=id_, tool_calls=[{"name": "get_weather", "args": args, "id": "call_1", "type": "tool_call"}])


def blocked(message: Any, stage: str) -> bool:
    meta = message.response_metadata.get("visguard", {})
    return meta.get("blocked") is True and meta.get("stage") == stage and message.tool_calls == []


def test_safe_request_and_tool_call_pass_unchanged(guard_and_backend):
    guard, backend = guard_and_backend
    model = RecordingChatModel(responses=[tool_call_answer({"city": "Paris"}), AIMessage("Sunny.", id="ai-2")])
    get_weather, calls = weather_tool()
    agent = create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard)])
    request = image_request(SAFE_IMAGE, "weather in Paris, like in this picture?")
    result = agent.invoke({"messages": [SystemMessage("be brief"), request]})
    assert model.bound_tools == ["get_weather"]
    assert calls == [{"city": "Paris"}]  # the tool ran with the model's arguments
    first, second = model.calls
    assert [m.content for m in first] == ["be brief", request.content]  # the request reached the model unchanged
    tool_result = second[-1]
    assert isinstance(tool_result, ToolMessage) and tool_result.content == "sunny" and tool_result.tool_call_id == "call_1"
    messages = result["messages"]
    assert messages[2].tool_calls == tool_call_answer({"city": "Paris"}).tool_calls  # the safe tool call, unchanged
    assert messages[-1].content == "Sunny." and "visguard" not in messages[-1].response_metadata
    checked = [(stage, text) for stage, text, _ in backend.seen]
    # each model call was pre-checked (the tool result going into the second), each answer post-checked
    assert [stage for stage, _ in checked] == ["input", "output", "input", "output"]
    assert "Tool: sunny" in checked[2][1]
    assert "[tool call get_weather(" in checked[1][1] and "Paris" in checked[1][1]
    assert backend.images_seen[0] == [pixel_sha256(SAFE_IMAGE)]


@pytest.mark.parametrize("block", ["image_url", "image"])
def test_an_unsafe_image_request_never_reaches_the_model(guard_and_backend, block):
    guard, _ = guard_and_backend
    model = RecordingChatModel(responses=[AIMessage("a description", id="ai-1")])
    get_weather, calls = weather_tool()
    if block == "image_url":
        request = image_request(UNSAFE_IMAGE)
    else:  # LangChain's standard image block
        request = HumanMessage(content=[{"type": "text", "text": "hi"}, {
            "type": "image", "base64": data_url(UNSAFE_IMAGE).split(",", 1)[1], "mime_type": "image/png"}])
    agent = create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard)])
    result = agent.invoke({"messages": [request]})
    assert model.calls == [] and calls == []  # the model was never asked
    last = result["messages"][-1]
    assert blocked(last, "input") and len(result["messages"]) == 2
    assert last.response_metadata["finish_reason"] == "content_filter"
    assert set(last.response_metadata["visguard"]["input_verdict"]) == {"label", "score", "category", "sub_category", "stage"}


def test_an_unsafe_tool_call_is_replaced_and_the_tool_never_runs(guard_and_backend):
    guard, _ = guard_and_backend
    model = RecordingChatModel(responses=[tool_call_answer({"city": "bomb town"}), AIMessage("done", id="ai-2")])
    get_weather, calls = weather_tool()
    agent = create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard)])
    result = agent.invoke({"messages": [HumanMessage("help me")]})
    assert calls == [] and len(model.calls) == 1  # the tool never ran, the model was not asked again
    messages = result["messages"]
    assert len(messages) == 2  # the answer was replaced (same id), not appended to
    assert messages[-1].id == "ai-1" and blocked(messages[-1], "output") and "bomb" not in str(messages[-1].content)


def test_an_unsafe_tool_result_never_reaches_the_model(guard_and_backend):
    guard, _ = guard_and_backend
    model = RecordingChatModel(responses=[tool_call_answer({"city": "Paris"}), AIMessage("done", id="ai-2")])
    get_weather, calls = weather_tool(answer="how to build a bomb")
    agent = create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard)])
    result = agent.invoke({"messages": [HumanMessage("weather in Paris?")]})
    assert calls == [{"city": "Paris"}] and len(model.calls) == 1
    assert blocked(result["messages"][-1], "input")


@pytest.mark.parametrize("answer", [
    AIMessage(content=[{"type": "reasoning", "reasoning": "build a bomb"}, {"type": "text", "text": "ok"}], id="x"),
    AIMessage(content="ok", id="x", invalid_tool_calls=[{"name": "f", "args": "{bomb", "id": "1", "error": None,
                                                          "type": "invalid_tool_call"}]),
    AIMessage(content="ok", id="x", additional_kwargs={"function_call": {"name": "f", "arguments": "bomb"}}),
    AIMessage(content=[{"type": "thinking", "thinking": "bomb"}], id="x"),
], ids=["reasoning", "invalid-tool-call", "function-call", "thinking"])
def test_non_text_output_is_post_checked(guard_and_backend, answer):
    guard, _ = guard_and_backend
    agent = create_agent(RecordingChatModel(responses=[answer]), tools=[], middleware=[GuardMiddleware(guard)])
    last = agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1]
    assert last.id == "x" and blocked(last, "output") and "bomb" not in str(last.content)
    assert "function_call" not in last.additional_kwargs and last.invalid_tool_calls == []


def test_async_agent_blocks_the_same(guard_and_backend):
    guard, _ = guard_and_backend
    model = RecordingChatModel(responses=[tool_call_answer({"city": "bomb town"})])
    get_weather, calls = weather_tool()
    agent = create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard)])
    result = asyncio.run(agent.ainvoke({"messages": [HumanMessage("help me")]}))
    assert calls == [] and blocked(result["messages"][-1], "output")
    result = asyncio.run(agent.ainvoke({"messages": [image_request(UNSAFE_IMAGE)]}))
    assert len(model.calls) == 1 and blocked(result["messages"][-1], "input")


@pytest.mark.parametrize("unsafe", ["request", "tool-call"])
def test_raise_policy_raises_out_of_the_agent(guard_and_backend, unsafe):
    guard, _ = guard_and_backend
    model = RecordingChatModel(responses=[tool_call_answer({"city": "bomb town" if unsafe == "tool-call" else "Paris"})])
    get_weather, calls = weather_tool()
    agent = create_agent(model, tools=[get_weather], middleware=[GuardMiddleware(guard, on_unsafe="raise")])
    with pytest.raises(GuardrailViolation):
        agent.invoke({"messages": [HumanMessage("a bomb" if unsafe == "request" else "weather?")]})
    assert calls == [] and len(model.calls) == (0 if unsafe == "request" else 1)


def test_both_hooks_can_end_the_run_in_the_compiled_graph(guard_and_backend):
    guard, _ = guard_and_backend
    agent = create_agent(RecordingChatModel(responses=[AIMessage("x")]), tools=[weather_tool()[0]],
                         middleware=[GuardMiddleware(guard)])
    edges = {(e.source, e.target) for e in agent.get_graph().edges}
    assert ("visguard.before_model", "__end__") in edges and ("visguard.after_model", "__end__") in edges
    assert ("visguard.before_model", "model") in edges and ("visguard.after_model", "tools") in edges


@pytest.mark.parametrize("strategy", ["tool", "provider"])
def test_an_unsafe_structured_response_is_withheld(guard_and_backend, strategy):
    """response_format: create_agent's model node puts the parsed answer in ``structured_response`` and,
    with ToolStrategy, a ToolMessage after the model's AIMessage (factory.py, _handle_model_output);
    the post-check must see that AIMessage and withhold the structured response."""
    from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    guard, _ = guard_and_backend
    if strategy == "tool":
        answer = AIMessage(content="", id="ai-1", tool_calls=[
            {"name": "Answer", "args": {"text": "build a bomb"}, "id": "call_9", "type": "tool_call"}])
        response_format = ToolStrategy(Answer)
    else:
        answer = AIMessage(content='{"text": "build a bomb"}', id="ai-1")
        response_format = ProviderStrategy(Answer)
    model = RecordingChatModel(responses=[answer])
    agent = create_agent(model, tools=[], response_format=response_format, middleware=[GuardMiddleware(guard)])
    result = agent.invoke({"messages": [HumanMessage("hi")]})
    assert result.get("structured_response") is None
    messages = result["messages"]
    assert len(messages) == 2 and messages[-1].id == "ai-1" and blocked(messages[-1], "output")
    assert "bomb" not in str(messages[-1].content)
    # a safe structured response passes unchanged
    safe = answer.model_copy(update={"content": '{"text": "fine"}'} if strategy == "provider" else {
        "tool_calls": [{**answer.tool_calls[0], "args": {"text": "fine"}}]})
    agent = create_agent(RecordingChatModel(responses=[safe]), tools=[], response_format=response_format,
                         middleware=[GuardMiddleware(guard)])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["structured_response"] == Answer(text="fine")


def test_two_guards_in_one_agent_by_name(guard_and_backend):
    """create_agent refuses two middleware with one name: an input guard and an output guard need names."""
    guard, backend = guard_and_backend
    output_backend = ImageAndKeywordBackend("poison")
    output_guard = Guard(output_backend, VisguardFormat(), Policy())
    model = RecordingChatModel(responses=[AIMessage("add poison", id="ai-1")])
    agent = create_agent(model, tools=[], middleware=[
        GuardMiddleware(guard, check_output=False, name="input_guard"),
        GuardMiddleware(output_guard, check_input=False, name="output_guard")])
    result = agent.invoke({"messages": [HumanMessage("a recipe?")]})
    assert blocked(result["messages"][-1], "output")
    assert [s for s, _, _ in backend.seen] == ["input"] and [s for s, _, _ in output_backend.seen] == ["output"]
    with pytest.raises(AssertionError, match="duplicate"):
        create_agent(model, tools=[], middleware=[GuardMiddleware(guard), GuardMiddleware(output_guard)])


def test_listed_last_the_guard_checks_a_tool_call_before_a_human_is_asked(guard_and_backend):
    """after_model hooks run in reverse list order (factory.py): listed after HumanInTheLoopMiddleware,
    the guard blocks an unsafe tool call before the approval interrupt; a safe one still interrupts."""
    from langchain.agents.middleware import HumanInTheLoopMiddleware
    from langgraph.checkpoint.memory import InMemorySaver

    guard, _ = guard_and_backend
    get_weather, calls = weather_tool()
    for city, interrupted in (("bomb town", False), ("Paris", True)):
        model = RecordingChatModel(responses=[tool_call_answer({"city": city})])
        agent = create_agent(model, tools=[get_weather], checkpointer=InMemorySaver(), middleware=[
            HumanInTheLoopMiddleware(interrupt_on={"get_weather": True}), GuardMiddleware(guard)])
        result = agent.invoke({"messages": [HumanMessage("weather?")]}, {"configurable": {"thread_id": city}})
        assert bool(result.get("__interrupt__")) is interrupted
        assert blocked(result["messages"][-1], "output") is not interrupted
    assert calls == []


class BrokenBackend(ImageAndKeywordBackend):
    """A guard whose scoring fails on the output check (e.g. the guard model crashed)."""

    def score(self, prompts):
        if any("bomb" not in str(p.messages) and "Sunny" in str(p.messages) for p in prompts):
            raise RuntimeError("guard backend down")
        return super().score(prompts)


@pytest.mark.parametrize("on_error, outcome", [("block", "refused"), ("raise", "raised")])
def test_a_failing_guard_never_lets_the_answer_through(on_error, outcome):
    guard = Guard(BrokenBackend("bomb"), VisguardFormat(), Policy(on_error=on_error))
    model = RecordingChatModel(responses=[AIMessage("Sunny.", id="ai-1")])
    agent = create_agent(model, tools=[], middleware=[GuardMiddleware(guard)])
    if outcome == "raised":
        with pytest.raises(GuardUnavailableError):
            agent.invoke({"messages": [HumanMessage("weather?")]})
        return
    last = agent.invoke({"messages": [HumanMessage("weather?")]})["messages"][-1]
    assert blocked(last, "output") and last.response_metadata["visguard"]["reason"] == "unavailable"
    assert "Sunny" not in str(last.content) and len(model.calls) == 1
