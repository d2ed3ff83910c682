"""What a guard reads of a LangChain message: everything it says, not just its text content.

Shared by the ``langchain`` host (:mod:`visguard.integrations.langchain.host`) and the runnables
(:mod:`visguard.integrations.langchain.runnables`); it needs no langchain-core import.

Block and field shapes read (langchain-core 1.x ``langchain_core/messages/content.py`` and its
``block_translators``; Anthropic's and OpenAI's own message formats): text blocks and their
``annotations``; ``reasoning`` (``reasoning``, or an OpenAI ``summary`` list), Anthropic
``thinking`` and ``redacted_thinking``; ``refusal``; ``tool_call`` / ``tool_call_chunk`` /
``invalid_tool_call`` / ``server_tool_call`` and Anthropic ``tool_use`` / ``server_tool_use``
blocks; ``non_standard`` blocks and any other non-media block; the message's ``tool_calls``,
``invalid_tool_calls`` and ``tool_call_chunks``; and ``additional_kwargs``' legacy
``function_call``, ``refusal``, ``reasoning_content`` and ``reasoning``.
"""

from __future__ import annotations

import json
from typing import Any

#: content blocks that carry media, not text (images are checked as images on input; on output
#: a guard judges text: media blocks are not part of the answer text)
MEDIA_BLOCKS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video", "file", "document"})
_NO_TEXT_KEYS = frozenset({"type", "id", "index", "extras", "signature"})


def answer_text(message: Any) -> str:
    """The text a guard checks of an AI message or chunk: all it says, in order.

    Text content first (with any annotations), then every other block (reasoning, thinking,
    refusals, tool use, non-standard blocks ...), then tool calls (``[tool call NAME] ARGS``, ARGS as
    JSON), invalid tool calls (``[invalid tool call NAME] ARGS``), a legacy ``function_call`` and
    provider fields (``refusal``, ``reasoning_content``, ``reasoning``). A whole message labels each
    non-text part (``[reasoning] ...``); a streamed chunk gives its pieces as they arrive (the text
    of a stream's chunks, joined, is what was checked), so a chunk that carries only reasoning has
    text and is held until it passed a check.
    """
    chunk = type(message).__name__.endswith("Chunk")
    parts = [_content_text(getattr(message, "content", ""), chunk)]
    tool_chunks = getattr(message, "tool_call_chunks", None)
    if tool_chunks:  # streamed: names arrive once, arguments in fragments
        for call in tool_chunks:
            if call.get("name"):
                parts.append(f"\n[tool call {call['name']}] ")
            parts.append(call.get("args") or "")
    else:
        for call in getattr(message, "tool_calls", None) or []:
            parts.append(f"\n[tool call {call.get('name')}] " + _json(call.get("args")))
        for call in getattr(message, "invalid_tool_calls", None) or []:
            args = call.get("args")
            parts.append(f"\n[invalid tool call {call.get('name')}] " + (args if isinstance(args, str) else _json(args)))
    parts.append(_extra_text(getattr(message, "additional_kwargs", None) or {}, chunk))
    return "".join(parts)


def _content_text(content: Any, chunk: bool) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    others: list[str] = []
    for part in content or []:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind == "text":
                texts.append(str(part.get("text", "")))
                if part.get("annotations"):
                    others.append(_labelled("annotations", _json(part["annotations"]), chunk))
            elif kind not in MEDIA_BLOCKS:
                others.append(_labelled(str(kind), _block_text(part), chunk))
    return "".join(texts) + "".join(others)


def _block_text(block: dict[str, Any]) -> str:
    """What a non-text block says: its text field, else its name and arguments, else the block as JSON."""
    kind = block.get("type")
    for key in ("reasoning", "thinking", "refusal", "text", "data"):
        value = block.get(key)
        if isinstance(value, str):
            return value
    if kind == "reasoning" and isinstance(block.get("summary"), list):  # OpenAI Responses reasoning summaries
        return "".join(str(s.get("text", "")) if isinstance(s, dict) else str(s) for s in block["summary"])
    if "name" in block or "input" in block or "args" in block:  # tool_use, tool_call, server_tool_call ...
        args = block.get("input", block.get("args"))
        shown = args if isinstance(args, str) else _json(args)
        return f"{block.get('name') or ''} {shown}".strip()
    if kind == "non_standard" and "value" in block:
        return _json(block["value"])
    return _json({k: v for k, v in block.items() if k not in _NO_TEXT_KEYS})


def _extra_text(extra: dict[str, Any], chunk: bool) -> str:
    out: list[str] = []
    call = extra.get("function_call")
    if isinstance(call, dict):  # legacy OpenAI function calling
        name = call.get("name")
        args = call.get("arguments")
        if chunk:
            out.append((f"\n[function call {name}] " if name else "") + (args if isinstance(args, str) else ""))
        else:
            out.append(f"\n[function call {name}] " + (args if isinstance(args, str) else _json(args)))
    for key, label in (("refusal", "refusal"), ("reasoning_content", "reasoning")):
        value = extra.get(key)
        if isinstance(value, str) and value:
            out.append(_labelled(label, value, chunk))
    reasoning = extra.get("reasoning")
    if isinstance(reasoning, dict | list | str) and reasoning:
        text = reasoning if isinstance(reasoning, str) else _block_text(
            reasoning if isinstance(reasoning, dict) else {"type": "reasoning", "summary": reasoning})
        out.append(_labelled("reasoning", text, chunk))
    return "".join(out)


def _labelled(label: str, text: str, chunk: bool) -> str:
    if not text:
        return ""
    return text if chunk else f"\n[{label}] {text}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
