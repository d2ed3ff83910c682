"""The ``langchain`` host: any LangChain chat model (a ``BaseChatModel``) answers for ``guard.wrap``.

``guard.wrap(chat_model)`` picks this host for a chat model (see :meth:`LangChainHost.accepts`), so
the whole :class:`~visguard.hosting.guarded.GuardedModel` machinery (sequential or parallel pre-check with
cancellation, streaming post-check, audit) serves LangChain models. langchain-core is imported only
once a chat model is used: visguard itself does not need it.

The host answers ``(images, text)`` with a one-message conversation (the images as LangChain
base64 image blocks, then the text). :class:`visguard.integrations.langchain.GuardedChatModel` instead passes
the original conversation untouched (``messages=``) and collects the model's own messages
(``record=``), so tool calls, metadata and every content part reach the caller unchanged.

The text the guard checks of an answer is its text content plus one line per tool call
(``[tool call NAME] ARGS``): tool arguments are part of the answer and are checked too.
"""

from __future__ import annotations

import base64
import io
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from visguard.core.errors import InputError
from visguard.core.images import GuardImage
from visguard.hosting.hosts import Host
from visguard.integrations.langchain.messages import answer_text

#: the config a wrapped model runs with: no callbacks inherited from the caller's chain, so no
#: streaming handler ever sees text before the guard passed it
ISOLATED_CONFIG: dict[str, Any] = {"callbacks": []}


def _chat_model_class() -> type | None:
    module = sys.modules.get("langchain_core.language_models")
    return getattr(module, "BaseChatModel", None) if module is not None else None


class LangChainHost(Host):
    """A LangChain chat model as a host.

    Args:
        model: a ``langchain_core`` ``BaseChatModel`` (``ChatOpenAI``, ``ChatAnthropic`` ...).
        image_format: how :meth:`messages` encodes images for the model (``PNG`` keeps pixels exact).

    Keyword arguments of :meth:`generate` / :meth:`stream` (and their async twins):

    - ``messages``: the conversation to send as is (default: one human message built from
      ``images`` and ``text``);
    - ``record``: a list the model's own ``AIMessage`` (or, when streaming, each
      ``AIMessageChunk``) is appended to, before its text is handed on;
    - ``config``: the ``RunnableConfig`` of the model call (default :data:`ISOLATED_CONFIG`);
    - anything else (``stop``, ``tools`` ...) goes to the model's ``invoke`` / ``stream``.

    Raises:
        InputError: ``model`` is not a LangChain chat model.
    """

    name = "langchain"

    def __init__(self, model: Any, *, image_format: str = "PNG") -> None:
        if not self.accepts(model):
            raise InputError(f"the langchain host needs a langchain_core BaseChatModel, got {type(model).__name__}")
        self.model = model
        self.model_id = _model_id(model)
        self.image_format = image_format

    @staticmethod
    def accepts(target: Any) -> bool:
        """Whether ``target`` is a LangChain chat model (without importing langchain-core)."""
        cls = _chat_model_class()
        return cls is not None and isinstance(target, cls)

    def __repr__(self) -> str:
        return f"LangChainHost({type(self.model).__name__}, model_id={self.model_id!r})"

    def messages(self, images: Sequence[GuardImage], text: str) -> list[Any]:
        """The one-message conversation sent for ``(images, text)``."""
        from langchain_core.messages import HumanMessage

        blocks: list[str | dict[str, Any]] = []
        mime = "image/jpeg" if self.image_format.upper() == "JPEG" else f"image/{self.image_format.lower()}"
        for image in images:
            buf = io.BytesIO()
            image.image.save(buf, format=self.image_format)
            blocks.append({"type": "image", "base64": base64.b64encode(buf.getvalue()).decode("ascii"), "mime_type": mime})
        blocks.append({"type": "text", "text": text})
        return [HumanMessage(content=blocks)]

    # ------------------------------------------------------------------ sync
    def generate(self, images: Sequence[GuardImage], text: str, *, messages: Sequence[Any] | None = None,
                 record: list[Any] | None = None, config: dict[str, Any] | None = None, **kwargs: Any) -> str:
        message = self.model.invoke(self._input(images, text, messages), config=_config(config), **kwargs)
        if record is not None:
            record.append(message)
        return answer_text(message)

    def stream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
               messages: Sequence[Any] | None = None, record: list[Any] | None = None,
               config: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the text of each chunk; setting ``cancel`` (or closing) stops the model's stream."""
        chunks = self.model.stream(self._input(images, text, messages), config=_config(config), **kwargs)
        try:
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    return
                if record is not None:
                    record.append(chunk)
                yield answer_text(chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # ends the model's request (an HTTP model hangs up)

    # ------------------------------------------------------------------ async (the model's own async API)
    async def agenerate(self, images: Sequence[GuardImage], text: str, *, messages: Sequence[Any] | None = None,
                        record: list[Any] | None = None, config: dict[str, Any] | None = None, **kwargs: Any) -> str:
        message = await self.model.ainvoke(self._input(images, text, messages), config=_config(config), **kwargs)
        if record is not None:
            record.append(message)
        return answer_text(message)

    async def astream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
                      messages: Sequence[Any] | None = None, record: list[Any] | None = None,
                      config: dict[str, Any] | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream`."""
        chunks = self.model.astream(self._input(images, text, messages), config=_config(config), **kwargs)
        try:
            async for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    return
                if record is not None:
                    record.append(chunk)
                yield answer_text(chunk)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _input(self, images: Sequence[GuardImage], text: str, messages: Sequence[Any] | None) -> list[Any]:
        return list(messages) if messages is not None else self.messages(images, text)


def _config(config: dict[str, Any] | None) -> dict[str, Any]:
    return dict(ISOLATED_CONFIG) if config is None else config


def _model_id(model: Any) -> str:
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__
