"""Backends: run guard prompts on a model and return probabilities and text.

A backend knows how to render a :class:`~visguard.engine.format.GuardPrompt` for its model (chat template,
image placeholders) and how to run it. It never interprets the output: parsing belongs to formats.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from visguard.engine.format import GuardPrompt


@dataclass(frozen=True)
class Generation:
    """One generated continuation.

    Attributes:
        text: the generated text (special tokens removed).
        token_spans: ``(start, end)`` character span of each generated token in ``text``.
        step_scores: for each generated token, P(unsafe) among the prompt's verdict words at that
            step (``None`` where the backend has no probabilities).
    """

    text: str
    token_spans: tuple[tuple[int, int], ...] = ()
    step_scores: tuple[float | None, ...] = ()

    def score_at(self, offset: int | None) -> float | None:
        """P(unsafe) at the token that covers character ``offset`` of ``text`` (``None`` if unknown)."""
        if offset is None or not self.token_spans or not self.step_scores:
            return None
        ends = [end for _, end in self.token_spans]
        i = bisect.bisect_right(ends, offset)
        if i >= len(self.token_spans):
            return None
        # A token may start with spaces before the word ("Verdict:" + " unsafe"): the covering token is the one.
        return self.step_scores[i] if i < len(self.step_scores) else None


@dataclass(frozen=True)
class BackendDiagnostics:
    """What a backend says about its key/value caches and, when asked, one prompt (:meth:`Backend.diagnostics`).

    For benchmarks and monitoring; nothing in a check depends on it. Counters are totals since the
    backend was built; a backend that caches nothing reports zeros.

    Attributes:
        caching: whether the backend reuses key/value caches between prompts (static prefix, pre ->
            post, generation -> follow-up).
        cache_limit_bytes: bound of the per-prompt cache store (0: no store).
        cache_bytes: bytes the per-prompt store holds now.
        reused_tokens: prompt tokens that scoring forwards took from caches (generations count apart).
        computed_tokens: prompt tokens that scoring forwards computed.
        static_hits: scoring forwards that continued from a cached static prefix.
        prompt_hits: scored prompts that continued from an earlier prompt's (or generation's) cache.
        generations_kept: generated rows whose final cache was kept for their follow-ups.
        generation_reused_tokens: prompt tokens that generations' prefills took from caches (a static
            prefix, a pre-check's or an earlier generation's prompt with the same images).
        generation_computed_tokens: prompt tokens that generations' prefills computed.
        prompt_tokens: the given prompt's length in model tokens, images included (``None``: no
            prompt given, or the backend cannot count).
        static_prefix_tokens: of those, the static prefix this backend computes once and shares
            (0: none, or caching off; ``None`` when ``prompt_tokens`` is).
    """

    caching: bool = False
    cache_limit_bytes: int = 0
    cache_bytes: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    static_hits: int = 0
    prompt_hits: int = 0
    generations_kept: int = 0
    generation_reused_tokens: int = 0
    generation_computed_tokens: int = 0
    prompt_tokens: int | None = None
    static_prefix_tokens: int | None = None

    @property
    def request_tokens(self) -> int | None:
        """The prompt's tokens after its static prefix: what a check with a warm cache computes."""
        if self.prompt_tokens is None:
            return None
        return self.prompt_tokens - (self.static_prefix_tokens or 0)


class Backend(ABC):
    """Base class of guard backends (register subclasses through ``register_backends``).

    Subclasses must be safe to call from several threads at once (serialise internally if the
    model is not).
    """

    #: registry name
    name: str = ""
    #: the model id or path being served
    model_id: str = ""

    @property
    def special_tokens(self) -> frozenset[str]:
        """Strings the model's tokenizer treats as control tokens (neutralised in user text)."""
        return frozenset()

    def check_verdict_words(self, prefix: str, words: Mapping[str, Sequence[str]]) -> None:  # noqa: B027 - optional hook
        """Fail early if this backend cannot read the verdict ``words`` after ``prefix``.

        Called once when a :class:`~visguard.engine.guard.Guard` is built. The default accepts everything;
        backends that score token ids check them here (and may warn about spellings they drop).

        Raises:
            BackendError: no usable safe/unsafe pair of spellings.
        """

    @property
    def supports_scores(self) -> bool:
        """Whether :meth:`score` is available (fast mode)."""
        return True

    @abstractmethod
    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        """P(unsafe) of the next token after each prompt's ``assistant_prefix``.

        Computed as the softmax over the first tokens of the prompt's ``verdict_words``: the sum of
        the probabilities of the ``unsafe`` spellings divided by the sum over all spellings.

        Raises:
            PromptTooLongError: prompts longer than the model can take (their indices and why),
                found while encoding the batch, before the model runs. A backend whose model has
                no such limit never raises it.
        """

    @abstractmethod
    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        """Greedy continuation of each prompt, with per-token verdict probabilities where available.

        Raises:
            PromptTooLongError: as :meth:`score`.
        """

    def diagnostics(self, prompt: GuardPrompt | None = None) -> BackendDiagnostics:
        """Cache statistics and, with ``prompt``, how many tokens it is and how many are a shared prefix.

        Never runs the model and changes nothing; for latency benchmarks and monitoring.
        The default reports a backend without caches that cannot count tokens.
        """
        return BackendDiagnostics()

    def prompts_sharing_prefixes(self) -> AbstractContextManager[None]:
        """A context in which this thread's :meth:`score` calls hold prompts that begin like one
        another (an explained check's subsets: ``[instructions, image 1]`` begins like
        ``[instructions, image 1, image 2, text]``).

        A backend that can continue one prompt from another's cached prefix orders each such call
        for it (the transformers backend: the prompts no other begins like first, then the rest
        from their caches); scores are the same either way. The default changes nothing: the call
        runs as any other.
        """
        return nullcontext()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, GPU memory)."""
