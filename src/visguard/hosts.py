"""Hosts: the models a guard protects.

A host answers (images, text) with text, all at once or as a stream of text pieces. visguard ships
host adapters as plugins (``register_hosts``): ``transformers`` (a VLM in this process), ``openai``
(an OpenAI-compatible chat endpoint) and ``callable`` (any Python function). :func:`resolve_host`
picks one from what the user passes to ``guard.wrap(...)``.
"""

from __future__ import annotations

import asyncio
import inspect
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from visguard import plugins
from visguard.errors import InputError
from visguard.images import GuardImage


class Host(ABC):
    """Base class of host adapters.

    Hosts receive images that already passed the image boundary. Implementations must be safe to
    call from several threads.
    """

    #: registry name
    name: str = ""
    #: the host model's id, path or URL
    model_id: str = ""

    @abstractmethod
    def generate(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> str:
        """The host's full answer."""

    def stream(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> Iterator[str]:
        """The answer as text pieces (default: one piece, from :meth:`generate`)."""
        yield self.generate(images, text, **gen_kwargs)

    async def agenerate(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> str:
        """Async :meth:`generate` (default: in a worker thread)."""
        return await asyncio.to_thread(self.generate, images, text, **gen_kwargs)

    async def astream(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream` (default: drives the sync iterator in a worker thread)."""
        iterator = self.stream(images, text, **gen_kwargs)
        sentinel = object()
        while True:
            piece = await asyncio.to_thread(next, iterator, sentinel)
            if piece is sentinel:
                return
            yield piece  # type: ignore[misc]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class CallableHost(Host):
    """Wrap a function ``fn(images: list[PIL.Image], text) -> str`` (or an iterator of str to stream)."""

    name = "callable"

    def __init__(self, fn: Callable[[list[Image.Image], str], Any], *, model_id: str | None = None) -> None:
        if not callable(fn):
            raise InputError(f"host must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.model_id = model_id or getattr(fn, "__qualname__", None) or repr(fn)

    def _call(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> Any:
        return self.fn([g.image for g in images], text, **gen_kwargs)

    def generate(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> str:
        out = self._call(images, text, **gen_kwargs)
        if isinstance(out, str):
            return out
        if inspect.isgenerator(out) or isinstance(out, Iterator):
            return "".join(_checked_piece(p) for p in out)
        raise InputError(f"host function returned {type(out).__name__}, expected str or an iterator of str")

    def stream(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> Iterator[str]:
        out = self._call(images, text, **gen_kwargs)
        if isinstance(out, str):
            yield out
            return
        for piece in out:
            yield _checked_piece(piece)


def _checked_piece(piece: Any) -> str:
    if not isinstance(piece, str):
        raise InputError(f"host stream yielded {type(piece).__name__}, expected str")
    return piece


def resolve_host(target: Any, **kwargs: Any) -> Host:
    """Turn what a user passes to ``guard.wrap`` into a :class:`Host`.

    - a :class:`Host`: used as is;
    - ``"http://..."`` / ``"https://..."``: the ``openai`` host (an OpenAI-compatible endpoint; pass
      ``model=`` for the served model name);
    - any other string or path: the ``transformers`` host (hub id or local checkpoint);
    - a callable: :class:`CallableHost`;
    - ``(name, target)``: the host registered as ``name``.

    Raises:
        PluginError: the needed host plugin is not installed.
        InputError: nothing fits.
    """
    if isinstance(target, Host):
        return target
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str):
        return plugins.get("hosts", target[0])(target[1], **kwargs)
    if isinstance(target, str) and target.startswith(("http://", "https://")):
        return plugins.get("hosts", "openai")(target, **kwargs)
    if isinstance(target, str):
        return plugins.get("hosts", "transformers")(target, **kwargs)
    if callable(target):
        return CallableHost(target, **kwargs)
    raise InputError(f"cannot use {type(target).__name__} as a host; pass a Host, a model path, a URL or a callable")
