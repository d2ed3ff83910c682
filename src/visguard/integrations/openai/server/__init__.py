"""Serving: OpenAI-compatible HTTP endpoints around visguard.

- :mod:`visguard.integrations.openai.wire`: the OpenAI chat-completions wire format, for servers (chat
  messages -> (images, text), SSE framing) and clients (the ``openai`` host and backend read answers
  with it); pydantic only, importable without FastAPI.
- :mod:`visguard.integrations.openai.server.common`: what the apps share (OpenAI error bodies, bearer check, request
  checks, streamed chunks).
- :mod:`visguard.integrations.openai.server.upstream`: :func:`create_upstream_app` serves a local host model as an
  OpenAI-compatible endpoint (needs the ``serve`` extra: FastAPI and uvicorn).
- :mod:`visguard.integrations.openai.server.app`: ``visguard serve`` (a guard over HTTP, and a guarded proxy).

Names are imported lazily so ``import visguard.integrations.openai.server`` does not need FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerThread", "create_upstream_app", "messages_to_prompt", "split_messages"]

_LAZY = {
    "ServerThread": "visguard.integrations.openai.server.upstream",
    "create_upstream_app": "visguard.integrations.openai.server.upstream",
    "messages_to_prompt": "visguard.integrations.openai.wire",
    "split_messages": "visguard.integrations.openai.wire",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'visguard.integrations.openai.server' has no attribute {name!r}")
