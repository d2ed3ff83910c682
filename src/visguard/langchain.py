"""LangChain integration (extra ``visguard[langchain]``): a guard check as a Runnable.

``GuardCheck`` is a ``RunnableSerializable`` that takes a chat input (a string, a list of messages,
a ``PromptValue``, or a dict ``{"images", "text", "response"}``) and returns a :class:`Verdict`.
Images are read from LangChain content blocks (``{"type": "image", "base64"|"url": ...}``) and
OpenAI-style ``image_url`` parts through visguard's one image boundary. Each decision is also
surfaced as a custom callback event named ``visguard_verdict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import ConfigDict, Field

try:
    from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
    from langchain_core.prompt_values import PromptValue
    from langchain_core.runnables import RunnableConfig, RunnableSerializable
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("visguard.langchain needs langchain-core: pip install 'visguard[langchain]'") from exc

from visguard.errors import GuardrailViolation, InputError
from visguard.guard import Guard
from visguard.policy import Mode
from visguard.types import GuardRequest, Verdict

__all__ = ["GuardCheck", "request_from_langchain"]


def request_from_langchain(guard: Guard, value: Any, *, stage: Literal["input", "output"] = "input") -> GuardRequest:
    """Build a :class:`GuardRequest` from a LangChain-style input.

    - ``str``: the user's text, no images;
    - ``dict``: keys ``images`` (any image form), ``text``, ``response``;
    - messages / ``PromptValue``: the last human message gives text and images; for an output
      check the last AI message gives the response.

    Raises:
        InputError: the input has none of these shapes, or an output check has no response.
    """
    if isinstance(value, str):
        request = guard.request(None, value)
    elif isinstance(value, dict):
        unknown = set(value) - {"images", "text", "response"}
        if unknown:
            raise InputError(f"unknown keys {sorted(unknown)}; expected images, text, response")
        request = guard.request(value.get("images"), value.get("text", ""), value.get("response"))
    else:
        messages = value.to_messages() if isinstance(value, PromptValue) else value
        if not isinstance(messages, Sequence) or not all(isinstance(m, BaseMessage) for m in messages):
            raise InputError(f"cannot read a guard request from {type(value).__name__}")
        humans = [m for m in messages if isinstance(m, HumanMessage)]
        if not humans:
            raise InputError("no human message to check")
        text, images = _split_content(humans[-1].content)
        response = None
        ais = [m for m in messages if isinstance(m, AIMessage)]
        if stage == "output" and ais:
            response, _ = _split_content(ais[-1].content)
        request = guard.request(images, text, response)
    if stage == "output" and request.response is None:
        raise InputError("an output check needs a response (an AI message or the 'response' key)")
    return request


def _split_content(content: str | list[Any]) -> tuple[str, list[Any]]:
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            images.append(part)
        else:
            raise InputError(f"unsupported message content part: {part!r:.80}")
    return "\n".join(texts), images


class GuardCheck(RunnableSerializable[Any, Verdict]):
    """Run a visguard check as a LangChain Runnable.

    Args:
        guard: the guard to run.
        stage: ``input`` (pre-check) or ``output`` (post-check of the last AI message).
        mode: overrides the guard policy's mode.
        raise_on_block: raise :class:`GuardrailViolation` when the guard does not allow the input
            (unsafe, or unavailable under ``on_error="block"``) instead of returning the verdict.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard = Field(exclude=True)
    stage: Literal["input", "output"] = "input"
    mode: Mode | None = None
    raise_on_block: bool = False

    def _check(self, value: Any) -> Verdict:
        verdict = self.guard.check(request_from_langchain(self.guard, value, stage=self.stage), mode=self.mode)
        dispatch_custom_event("visguard_verdict", verdict.model_dump())
        return self._decide(verdict)

    async def _acheck(self, value: Any) -> Verdict:
        request = request_from_langchain(self.guard, value, stage=self.stage)
        verdict = await self.guard.acheck(request, mode=self.mode)
        await adispatch_custom_event("visguard_verdict", verdict.model_dump())
        return self._decide(verdict)

    def _decide(self, verdict: Verdict) -> Verdict:
        if self.raise_on_block and not self.guard.allows(verdict):
            raise GuardrailViolation(verdict)
        return verdict

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Verdict:
        return self._call_with_config(self._check, input, config, run_type="tool")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Verdict:
        return await self._acall_with_config(self._acheck, input, config, run_type="tool")
