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
from dataclasses import dataclass
from os import PathLike
from typing import Any, ClassVar, cast

from PIL import Image

from visguard import plugins
from visguard.core.errors import InputError
from visguard.core.images import GuardImage


class Host(ABC):
    """Base class of host adapters.

    Hosts receive images that already passed the image boundary. Implementations must be safe to
    call from several threads.
    """

    #: registry name
    name: str = ""
    #: the host model's id, path or URL
    model_id: str = ""
    #: per-call keyword arguments the host understands from a chat request (``max_new_tokens``,
    #: ``temperature`` ...): a server forwards exactly these (:func:`visguard.integrations.openai.server.wire.generation_options`)
    generation_options: ClassVar[tuple[str, ...]] = ()

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
            yield cast(str, piece)

    def served_model(self) -> str:
        """The model's name as its server knows it (may ask the server; default :attr:`model_id`).

        Raises:
            BackendError: the server could not say.
        """
        return self.model_id

    async def aready(self) -> str | None:
        """``None`` when the host can answer now, else why not (a server host asks its server)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def supports_cancel(host: Host, *, asynchronous: bool = False) -> bool:
    """Whether ``host.stream`` (or ``host.astream``) takes a ``cancel`` :class:`threading.Event`.

    Only a parameter named ``cancel`` counts (``**kwargs`` would pass the event on to the model).
    The default :meth:`Host.astream` forwards its keyword arguments to :meth:`Host.stream`.
    """
    method: Callable[..., object] = host.stream
    if asynchronous and type(host).astream is not Host.astream:
        method = host.astream
    return _takes(method, "cancel")


@dataclass
class TokenUsage:
    """The tokens one host call used, filled in by hosts that take a ``usage`` keyword.

    Servers pass one per request (see :func:`reports_usage`) and report it as the completion's
    OpenAI ``usage``. Counts add up over the calls it is passed to.

    Attributes:
        prompt_tokens: tokens of the input the host read (image tokens included).
        completion_tokens: tokens the host generated (also those of an answer the guard replaced).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += int(prompt_tokens)
        self.completion_tokens += int(completion_tokens)


def reports_usage(host: Host) -> bool:
    """Whether every answering method of ``host`` takes ``usage`` (a :class:`TokenUsage` it fills in).

    Only a parameter named ``usage`` counts; the default async methods forward to the sync ones.
    """
    methods: list[Callable[..., object]] = [host.generate, host.stream]
    methods += [m for m, base in ((host.agenerate, Host.agenerate), (host.astream, Host.astream))
                if getattr(type(host), m.__name__) is not base]
    return all(_takes(m, "usage") for m in methods)


def _takes(method: Callable[..., Any], name: str) -> bool:
    try:
        param = inspect.signature(method).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


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


def default_host_name(target: str) -> str:
    """The host plugin a string target gets by default: ``openai`` for an http(s) URL, else ``transformers``."""
    return "openai" if target.startswith(("http://", "https://")) else "transformers"


def resolve_host(target: Any, **kwargs: Any) -> Host:
    """Turn what a user passes to ``guard.wrap`` into a :class:`Host`.

    - a :class:`Host`: used as is;
    - an object a registered host claims (its factory's ``accepts(target)`` is true; e.g. the
      ``langchain`` host claims LangChain chat models);
    - ``"http://..."`` / ``"https://..."``: the ``openai`` host (an OpenAI-compatible endpoint; pass
      ``model=`` for the served model name);
    - any other string or path: the ``transformers`` host (hub id or local checkpoint);
    - a callable: :class:`CallableHost`;
    - ``(name, target)``: the host registered as ``name``.

    Raises:
        PluginError: the needed host plugin is not installed.
        InputError: nothing fits, or the host takes no such keyword argument.
    """
    if isinstance(target, Host):
        return target
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str):
        return plugins.create("hosts", target[0], target[1], **kwargs)
    if not isinstance(target, str | PathLike):
        for name, factory in plugins.registry("hosts").items():
            accepts = getattr(factory, "accepts", None)
            if accepts is not None and accepts(target):
                return plugins.create("hosts", name, target, **kwargs)
    if isinstance(target, str):
        return plugins.create("hosts", default_host_name(target), target, **kwargs)
    if callable(target):
        return CallableHost(target, **kwargs)
    raise InputError(f"cannot use {type(target).__name__} as a host; pass a Host, a model path, a URL or a callable")
