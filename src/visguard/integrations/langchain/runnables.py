"""LangChain integration (extra ``visguard[langchain]``): guarded chat models and guard checks.

- :class:`GuardedChatModel` wraps any LangChain chat model and is itself one: it pre-checks the
  conversation's images and text, calls the wrapped model, post-checks the answer (streams are
  re-checked as they grow and never release text that failed a check), then returns the answer, a
  refusal ``AIMessage`` or raises, per :class:`~visguard.hosting.guarded.GuardedOptions`. It runs on the same
  :class:`~visguard.hosting.guarded.GuardedModel` machinery as ``guard.wrap`` (through the ``langchain``
  host plugin), so parallel pre-checks cancel the wrapped model's request when they block.
- :class:`GuardCheck` is a guard check as a Runnable: it returns the :class:`Verdict`, or, with
  ``passthrough=True``, its input unchanged when allowed (for ``prompt | check | llm | parser``).
- :func:`split_chat` is where LangChain messages become guard inputs: every image of every
  message goes through visguard's one image boundary (OpenAI ``image_url`` parts, LangChain
  standard and ``source_type`` blocks, Anthropic-style blocks).

Decisions are surfaced as custom callback events (``visguard_verdict`` per verdict,
``visguard_result`` per guarded call: the full verdicts, to the operator's own callback handlers) and,
for the guarded chat model, in the answer's ``response_metadata["visguard"]`` (labels, scores and
categories only: :func:`~visguard.hosting.public.public_decision`).
"""

from __future__ import annotations

import asyncio
import functools
import operator
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr

try:
    from langchain_core.callbacks import (
        AsyncCallbackManager,
        AsyncCallbackManagerForLLMRun,
        CallbackManager,
        CallbackManagerForLLMRun,
    )
    from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_messages
    from langchain_core.messages.utils import message_chunk_to_message
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.prompt_values import PromptValue
    from langchain_core.runnables import (
        Runnable,
        RunnableBinding,
        RunnableConfig,
        RunnableLambda,
        RunnableParallel,
        RunnableSequence,
        RunnableSerializable,
    )
    from langchain_core.runnables.fallbacks import RunnableWithFallbacks
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("visguard.integrations.langchain.runnables needs langchain-core: pip install 'visguard[langchain]'") from exc

from visguard.core.errors import GuardrailViolation, GuardUnavailableError, InputError
from visguard.core.images import ImageLimits, load_images
from visguard.core.policy import Mode
from visguard.core.types import GuardRequest, Verdict
from visguard.engine.checker import Checker, allows, enforce
from visguard.hosting.guarded import GuardedModel, GuardedOptions, GuardedResult
from visguard.hosting.public import public_decision
from visguard.integrations.langchain.messages import answer_text
from visguard.integrations.openai.wire import SplitChat

__all__ = ["GuardCheck", "GuardedChatModel", "request_from_langchain", "split_chat"]

#: custom callback event names
VERDICT_EVENT = "visguard_verdict"
RESULT_EVENT = "visguard_result"

_IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}


# ---------------------------------------------------------------------------------- messages -> guard inputs


def split_chat(messages: Any, *, limits: ImageLimits | None = None) -> SplitChat:
    """Take a LangChain conversation apart into images, the last user text and the earlier turns.

    Args:
        messages: a list of messages (``BaseMessage``, ``(role, text)`` tuples, dicts), a
            ``PromptValue`` or a string.
        limits: image-boundary limits.

    Returns:
        Every image of every message, in order, through the image boundary; the last human
        message's text parts (with any later turns, e.g. tool results, appended as
        ``Role: text`` lines); the turns before it, with ``[image N]`` where image N was.
        ``prompt_text()`` is what the guard reads.

    Raises:
        InputError: no human message, or a human/system/tool message holds a part the guard
            cannot read (audio, files ...): such input is refused, never passed unchecked.
        ImageInputError: an image was refused at the boundary (it names the image's index).
    """
    msgs = _messages(messages)
    humans = [i for i, m in enumerate(msgs) if m.type == "human"]
    if not humans:
        raise InputError("no human message to check")
    last = humans[-1]
    parts: list[Any] = []
    rendered: list[tuple[str, str]] = []
    for i, message in enumerate(msgs):
        role = _ROLES.get(message.type, getattr(message, "role", message.type))
        text = _message_text(message, parts, placeholders=i != last)
        rendered.append((role, text))
    images = load_images(parts, limits)
    text = rendered[last][1] + "".join(f"\n{role.title()}: {t}" for role, t in rendered[last + 1 :])
    return SplitChat(images=images, text=text, conversation=[{"role": r, "content": t} for r, t in rendered[:last]])


def _messages(value: Any) -> list[BaseMessage]:
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, str):
        return convert_to_messages([("human", value)])
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence):
        try:
            return convert_to_messages(value)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise InputError(f"cannot read chat messages: {exc}") from exc
    raise InputError(f"cannot read a guard request from {type(value).__name__}")


def _message_text(message: BaseMessage, images: list[Any], *, placeholders: bool) -> str:
    """The message's text; its image parts are appended to ``images``."""
    content = message.content
    if message.type == "ai":  # text plus tool calls, like the answers the guard post-checks
        content_parts = content if isinstance(content, list) else []
        for part in content_parts:
            if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                images.append(part)
        return answer_text(message)
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
            images.append(part)
            if placeholders:
                texts.append(f"[image {len(images)}]")
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InputError(f"unsupported message content part of type {kind!r}: the guard cannot check it")
    return "\n".join(texts)


def request_from_langchain(guard: Checker, value: Any, *, stage: Literal["input", "output"] = "input") -> GuardRequest:
    """Build a :class:`GuardRequest` from a LangChain-style input.

    - ``str``: the user's text, no images;
    - ``dict``: keys ``images`` (any image form), ``text``, ``response``, ``conversation``;
    - messages / ``PromptValue``: see :func:`split_chat`; for an output check the last AI
      message is the response and the messages before it the request.

    Raises:
        InputError: the input has none of these shapes, or an output check has no response.
    """
    if isinstance(value, dict):
        unknown = set(value) - {"images", "text", "response", "conversation"}
        if unknown:
            raise InputError(f"unknown keys {sorted(map(str, unknown))}; expected images, text, response, conversation")
        request = guard.request(value.get("images"), value.get("text", ""), value.get("response"),
                                conversation=value.get("conversation") or ())
    elif isinstance(value, str):
        request = guard.request(None, value)
    else:
        msgs = _messages(value)
        response = None
        if stage == "output":
            ais = [i for i, m in enumerate(msgs) if m.type == "ai"]
            if ais:
                response = answer_text(msgs[ais[-1]])
                msgs = msgs[: ais[-1]]
        chat = split_chat(msgs, limits=guard.policy.limits)
        request = guard.request(chat.images, chat.prompt_text(), response)
    if stage == "output" and request.response is None:
        raise InputError("an output check needs a response (an AI message or the 'response' key)")
    return request


# ---------------------------------------------------------------------------------- GuardCheck


class GuardCheck(RunnableSerializable[Any, Any]):
    """Run a visguard check as a LangChain Runnable.

    Args:
        guard: the guard to run, any :class:`~visguard.engine.checker.Checker` (a Guard, a Cascade).
        stage: ``input`` (pre-check) or ``output`` (post-check of the last AI message).
        mode: overrides the guard policy's mode.
        raise_on_block: raise :class:`GuardrailViolation` when the guard does not allow the input
            (unsafe, or unavailable under ``on_error="block"``) instead of returning the verdict.
        passthrough: return the input unchanged when the guard allows it, and raise
            :class:`GuardrailViolation` when it does not: a gate for ``prompt | check | llm |
            parser``. :meth:`short_circuit` turns the raise into a fixed answer.

    Returns (``invoke``): the :class:`Verdict`, or the input itself with ``passthrough=True``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Checker = Field(exclude=True)
    stage: Literal["input", "output"] = "input"
    mode: Mode | None = None
    raise_on_block: bool = False
    passthrough: bool = False

    def _check(self, value: Any) -> Any:
        request = request_from_langchain(self.guard, value, stage=self.stage)
        verdict = enforce(self.guard, self.guard.report_batch([request], mode=self.mode))[0]
        dispatch_custom_event(VERDICT_EVENT, verdict.model_dump(mode="json"))
        return self._decide(value, verdict)

    async def _acheck(self, value: Any) -> Any:
        request = request_from_langchain(self.guard, value, stage=self.stage)
        verdict = enforce(self.guard, await asyncio.to_thread(self.guard.report_batch, [request], mode=self.mode))[0]
        await adispatch_custom_event(VERDICT_EVENT, verdict.model_dump(mode="json"))
        return self._decide(value, verdict)

    def _decide(self, value: Any, verdict: Verdict) -> Any:
        if (self.raise_on_block or self.passthrough) and not allows(self.guard, verdict):
            raise GuardrailViolation(verdict)
        return value if self.passthrough else verdict

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._check, input, config, run_type="chain")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._acheck, input, config, run_type="chain")

    def short_circuit(self, then: Runnable[Any, Any], refusal: Any) -> Runnable[Any, Any]:
        """``check | then``, answering ``refusal`` instead when the guard blocks.

        ``then`` is not run for a blocked input: ``refusal`` (e.g. a string before a
        ``StrOutputParser`` chain's end, or an ``AIMessage``) is the chain's output.
        """
        gate = self.model_copy(update={"passthrough": True})
        return RunnableSequence(gate, then).with_fallbacks(
            [RunnableLambda(lambda _: refusal, name="visguard_refusal")], exceptions_to_handle=(GuardrailViolation,)
        )


# ---------------------------------------------------------------------------------- GuardedChatModel


class GuardedChatModel(BaseChatModel):
    """A LangChain chat model behind a guard; itself a chat model.

    Example::

        llm = GuardedChatModel(guard=guard, model=ChatOpenAI(model="..."), pre_check="parallel")
        chain = prompt | llm | StrOutputParser()

    Each call pre-checks the conversation (every image of every message, the last user text
    and the turns before it), calls the wrapped model with the messages untouched, post-checks
    its answer (text and tool-call arguments) and returns the wrapped model's own message, a
    refusal ``AIMessage`` (``response_metadata["finish_reason"] == "content_filter"``), or
    raises :class:`GuardrailViolation`, per ``on_unsafe``. The decision is in
    ``response_metadata["visguard"]``: the client-facing shape ``visguard serve`` sends too
    (:func:`~visguard.hosting.public.public_decision` of :meth:`GuardedResult.summary`: labels, scores,
    categories; no raw output, reasoning, safe answer or timings, which may quote blocked content). A
    stream carries it on its last chunk. The full verdicts (:meth:`GuardedResult.summary`) are sent
    as custom callback events to the caller's own handlers.

    Streams never yield text before a check of everything up to it passed; a stream blocked on
    the way ends with a chunk holding the refusal. ``bind_tools`` and
    ``with_structured_output`` use the wrapped model's own, with the guard around it.
    The wrapped model runs without the caller's callbacks (so no streaming handler sees
    unchecked text); its own ``callbacks`` still apply.

    Args:
        guard: the guard, any :class:`~visguard.engine.checker.Checker` (a Guard, a Cascade; its policy's
            ``on_error`` and image limits apply, and a Guard's ``threshold`` and ``timeout_s``).
        model: the chat model to guard.
        options: a :class:`~visguard.hosting.guarded.GuardedOptions`; or pass its fields as keywords
            (``pre_check``, ``post_check``, ``on_unsafe``, ``refusal``, ``stream_check_every``,
            ``audit`` ...).
        **kwargs: chat model fields (``callbacks``, ``tags``, ``metadata``, ``name`` ...).

    Raises:
        InputError: an option is invalid, or ``model`` is not a chat model.
    """

    guard: Checker = Field(exclude=True)
    model: BaseChatModel
    options: GuardedOptions = Field(default_factory=GuardedOptions, exclude=True)
    _guarded: GuardedModel = PrivateAttr()

    def __init__(self, *, guard: Checker, model: BaseChatModel, options: GuardedOptions | None = None, **kwargs: Any) -> None:
        chosen = {k: kwargs.pop(k) for k in list(kwargs) if k in GuardedOptions.model_fields}
        if options is not None and chosen:
            raise InputError(f"pass options= or option keywords {sorted(chosen)}, not both")
        if not isinstance(model, BaseChatModel):
            raise InputError(f"model must be a LangChain chat model (BaseChatModel), got {type(model).__name__}")
        if options is not None:
            chosen = {name: getattr(options, name) for name in GuardedOptions.model_fields}
        guarded = GuardedModel(guard, model, **chosen)
        # pydantic's dataclass_transform gives mypy BaseChatModel's own fields as its __init__ signature; at run
        # time BaseModel.__init__ validates this class's fields (guard, model, options)
        super().__init__(guard=guard, model=model, options=guarded.options, **kwargs)  # type: ignore[call-arg]
        self._guarded = guarded

    @classmethod
    def from_guarded(cls, guarded: GuardedModel, **kwargs: Any) -> GuardedChatModel:
        """The chat model of ``guard.wrap(chat_model, ...)``, sharing its host, options and audit log."""
        model = getattr(guarded.host, "model", None)
        if guarded.host.name != "langchain" or not isinstance(model, BaseChatModel):
            raise InputError(f"{guarded!r} does not guard a LangChain chat model")
        self = cls(guard=guarded.guard, model=model, options=guarded.options, **kwargs)
        self._guarded.close()
        self._guarded = guarded
        return self

    @property
    def guarded(self) -> GuardedModel:
        """The :class:`~visguard.hosting.guarded.GuardedModel` doing the work."""
        return self._guarded

    @property
    def _llm_type(self) -> str:
        return "visguard-guarded"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self._guarded.host.model_id,
            "guard": self.guard.model_id,
            "pre_check": self.options.pre_check,
            "post_check": self.options.post_check,
            "on_unsafe": self.options.on_unsafe,
        }

    # ------------------------------------------------------------------ calls
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        chat, record, call_kwargs = self._prepare(messages, stop, kwargs)
        try:
            result = self._guarded.generate(chat.images, chat.prompt_text(), **call_kwargs)
        except (GuardrailViolation, GuardUnavailableError) as exc:
            _events(run_manager, exc.verdict)
            raise
        _events(run_manager, result.input_verdict, result.output_verdict, result=result)
        return ChatResult(generations=[ChatGeneration(message=_answer(result, record))])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        chat, record, call_kwargs = self._prepare(messages, stop, kwargs)
        try:
            result = await self._guarded.agenerate(chat.images, chat.prompt_text(), **call_kwargs)
        except (GuardrailViolation, GuardUnavailableError) as exc:
            await _aevents(run_manager, exc.verdict)
            raise
        await _aevents(run_manager, result.input_verdict, result.output_verdict, result=result)
        return ChatResult(generations=[ChatGeneration(message=_answer(result, record))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        chat, record, call_kwargs = self._prepare(messages, stop, kwargs)
        stream = self._guarded.stream(chat.images, chat.prompt_text(), **call_kwargs)
        released = _Released(record)
        try:
            for piece in stream:
                for chunk in released.chunks(piece, refusal=stream.blocked):
                    yield ChatGenerationChunk(message=chunk)
        except (GuardrailViolation, GuardUnavailableError) as exc:
            _events(run_manager, exc.verdict)
            raise
        finally:
            stream.close()
        result = stream.result
        assert result is not None
        _events(run_manager, result.input_verdict, result.output_verdict, result=result)
        for chunk in released.end(result):
            yield ChatGenerationChunk(message=chunk)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        chat, record, call_kwargs = self._prepare(messages, stop, kwargs)
        stream = self._guarded.astream(chat.images, chat.prompt_text(), **call_kwargs)
        released = _Released(record)
        try:
            async for piece in stream:
                for chunk in released.chunks(piece, refusal=stream.blocked):
                    yield ChatGenerationChunk(message=chunk)
        except (GuardrailViolation, GuardUnavailableError) as exc:
            await _aevents(run_manager, exc.verdict)
            raise
        finally:
            await stream.aclose()
        result = stream.result
        assert result is not None
        await _aevents(run_manager, result.input_verdict, result.output_verdict, result=result)
        for chunk in released.end(result):
            yield ChatGenerationChunk(message=chunk)

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[SplitChat, list[Any], dict[str, Any]]:
        chat = split_chat(messages, limits=self.guard.policy.limits)
        record: list[Any] = []
        call_kwargs = {**kwargs, "messages": messages, "record": record}
        if stop is not None:
            call_kwargs["stop"] = stop
        return chat, record, call_kwargs

    # ------------------------------------------------------------------ tools and structured output
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Runnable[Any, AIMessage]:
        """The wrapped model's ``bind_tools``, with this guard around it (tool arguments are post-checked)."""
        return self._guarding(self.model.bind_tools(tools, tool_choice=tool_choice, **kwargs))

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Runnable[Any, Any]:
        """The wrapped model's ``with_structured_output``, with this guard around the model call."""
        return self._guarding(self.model.with_structured_output(schema, include_raw=include_raw, **kwargs))

    def _guarding(self, runnable: Runnable[Any, Any]) -> Runnable[Any, Any]:
        found: list[bool] = []
        out = self._rebind(runnable, found)
        if not found:
            raise InputError(f"cannot guard {type(runnable).__name__}: it does not call the wrapped model "
                             "through a binding visguard recognises")
        return out

    def _rebind(self, runnable: Any, found: list[bool]) -> Any:
        """``runnable`` with every call of the wrapped model replaced by a call of this model."""
        if runnable is self.model:
            found.append(True)
            return self
        if isinstance(runnable, RunnableBinding) and runnable.bound is self.model:
            found.append(True)
            bound = self.bind(**runnable.kwargs)
            return bound.with_config(runnable.config) if runnable.config else bound
        if isinstance(runnable, RunnableSequence):
            return RunnableSequence(*(self._rebind(step, found) for step in runnable.steps), name=runnable.name)
        if isinstance(runnable, RunnableParallel):
            return RunnableParallel({k: self._rebind(v, found) for k, v in runnable.steps__.items()})
        if isinstance(runnable, RunnableWithFallbacks):
            return runnable.model_copy(update={
                "runnable": self._rebind(runnable.runnable, found),
                "fallbacks": [self._rebind(f, found) for f in runnable.fallbacks],
            })
        return runnable


def _answer(result: GuardedResult, record: list[Any]) -> BaseMessage:
    """The message a guarded call returns: the wrapped model's own, or the refusal."""
    metadata = {"visguard": public_decision(result.summary())}  # labels, scores, categories only
    if result.blocked:
        return AIMessage(content=result.text, response_metadata={**metadata, "finish_reason": "content_filter"})
    if not record:
        raise InputError("the wrapped chat model returned no message")
    if isinstance(record[-1], AIMessageChunk):  # it streamed (parallel pre-check): put the pieces together
        message = message_chunk_to_message(functools.reduce(operator.add, record))
    else:
        message = record[-1]
    return message.model_copy(update={"response_metadata": {**message.response_metadata, **metadata}})


class _Released:
    """Maps the text a guarded stream releases back to the wrapped model's own chunks.

    The ``langchain`` host records each chunk before handing its text on, and a release is
    always a run of whole pieces, so the released text is exactly the text of the next chunks.
    Chunks without text (metadata, usage) go out with the release they follow.
    """

    def __init__(self, record: list[Any]) -> None:
        self.record = record
        self.next = 0

    def chunks(self, piece: str, *, refusal: bool) -> list[AIMessageChunk]:
        if refusal:
            return [AIMessageChunk(content=piece)]
        out: list[AIMessageChunk] = []
        need = len(piece)
        while need > 0 and self.next < len(self.record):
            chunk = self.record[self.next]
            self.next += 1
            need -= len(answer_text(chunk))
            out.append(chunk)
        if need != 0:  # pragma: no cover - a bookkeeping bug must not release unchecked text
            raise AssertionError("released text does not match the wrapped model's chunks")
        return out

    def end(self, result: GuardedResult) -> list[AIMessageChunk]:
        """The chunks left once the stream ended (text-free ones only), then the decision."""
        rest = [] if result.blocked else [c for c in self.record[self.next :] if not answer_text(c)]
        self.next = len(self.record)
        last = AIMessageChunk(content="", response_metadata={"visguard": public_decision(result.summary())},
                              chunk_position="last")
        return [*rest, last]


def _event_payloads(verdicts: Sequence[Verdict | None], result: GuardedResult | None) -> list[tuple[str, dict[str, Any]]]:
    out = [(VERDICT_EVENT, v.model_dump(mode="json")) for v in verdicts if v is not None]
    if result is not None:
        out.append((RESULT_EVENT, result.summary()))
    return out


def _manager_fields(run_manager: Any) -> dict[str, Any]:
    # A chat model's run manager has no get_child(): address the run's own handlers directly.
    return {
        "handlers": run_manager.handlers,
        "inheritable_handlers": run_manager.inheritable_handlers,
        "parent_run_id": run_manager.run_id,
        "tags": run_manager.tags,
        "inheritable_tags": run_manager.inheritable_tags,
        "metadata": run_manager.metadata,
        "inheritable_metadata": run_manager.inheritable_metadata,
    }


def _events(run_manager: CallbackManagerForLLMRun | None, *verdicts: Verdict | None,
            result: GuardedResult | None = None) -> None:
    for name, data in _event_payloads(verdicts, result):
        if run_manager is not None:
            CallbackManager(**_manager_fields(run_manager)).on_custom_event(name, data, run_id=run_manager.run_id)
        else:  # streaming: LangChain gives no run manager; the enclosing run (if any) gets the event
            try:
                dispatch_custom_event(name, data)
            except RuntimeError:  # no enclosing run: nobody to tell
                pass


async def _aevents(run_manager: AsyncCallbackManagerForLLMRun | None, *verdicts: Verdict | None,
                   result: GuardedResult | None = None) -> None:
    for name, data in _event_payloads(verdicts, result):
        if run_manager is not None:
            await AsyncCallbackManager(**_manager_fields(run_manager)).on_custom_event(name, data, run_id=run_manager.run_id)
        else:
            try:
                await adispatch_custom_event(name, data)
            except RuntimeError:
                pass
