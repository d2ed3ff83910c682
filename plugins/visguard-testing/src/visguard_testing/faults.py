"""A guard backend that fails on demand, for fault-injection tests (registered as backend ``faulty``).

Healthy, it answers like a guard without a model: P(unsafe) 0.9 for prompts whose text holds the
marker ``[[unsafe]]`` and 0.1 otherwise (and the matching ``Verdict:`` line when generating). A fault
is chosen per backend (``backend.fault = "hang"``, or ``Guard.from_pretrained("x",
backend="faulty", fault="raise")``) or per request: the marker ``[[fault:NAME]]`` anywhere in the
request text makes that batch fail that way, so faults can be injected through the CLI and over HTTP.

Faults (:data:`FAULTS`):

- ``raise``: the model call raises ``RuntimeError`` (a CUDA-style error);
- ``hang``: the call blocks until :attr:`FaultyBackend.release` is set (an ``Event``; it never
  sleeps); :attr:`FaultyBackend.hanging` is set while a call hangs, so tests wait for it instead of
  sleeping;
- ``memory``: ``MemoryError``;
- ``garbage``: scores that are no probabilities (``"yes"``, ``17.0``) and generated text with no verdict;
- ``nan``: NaN scores; ``none``: ``None`` scores;
- ``short``: fewer results than prompts;
- ``load``: the factory raises :class:`~visguard.core.errors.BackendError` (a failed model load).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from visguard.core.errors import BackendError
from visguard.engine.backend import Backend, Generation
from visguard.engine.format import GuardPrompt

FAULTS = ("ok", "raise", "hang", "memory", "garbage", "nan", "none", "short", "load")
#: request text holding this is judged unsafe by a healthy backend
UNSAFE_MARKER = "[[unsafe]]"
_MARKER = re.compile(r"\[\[fault:(?P<name>[a-z]+)\]\]")


class FaultyBackend(Backend):
    """A scripted guard backend: healthy by default, failing as :data:`FAULTS` describe.

    Args:
        model: model id reported in verdicts.
        fault: the fault every call shows (``ok``: none); a request marker overrides it.
        hang_limit_s: a hang ends by itself after this long (a safety net for broken tests only).

    Attributes:
        release: set it to end every hang (current and later ones).
        hanging: set while a call is hanging.
        calls: model calls so far; faults: faults shown so far (by name).
    """

    name = "faulty"

    def __init__(self, model: str = "faulty-guard", *, fault: str = "ok", hang_limit_s: float = 300.0) -> None:
        if fault not in FAULTS:
            raise BackendError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
        if fault == "load":
            raise BackendError(f"cannot load guard model {model!r}: injected load failure")
        self.model_id = model
        self.fault = fault
        self.hang_limit_s = hang_limit_s
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.calls = 0
        self.faults: dict[str, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ Backend API
    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        fault = self._begin(prompts)
        if fault == "garbage":
            return (["yes", 17.0] * len(prompts))[: len(prompts)]  # type: ignore[return-value]
        if fault == "nan":
            return [float("nan")] * len(prompts)
        if fault == "none":
            return [None] * len(prompts)  # type: ignore[return-value]
        if fault == "short":
            return [0.1] * (len(prompts) - 1)
        return [0.9 if self._unsafe(p) else 0.1 for p in prompts]

    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        fault = self._begin(prompts)
        if fault in ("garbage", "nan", "none"):
            return [Generation(text="\x00\ufffd I cannot say. Verdict pending ...")] * len(prompts)
        if fault == "short":
            return [Generation(text="Verdict: safe\nCategory: none")] * (len(prompts) - 1)
        out = []
        for p in prompts:
            text = "Verdict: unsafe\nCategory: Violent" if self._unsafe(p) else "Verdict: safe\nCategory: none"
            out.append(Generation(text=text[: max(1, max_new_tokens) * 8]))
        return out

    # ------------------------------------------------------------------ internals
    def _begin(self, prompts: Sequence[GuardPrompt]) -> str:
        markers = {m.group("name") for p in prompts for m in _MARKER.finditer(_text(p))}
        fault = next((f for f in FAULTS if f in markers), self.fault)
        with self._lock:
            self.calls += 1
            if fault != "ok":
                self.faults[fault] = self.faults.get(fault, 0) + 1
        if fault == "raise":
            raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        if fault == "memory":
            raise MemoryError("injected: out of memory")
        if fault == "hang":
            self.hanging.set()
            self.release.wait(self.hang_limit_s)
        return fault

    def _unsafe(self, prompt: GuardPrompt) -> bool:
        return UNSAFE_MARKER in _text(prompt)


def _text(prompt: GuardPrompt) -> str:
    parts: list[str] = []
    for message in prompt.messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "\n".join(parts)


def faulty_backend(model: str = "faulty-guard", **kwargs: Any) -> FaultyBackend:
    """Factory of the ``faulty`` backend (``Guard.from_pretrained(model, backend="faulty", fault=...)``)."""
    return FaultyBackend(model, **kwargs)
