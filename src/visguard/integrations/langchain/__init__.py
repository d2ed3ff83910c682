"""LangChain: guarded chat models and guard checks as runnables, and LangChain chat models as hosts.

- :mod:`~visguard.integrations.langchain.runnables`: :class:`GuardCheck`, :class:`GuardedChatModel`,
  :func:`split_chat`, :func:`request_from_langchain` (need langchain-core: ``pip install 'visguard[langchain]'``).
- :mod:`~visguard.integrations.langchain.host`: :class:`LangChainHost`, registered as the ``langchain`` host
  by the built-in plugins; langchain-core is imported only once a chat model is used.
- :mod:`~visguard.integrations.langchain.messages`: what a guard reads of a message (text and tool calls).

The runnables' names are imported lazily, so importing the host does not need langchain-core.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GuardCheck", "GuardedChatModel", "request_from_langchain", "split_chat"]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module("visguard.integrations.langchain.runnables"), name)
