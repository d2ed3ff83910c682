"""The Guard: ask a guard model, through a format on a backend, for a verdict on a request.

Data flow: inputs -> :func:`~visguard.images.load_images` -> :class:`GuardRequest` -> format.build ->
backend.score / backend.generate -> format.parse -> :class:`Verdict`. The guard reports; what a verdict
means for the call (pass, block, degraded, raise) is :meth:`Policy.action`, which every caller acts on.

A Guard is one :class:`~visguard.checker.Checker` (a cascade is another): this module holds what is
model-, format- and backend-specific; ``check*`` / ``allows`` / ``wrap`` come from
:class:`~visguard.checker.CheckerBase`.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from typing import Any

from visguard import plugins
from visguard.backend import Backend
from visguard.batching import MicroBatcher, shared_batcher
from visguard.checker import BatchObserver, CheckerBase
from visguard.checker import checked_requests as _checked_requests
from visguard.errors import BackendError, InputError, InputTooLongError
from visguard.format import Capabilities, GuardFormat
from visguard.policy import Mode, Policy
from visguard.types import GuardRequest, Verdict

DEFAULT_MODEL = "Tuwhy/Qwen2-VL-7B-MIRage"
#: the format of checkpoints no table entry names
DEFAULT_FORMAT = "visguard"


class Guard(CheckerBase):
    """A guard model with a format, a backend and a policy: a :class:`~visguard.checker.Checker`.

    Thread-safe: any number of threads (or asyncio tasks, through the ``a*`` methods) may call one
    guard; backends serialise model access internally.

    Args:
        backend: the backend running the guard model.
        format: the guard format (prompt builder and parser).
        policy: the decision policy (default :class:`Policy()`).
        max_batch: most requests one backend batch takes from concurrent callers (micro-batching;
            every guard on the same backend shares one batcher, created by the first guard).
        max_wait_ms: how long a request waits for others to share its batch.
    """

    def __init__(
        self,
        backend: Backend,
        format: GuardFormat,
        policy: Policy | None = None,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
    ) -> None:
        self.backend = backend
        self.format = format
        policy = policy or Policy()
        if policy.mode is None:  # the format's own mode (e.g. reason for MIRage)
            policy = policy.updated(mode=default_mode(format))
        self.policy = policy
        format.check_policy(self.policy)
        if format.capabilities.score and "fast" in format.capabilities.modes and not format.capabilities.fast_tokens:
            # a tokenizer that cannot tell the verdict words apart fails here, once, not every check
            backend.check_verdict_words(format.verdict_prefix, format.verdict_words)
        self._batcher = shared_batcher(backend, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        backend: str | Backend = "transformers",
        format: str | GuardFormat | None = None,
        policy: Policy | None = None,
        **backend_kwargs: Any,
    ) -> Guard:
        """Load a guard model.

        Args:
            model: a hub id (default: the MIS-tuned ``Tuwhy/Qwen2-VL-7B-MIRage``) or a local path.
            backend: a registered backend name (``transformers``, ``openai``, ``vllm`` when its
                plugin is installed ...) or a :class:`Backend` instance.
            format: a registered format name or a :class:`GuardFormat` instance; ``None`` (default)
                uses the format the checkpoint was trained for (:func:`resolve_format`: ``mirage``
                for the MIRage checkpoints), else ``visguard``.
            policy: decision policy.
            **backend_kwargs: passed to the backend factory (``device``, ``dtype``,
                ``trust_remote_code``, ``max_batch_size`` ...).

        Raises:
            PluginError: unknown backend or format name.
            InputError: a keyword argument the backend does not take.
            BackendError: the model could not be loaded, or its tokenizer cannot tell the verdict
                words apart.
        """
        fmt = resolve_format(model, format)
        if isinstance(backend, str):
            be = plugins.create("backends", backend, model, **backend_kwargs)
        else:
            if backend_kwargs:
                raise InputError(f"backend keyword arguments {sorted(backend_kwargs)} need a backend name")
            be = backend
        return cls(be, fmt, policy)

    def with_policy(self, policy: Policy | None = None, **changes: Any) -> Guard:
        """A guard sharing this one's model with another policy (or this policy with ``changes``)."""
        new = policy or self.policy.updated(**changes)
        self.format.check_policy(new)
        return Guard(self.backend, self.format, new, max_batch=self._batcher.max_batch,
                     max_wait_ms=self._batcher.max_wait_s * 1000.0)

    # ------------------------------------------------------------------ what a Checker is
    @property
    def model_id(self) -> str:
        """The guard model's id or path (what its verdicts name)."""
        return self.backend.model_id

    @property
    def capabilities(self) -> Capabilities:
        """What the guard's format can judge."""
        return self.format.capabilities

    def describe(self) -> dict[str, Any]:
        """``model``, ``backend`` and ``format`` names (evaluation rows, health, metadata)."""
        return {"model": self.backend.model_id, "backend": self.backend.name, "format": self.format.name}

    def check_supported(self, request: GuardRequest, mode: Mode | None = None) -> None:
        """Raise :class:`~visguard.errors.UnsupportedRequestError` when the format cannot judge ``request`` (in ``mode``)."""
        self.format.check_request(request, mode)

    # ------------------------------------------------------------------ checks
    def report_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Verdicts for several requests, acting on none: ``unavailable`` is returned whatever ``on_error`` says.

        Raises:
            InputError: an element is not a :class:`GuardRequest`.
        """
        requests = _checked_requests(requests)
        if not requests:
            return []
        mode = mode or self.policy.mode
        if mode not in ("fast", "reason", "adaptive"):
            raise InputError(f"unknown mode {mode!r}; expected fast, reason or adaptive")
        for r in requests:
            self.format.check_request(r, mode)
        self._check_lengths(requests, mode)
        start = time.perf_counter()
        timeout = self.policy.timeout_s
        futures = self._batcher.submit(requests, (self._run, mode))
        concurrent.futures.wait(futures, timeout=timeout)
        elapsed = (time.perf_counter() - start) * 1000.0
        late = [f for f in futures if not f.done()]
        if late:
            # queued ones will not run; a batch still running is abandoned and its worker replaced,
            # so a stuck backend call never blocks the checks after it
            self._batcher.abandon(late)
        verdicts = []
        for request, future in zip(requests, futures, strict=True):
            if future in late:
                verdict = self._unavailable(request, mode, f"guard timed out after {timeout:g} s (queueing included)")
            elif isinstance(future.exception(), InputError):
                raise future.exception()  # type: ignore[misc]
            elif future.exception() is not None:
                exc = future.exception()
                error = str(exc) if isinstance(exc, BackendError) else f"guard batch failed: {type(exc).__name__}: {exc}"
                verdict = self._unavailable(request, mode, error)
            else:
                verdict = future.result()
            verdicts.append(verdict.model_copy(update={"latency_ms": elapsed}))
        return verdicts

    # ------------------------------------------------------------------ batching
    @property
    def batcher(self) -> MicroBatcher:
        """The micro-batcher this guard's checks go through (shared by all guards on the backend)."""
        return self._batcher

    def configure_batching(self, *, max_batch: int | None = None, max_wait_ms: float | None = None) -> None:
        """Set the micro-batching limits of this guard's backend (all guards on it share them)."""
        self._batcher.configure(max_batch=max_batch, max_wait_s=None if max_wait_ms is None else max_wait_ms / 1000.0)

    def add_batch_observer(self, observer: BatchObserver) -> None:
        """Call ``observer(mode, verdicts, waited_s)`` after each batch of *this* guard's checks.

        ``waited_s`` is each check's time from submission to verdict, queueing included. Observer
        errors are ignored: metrics never break a check.
        """
        runner = self._run

        def on_batch(key: Any, results: list[Verdict], waited: list[float]) -> None:
            if key[0] == runner:
                observer(key[1], results, waited)

        self._batcher.observers.append(on_batch)

    def close(self) -> None:
        """Release the backend and its batching thread (shared by every guard on this backend)."""
        self._batcher.close()
        self.backend.close()

    # ------------------------------------------------------------------ internals
    def _unavailable(self, request: GuardRequest, mode: Mode, error: str, **fields: Any) -> Verdict:
        return Verdict.unavailable(error, stage=request.stage, mode=mode, model=self.backend.model_id, **fields)

    def _check_lengths(self, requests: list[GuardRequest], mode: Mode) -> None:
        """Refuse, before batching, a request whose prompt the backend's model cannot take."""
        if type(self.backend).prompt_too_long is Backend.prompt_too_long:
            return  # the backend knows no limit
        prompt_modes = {"fast": ("fast",), "reason": ("reason",), "adaptive": ("fast", "reason")}[mode]
        specials = self.backend.special_tokens
        for request in requests:
            for prompt_mode in prompt_modes:
                try:
                    prompts = self.format.build_all(request, self.policy, mode=prompt_mode, special_tokens=specials)
                except InputError:
                    raise
                except Exception:  # noqa: BLE001 - a format failure is reported by the check itself
                    continue
                for prompt in prompts:
                    why = self.backend.prompt_too_long(prompt)
                    if why:
                        raise InputTooLongError(f"request refused: {why}; shorten the text, response or conversation")

    def _run(self, requests: list[GuardRequest], mode: Mode) -> list[Verdict]:
        try:
            if mode == "fast":
                return self._fast(requests)
            if mode == "reason":
                return self._reason(requests, mode="reason")
            if mode == "adaptive":
                return self._adaptive(requests)
            raise InputError(f"unknown mode {mode!r}; expected fast, reason or adaptive")
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure is an unavailable verdict, never safe
            if len(requests) > 1:
                # One bad request (or a batch too large for the device) must not make the requests
                # batched with it, possibly other callers', unavailable: each is checked again alone.
                return [verdict for r in requests for verdict in self._run([r], mode)]
            return [self._unavailable(r, mode, f"guard backend error: {type(exc).__name__}: {exc}") for r in requests]

    def _prompts(self, requests: list[GuardRequest], mode: str) -> list:
        specials = self.backend.special_tokens
        return [self.format.build(r, self.policy, mode=mode, special_tokens=specials) for r in requests]

    def _fast(self, requests: list[GuardRequest]) -> list[Verdict]:
        tokens = self.format.capabilities.fast_tokens
        if tokens:  # the verdict comes within the first few generated tokens, not at position 0
            return self._reason(requests, mode="fast", max_new_tokens=tokens, prompt_mode="fast")
        if not self.backend.supports_scores:
            raise RuntimeError(f"backend {self.backend.name!r} cannot score verdict tokens; use mode='reason'")
        specials = self.backend.special_tokens
        per_request = [self.format.build_all(r, self.policy, mode="fast", special_tokens=specials) for r in requests]
        flat = [p for prompts in per_request for p in prompts]
        scores = self.backend.score(flat)
        out, start = [], 0
        for request, prompts in zip(requests, per_request, strict=True):
            mine = scores[start : start + len(prompts)]
            start += len(prompts)
            bad = [s for s in mine if s is None or s != s or not 0.0 <= s <= 1.0]
            if bad:
                out.append(self._unavailable(request, "fast", f"backend returned an invalid score {bad[0]!r}"))
                continue
            score, category = self.format.combine([float(s) for s in mine], self.policy)
            out.append(self._scored(request, score, "fast", category=category))
        return out

    def _scored(self, request: GuardRequest, score: float, mode: Mode, category: str | None = None) -> Verdict:
        if score is None or not 0.0 <= score <= 1.0 or score != score:
            return self._unavailable(request, mode, f"backend returned an invalid score {score!r}")
        label = "unsafe" if self.policy.decides_unsafe(score) else "safe"
        category = category if label == "unsafe" else None
        return Verdict(label=label, score=float(score), category=category, categories=(category,) if category else (),
                       stage=request.stage, mode=mode, model=self.backend.model_id)

    def _reason(
        self,
        requests: list[GuardRequest],
        mode: Mode,
        fast: list[Verdict] | None = None,
        *,
        max_new_tokens: int | None = None,
        prompt_mode: str = "reason",
    ) -> list[Verdict]:
        gens = self.backend.generate(self._prompts(requests, prompt_mode), max_new_tokens=max_new_tokens or self.policy.max_new_tokens)
        follow = (self._followups(requests, [g.text for g in gens]) if prompt_mode == "reason"
                  else [None] * len(requests))
        out = []
        for i, (req, gen) in enumerate(zip(requests, gens, strict=True)):
            parsed = self.format.parse_for(gen.text, self.policy, req)
            score: float | None
            if follow[i] is not None:
                # The format's verdict question, asked after the guard's own text, decides.
                label, score, error = follow[i]
                if label is None:
                    out.append(self._unavailable(req, mode, error or "no verdict in the follow-up answer", raw=gen.text))
                    continue
            elif parsed.label is None:
                prior = fast[i].score if fast else None
                out.append(self._unavailable(req, mode, parsed.error or "unparseable guard output", raw=gen.text, score=prior))
                continue
            else:
                score, label = gen.score_at(parsed.verdict_offset), parsed.label
            out.append(
                Verdict(
                    label=label,
                    score=score,
                    category=parsed.category if label == "unsafe" else None,
                    sub_category=parsed.sub_category if label == "unsafe" else None,
                    categories=(parsed.categories or ((parsed.category,) if parsed.category else ())) if label == "unsafe" else (),
                    reasoning=parsed.reasoning,
                    raw=gen.text,
                    stage=req.stage,
                    mode=mode,
                    model=self.backend.model_id,
                    safe_answer=parsed.safe_answer,
                )
            )
        return out

    def _followups(self, requests: list[GuardRequest], texts: list[str]) -> list[tuple[Any, float | None, str | None] | None]:
        """``(label, P(unsafe), error)`` from the format's follow-up verdict prompts (``None`` where
        the format asks none): scored in one forward pass, or, on backends without scores,
        answered with a few greedy tokens and read by :meth:`GuardFormat.parse_followup`."""
        specials = self.backend.special_tokens
        prompts = [self.format.followup(r, self.policy, t, special_tokens=specials) for r, t in zip(requests, texts, strict=True)]
        where = [i for i, p in enumerate(prompts) if p is not None]
        out: list[tuple[Any, float | None, str | None] | None] = [None] * len(requests)
        if not where:
            return out
        asked = [prompts[i] for i in where]
        if self.backend.supports_scores:
            for i, s in zip(where, self.backend.score(asked), strict=True):
                if s is None or s != s or not 0.0 <= s <= 1.0:
                    raise RuntimeError(f"backend returned an invalid follow-up score {s!r}")
                out[i] = ("unsafe" if self.policy.decides_unsafe(s) else "safe", float(s), None)
        else:
            for i, g in zip(where, self.backend.generate(asked, max_new_tokens=4), strict=True):
                label = self.format.parse_followup(g.text)
                out[i] = (label, None, None if label else f"no verdict word in the follow-up answer {g.text[:40]!r}")
        return out

    def _adaptive(self, requests: list[GuardRequest]) -> list[Verdict]:
        if not self.backend.supports_scores and not self.format.capabilities.fast_tokens:
            return self._reason(requests, mode="adaptive")
        fast = [v.model_copy(update={"mode": "adaptive"}) for v in self._fast(requests)]
        unsure = [i for i, v in enumerate(fast) if v.score is not None and self.policy.in_band(v.score)]
        if unsure:
            reasoned = self._reason([requests[i] for i in unsure], mode="adaptive", fast=[fast[i] for i in unsure])
            for i, v in zip(unsure, reasoned, strict=True):
                fast[i] = v
        return fast


def default_mode(format: GuardFormat) -> Mode:
    """The mode a policy that names none runs ``format`` in.

    The format's ``Capabilities.default_mode`` (the mode its model was trained to be read in), else
    ``fast`` where the format can run it, else its first mode.
    """
    caps = format.capabilities
    if caps.default_mode is not None:
        return caps.default_mode
    return "fast" if "fast" in caps.modes else caps.modes[0]


def resolve_format(model: str, format: str | GuardFormat | None = None) -> GuardFormat:
    """The guard format to run ``model`` with.

    An explicit ``format`` (name or instance) wins; otherwise the format registered for the model
    (:func:`visguard.plugins.format_for_model`: a checkpoint's ``visguard.json``, the
    ``register_model_formats`` table, e.g. ``Tuwhy/Qwen2-VL-7B-MIRage`` -> ``mirage``); otherwise
    ``visguard``. Naming the checkpoint's own format (``format="mirage"`` for a MIRage id) keeps
    the table's settings for it.

    Raises:
        PluginError: an unknown format name.
    """
    if isinstance(format, GuardFormat):
        return format
    if format is not None and not isinstance(format, str):
        raise InputError(f"format must be a name or a GuardFormat, got {type(format).__name__}")
    factory = plugins.format_for_model(str(model))
    native = factory() if factory is not None else None
    if format is None:
        return native if native is not None else plugins.get("formats", DEFAULT_FORMAT)()
    # Naming the checkpoint's own format keeps the table's settings (variant, pixel range).
    return native if native is not None and native.name == format else plugins.get("formats", format)()
