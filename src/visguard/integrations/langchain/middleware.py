"""A guard middleware for LangChain v1 agents: ``create_agent(model, tools, middleware=[GuardMiddleware(guard)])``.

LangChain v1's agent loop calls a middleware's ``before_model(state, runtime)`` before each model
call and ``after_model(state, runtime)`` after it (``langchain.agents.middleware.AgentMiddleware``;
langchain-ai/langchain, libs/langchain_v1/langchain/agents/middleware/types.py at 01b781e). A hook
returns a state update (``{"messages": [...]}``, merged by ``add_messages``: a message with an
existing id replaces it) and may end the run with ``"jump_to": "end"`` when the hook declares it may
(``__can_jump_to__``, what ``hook_config(can_jump_to=["end"])`` sets).

:class:`GuardMiddleware`:

- ``before_model``: pre-checks what goes into the model call: the images of every message, the last
  message's text (a tool result as ``Tool: ...``), every earlier message quoted as a turn (tool calls
  as ``[tool call name(arguments)]``). Blocked: the run ends with an ``AIMessage`` holding the refusal.
- ``after_model``: post-checks the model's answer (the last assistant message: with
  ``response_format=ToolStrategy(...)`` the model node adds a ToolMessage after it): text, reasoning /
  thinking blocks, refusals, tool calls and invalid tool calls (names and arguments), legacy
  ``function_call``. Blocked: the answer is replaced (same message id) by the refusal without tool
  calls, so no tool runs, the messages after it are removed, ``structured_response`` is cleared, and
  the run ends.

``create_agent`` runs ``before_model`` hooks in list order and ``after_model`` hooks in reverse: list
the guard last so that it checks the messages other middleware prepared and checks an answer before
other ``after_model`` hooks (a human-approval interrupt) see it. Stream events (``stream_mode``
``messages`` / ``updates`` / ``values``) carry the model node's answer before ``after_model`` runs;
the final state is the guarded one. ``create_agent(system_prompt=...)`` is not in the state and is not
checked.

Policy actions as everywhere (:meth:`~visguard.core.policy.Policy.action`): ``pass`` / ``degraded``
/ ``flag`` go on; ``block`` refuses (``on_unsafe="refuse"``) or raises
:class:`~visguard.core.errors.GuardrailViolation` (``on_unsafe="raise"``); ``raise`` raises
:class:`~visguard.core.errors.GuardUnavailableError`. The refusal's ``response_metadata["visguard"]``
holds labels, scores and categories only; full verdicts go to the audit log.

The class subclasses ``AgentMiddleware`` when the ``langchain`` (v1) package is installed (tested with
langchain 1.5.2's ``create_agent``); without it, it is a plain class with the same hook signatures
(it needs langchain-core only).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from visguard.core.errors import GuardrailViolation, GuardUnavailableError, InputError
from visguard.core.types import GuardRequest, Verdict
from visguard.engine.checker import Checker, report_answer
from visguard.hosting.audit import AuditLog
from visguard.hosting.guarded import DEFAULT_REFUSAL, DEFAULT_UNAVAILABLE_MESSAGE, UNNAMED_CATEGORY

try:  # LangChain v1 agents
    from langchain.agents.middleware import AgentMiddleware as _Base
except ImportError:  # langchain-core only: the same hooks on a plain class
    _Base = object  # type: ignore[misc,assignment]

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system",
          "developer": "developer", "tool": "tool", "function": "tool"}
_TEXT_BLOCKS = ("text", "reasoning", "thinking", "refusal", "output_text", "summary_text", "reasoning_text")
#: what a client-facing verdict keeps (the rest goes to the audit log)
_PUBLIC = ("label", "score", "category", "sub_category", "stage")


def _can_end(hook: Callable[..., Any]) -> Callable[..., Any]:
    hook.__can_jump_to__ = ["end"]  # type: ignore[attr-defined]  # what hook_config(can_jump_to=["end"]) sets
    return hook


def _call_text(name: Any, args: Any) -> str:
    return f"[tool call {name}({args if isinstance(args, str) else json.dumps(args, ensure_ascii=False, default=str)})]"


def _image_source(block: Mapping[str, Any]) -> Any:
    """The image a content block carries (a data URL or URL), ``None`` when it is not an image."""
    kind = block.get("type")
    if kind == "image_url":
        image = block.get("image_url")
        return image.get("url") if isinstance(image, Mapping) else image
    if kind == "input_image":
        return block.get("image_url")
    if kind == "image":
        data = block.get("base64") or (block.get("data") if block.get("source_type") == "base64" else None)
        if data:
            return f"data:{block.get('mime_type') or 'image/png'};base64,{data}"
        return block.get("url")
    return None


def message_text(message: Any, images: list[Any] | None = None) -> str:
    """Everything a LangChain message says (its images go to ``images``)."""
    content = getattr(message, "content", "")
    pieces: list[str] = []
    blocks = [content] if isinstance(content, str) else list(content or [])
    for block in blocks:
        if isinstance(block, str):
            pieces.append(block)
            continue
        if not isinstance(block, Mapping):
            raise InputError(f"a message content block of type {type(block).__name__}")
        source = _image_source(block)
        if source is not None:
            if images is not None:
                images.append(source)
            continue
        kind = block.get("type")
        if kind in _TEXT_BLOCKS or kind is None:
            for key in ("text", "reasoning", "thinking", "refusal"):
                if isinstance(block.get(key), str):
                    pieces.append(block[key])
            for part in block.get("summary") or []:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
        elif kind in ("tool_use", "tool_call", "function_call", "server_tool_call"):
            pieces.append(_call_text(block.get("name"), block.get("input", block.get("args", block.get("arguments")))))
        elif kind in ("file", "audio", "input_audio", "video"):
            raise InputError(f"{kind} content cannot be checked by this guard")
        else:  # annotations, non_standard ...: shown as they are rather than dropped
            pieces.append(json.dumps(block, ensure_ascii=False, default=str))
    for call in [*(getattr(message, "tool_calls", None) or []), *(getattr(message, "invalid_tool_calls", None) or [])]:
        pieces.append(_call_text(call.get("name"), call.get("args")))
    extra = getattr(message, "additional_kwargs", None) or {}
    legacy = extra.get("function_call")
    if isinstance(legacy, Mapping):
        pieces.append(_call_text(legacy.get("name"), legacy.get("arguments")))
    for key in ("refusal", "reasoning_content"):
        if isinstance(extra.get(key), str):
            pieces.append(extra[key])
    return "\n".join(p for p in pieces if p)


def _role(message: Any) -> str:
    role = _ROLES.get(str(getattr(message, "type", "")).replace("Chunk", "").lower())
    if role is None:
        raise InputError(f"a message of type {getattr(message, 'type', type(message).__name__)!r}")
    return role


def _public(verdict: Verdict) -> dict[str, Any]:
    data = verdict.model_dump(mode="json")
    return {k: data.get(k) for k in _PUBLIC}


class GuardMiddleware(_Base):
    """Guard each model call of a LangChain v1 agent (see the module doc).

    Args:
        guard: any :class:`~visguard.engine.checker.Checker` (a Guard, a Cascade).
        check_input: pre-check what goes into each model call.
        check_output: post-check each answer (its tool calls included) before any tool runs.
        on_unsafe: ``refuse`` (end the run with the refusal) or ``raise``
            (:class:`~visguard.core.errors.GuardrailViolation`).
        refusal: a template with ``{category}``, ``{sub_category}``, ``{label}``, ``{stage}``,
            ``{score}``, or a function ``verdict -> str``.
        audit: an :class:`~visguard.hosting.audit.AuditLog` for every decision.
        name: the middleware's name; ``create_agent`` needs distinct names for two guards in one agent.
    """

    def __init__(self, guard: Checker, *, check_input: bool = True, check_output: bool = True,
                 on_unsafe: Literal["refuse", "raise"] = "refuse",
                 refusal: str | Callable[[Verdict], str] = DEFAULT_REFUSAL, audit: AuditLog | None = None,
                 name: str = "visguard") -> None:
        if on_unsafe not in ("refuse", "raise"):
            raise InputError(f"on_unsafe must be 'refuse' or 'raise', got {on_unsafe!r}")
        if not isinstance(name, str) or not name:
            raise InputError(f"name must be a non-empty string, got {name!r}")
        if _Base is not object:
            super().__init__()
        self.guard = guard
        self.check_input = check_input
        self.check_output = check_output
        self.on_unsafe = on_unsafe
        self.refusal = refusal
        self.audit = audit
        self._name = name
        self.tools: list[Any] = []

    @property
    def name(self) -> str:
        """The middleware's name in the agent graph (nodes ``<name>.before_model`` / ``<name>.after_model``)."""
        return self._name

    # ---- building requests
    def request(self, messages: Sequence[Any]) -> GuardRequest:
        """The guard request for a model call's messages (last message = the request)."""
        if not messages:
            raise InputError("no messages to check")
        images: list[Any] = []
        turns = []
        for i, message in enumerate(messages):
            before = len(images)
            text = message_text(message, images)
            if i < len(messages) - 1:  # an earlier turn names its images, as the chat proxy does
                text = "\n".join([text, *(f"[image {n + 1}]" for n in range(before, len(images)))]).strip()
            turns.append({"role": _role(message), "content": text})
        final = turns.pop()
        text = final["content"] if final["role"] == "user" else f"{final['role'].title()}: {final['content']}"
        return self.guard.request(images, text, conversation=turns)

    # ---- decisions
    def _act(self, verdict: Verdict, request: GuardRequest, request_id: str) -> bool:
        action = self.guard.policy.action(verdict)
        if self.audit is not None:
            self.audit.record_verdict(verdict, request_id=request_id, images=request.images,
                                      action="raise" if action == "block" and self.on_unsafe == "raise" else action)
        if action in ("pass", "degraded", "flag"):
            return True
        if action == "raise":
            raise GuardUnavailableError(verdict)
        if self.on_unsafe == "raise":
            raise GuardrailViolation(verdict)
        return False

    def _refusal(self, verdict: Verdict, request_id: str, *, replaces: str | None = None) -> Any:
        from langchain_core.messages import AIMessage

        if verdict.label == "unavailable":
            text = DEFAULT_UNAVAILABLE_MESSAGE.format(category=UNNAMED_CATEGORY)
        elif callable(self.refusal):
            text = str(self.refusal(verdict))
        else:
            text = self.refusal.format_map({
                "category": verdict.category or UNNAMED_CATEGORY, "sub_category": verdict.sub_category or "",
                "label": verdict.label, "stage": verdict.stage,
                "score": verdict.score if verdict.score is not None else float("nan")})
        meta = {"visguard": {"blocked": True, "stage": verdict.stage, "request_id": request_id,
                             "reason": "unavailable" if verdict.label == "unavailable" else "unsafe",
                             f"{verdict.stage}_verdict": _public(verdict)},
                "finish_reason": "content_filter"}
        return AIMessage(content=text, id=replaces or f"visguard-{request_id}", tool_calls=[], response_metadata=meta)

    # ---- hooks
    @_can_end
    def before_model(self, state: Mapping[str, Any], runtime: Any = None) -> dict[str, Any] | None:
        """Pre-check the messages of the coming model call; blocked: end the run with the refusal."""
        if not self.check_input:
            return None
        request = self.request(state["messages"])
        request_id = uuid.uuid4().hex
        (verdict,) = self.guard.report_batch([request])
        if self._act(verdict, request, request_id):
            return None
        return {"messages": [self._refusal(verdict, request_id)], "jump_to": "end"}

    @_can_end
    def after_model(self, state: Mapping[str, Any], runtime: Any = None) -> dict[str, Any] | None:
        """Post-check the model's answer (tool calls included); blocked: replace it, no tool runs.

        The answer is the last assistant message: with ``response_format=ToolStrategy(...)`` the model
        node adds a ToolMessage after it. Blocked: the answer is replaced (same id), the tool messages
        after it are removed and ``structured_response`` is cleared.
        """
        messages = list(state["messages"])
        if not self.check_output:
            return None
        at = next((i for i in range(len(messages) - 1, -1, -1) if _role(messages[i]) == "assistant"), None)
        if at is None:
            return None
        answer = messages[at]
        request = self.request(messages[:at])
        request_id = uuid.uuid4().hex
        verdict = report_answer(self.guard, request, message_text(answer))
        if self._act(verdict, request, request_id):
            return None
        from langchain_core.messages import RemoveMessage

        update: dict[str, Any] = {
            "messages": [self._refusal(verdict, request_id, replaces=getattr(answer, "id", None)),
                         *(RemoveMessage(id=m.id) for m in messages[at + 1:] if getattr(m, "id", None))],
            "jump_to": "end"}
        if state.get("structured_response") is not None:
            update["structured_response"] = None
        return update

    @_can_end
    async def abefore_model(self, state: Mapping[str, Any], runtime: Any = None) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.before_model, state, runtime)

    @_can_end
    async def aafter_model(self, state: Mapping[str, Any], runtime: Any = None) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.after_model, state, runtime)
