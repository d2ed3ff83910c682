"""What a guard reads of a LangChain message: its text content and its tool calls.

Shared by the ``langchain`` host (:mod:`visguard.integrations.langchain.host`) and the runnables
(:mod:`visguard.integrations.langchain.runnables`); it needs no langchain-core import.
"""

from __future__ import annotations

import json
from typing import Any


def answer_text(message: Any) -> str:
    """The text a guard checks of an AI message or chunk: text content, then its tool calls.

    Text parts of list content are joined; reasoning and other non-text blocks are left out.
    A whole message gives one ``[tool call NAME] ARGS`` line per tool call (ARGS as JSON); a
    streamed chunk gives the pieces of the same line as they arrive.
    """
    parts = [_content_text(getattr(message, "content", ""))]
    chunks = getattr(message, "tool_call_chunks", None)
    if chunks:  # streamed: names arrive once, arguments in fragments
        for call in chunks:
            if call.get("name"):
                parts.append(f"\n[tool call {call['name']}] ")
            parts.append(call.get("args") or "")
    else:
        for call in getattr(message, "tool_calls", None) or []:
            parts.append(f"\n[tool call {call.get('name')}] " + json.dumps(call.get("args"), ensure_ascii=False, default=str))
    return "".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content or []:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
    return "".join(texts)
