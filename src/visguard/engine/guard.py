"""The Guard: ask a guard model, through a format on a backend, for a verdict on a request.

Data flow: inputs -> :func:`~visguard.core.images.load_images` -> :class:`GuardRequest` -> format.plan (a
:class:`~visguard.engine.format.CheckPlan`: the prompts and how to read them, built once per request in the
caller's thread) -> the batcher -> backend.score / backend.generate (each prompt rendered and tokenized
once) -> the plan's reading -> :class:`Verdict`. The guard reports; what a verdict
means for the call (pass, block, degraded, raise) is :meth:`Policy.action`, which every caller acts on.

A Guard is one :class:`~visguard.engine.checker.Checker` (a cascade is another): this module holds what is
model-, format- and backend-specific; ``check*`` / ``allows`` / ``wrap`` come from
:class:`~visguard.engine.checker.CheckerBase`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from visguard import plugins
from visguard.core.errors import BackendError, InputError, InputTooLongError, PromptTooLongError
from visguard.core.policy import Mode, Policy
from visguard.core.types import GuardRequest, Verdict
from visguard.engine import attribution
from visguard.engine.backend import Backend
from visguard.engine.batching import MicroBatcher, shared_batcher
from visguard.engine.checker import BatchObserver, CheckerBase
from visguard.engine.checker import checked_requests as _checked_requests
from visguard.engine.format import Capabilities, CheckPlan, GuardFormat, GuardPrompt, verdict_word

DEFAULT_MODEL = "Tuwhy/Qwen2-VL-7B-MIRage"
#: the format of checkpoints no table entry names
DEFAULT_FORMAT = plugins.DEFAULT_FORMAT


class Guard(CheckerBase):
    """A guard model with a format, a backend and a policy: a :class:`~visguard.engine.checker.Checker`.

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
        format.check_backend(backend)
        if format.capabilities.score and "fast" in format.capabilities.modes and not format.capabilities.fast_tokens:
            # a tokenizer that cannot tell the verdict words apart fails here, once, not every check
            backend.check_verdict_words(format.verdict_prefix, format.verdict_words)
        self._batcher = shared_batcher(backend, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0)
        if getattr(backend, "serial", False):
            # a backend that runs one call at a time (a model lock): one stalled batch blocks every
            # later one, so later checks fail fast with the reason instead of each timing out
            self._batcher.max_stalled = 1

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
        """Raise :class:`~visguard.core.errors.UnsupportedRequestError` when the format cannot judge ``request`` (in ``mode``)."""
        self.format.check_request(request, mode)

    # ------------------------------------------------------------------ checks
    def report_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Verdicts for several requests, acting on none: ``unavailable`` is returned whatever ``on_error`` says.

        Each request is planned once (:meth:`GuardFormat.plan`, after :meth:`GuardFormat.check_request`)
        here, in the caller's thread; the batcher executes the plans.

        Raises:
            InputError: an element is not a :class:`GuardRequest`.
            UnsupportedRequestError: the format cannot judge a request, or run in ``mode``.
            InputTooLongError: a request's prompt is longer than the guard model can take.

        With ``policy.explain`` each verdict carries :attr:`Verdict.attribution`
        (:func:`visguard.engine.attribution.report_explained`; a format that cannot score subsets
        raises :class:`~visguard.core.errors.UnsupportedRequestError`).
        """
        requests = _checked_requests(requests)
        if not requests:
            return []
        if self.policy.explain:  # Verdict.attribution: subsets scored in the same batched pass
            return attribution.report_explained(self, requests, mode)
        mode = mode or self.policy.mode
        if mode not in ("fast", "reason", "adaptive"):
            raise InputError(f"unknown mode {mode!r}; expected fast, reason or adaptive")
        # Planned once, here in the caller's thread: a request the format refuses raises to its own caller.
        planned = [self._plan(r, mode) for r in requests]
        checks = [plan for plan in planned if isinstance(plan, tuple)]
        start = time.perf_counter()
        timeout = self.policy.timeout_s
        futures = self._batcher.submit(checks, (self._run, mode)) if checks else []
        concurrent.futures.wait(futures, timeout=timeout)
        elapsed = (time.perf_counter() - start) * 1000.0
        late = [f for f in futures if not f.done()]
        if late:
            # queued ones will not run; a batch still running is abandoned and its worker replaced,
            # so a stuck backend call never blocks the checks after it
            self._batcher.abandon(late)
        pending = iter(futures)
        verdicts = []
        for request, plan in zip(requests, planned, strict=True):
            if isinstance(plan, Verdict):  # the format could not plan it
                verdicts.append(plan.model_copy(update={"latency_ms": elapsed}))
                continue
            future = next(pending)
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

    def _plan(self, request: GuardRequest, mode: Mode) -> tuple[CheckPlan, ...] | Verdict:
        """The plans of one check, built once, in the caller's thread: ``(fast,)``, ``(reason,)`` or,
        adaptive, ``(fast, reason)`` (``(reason,)`` when the fast plan scores and the backend cannot).

        Returns an ``unavailable`` verdict (never ``safe``) when the format fails to plan it.

        Raises:
            InputError: the format cannot judge the request (in ``mode``) or refuses its content.
        """
        self.format.check_request(request, mode)
        specials = self.backend.special_tokens
        salt = request.cache_salt or _CACHE_SALT.get()
        try:
            if mode != "adaptive":
                return (_salted(self.format.plan(request, self.policy, mode=mode, special_tokens=specials), salt),)
            fast = _salted(self.format.plan(request, self.policy, mode="fast", special_tokens=specials), salt)
            reason = _salted(self.format.plan(request, self.policy, mode="reason", special_tokens=specials), salt)
            return (reason,) if fast.read == "score" and not self.backend.supports_scores else (fast, reason)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a format failure is an unavailable verdict, never safe
            return self._unavailable(request, mode, f"guard format error: {type(exc).__name__}: {exc}")

    def _run(self, checks: list[tuple[CheckPlan, ...]], mode: Mode) -> list[Verdict | InputError]:
        """Execute a batch of planned checks: each one's verdict, or the input error that refuses it
        (raised to that check's caller alone by the batcher)."""
        try:
            if mode == "adaptive":
                return self._adaptive(checks)
            return self._execute([check[0] for check in checks], mode, fast_stage=mode == "fast")
        except Exception as exc:  # noqa: BLE001 - any backend failure is an unavailable verdict, never safe
            if len(checks) > 1:
                # One bad request (or a batch too large for the device) must not make the requests
                # batched with it, possibly other callers', unavailable: each is checked again alone.
                return [result for check in checks for result in self._run([check], mode)]
            if isinstance(exc, InputError):
                return [exc]
            return [self._unavailable(checks[0][0].request, mode, f"guard backend error: {type(exc).__name__}: {exc}")]

    def _execute(self, plans: list[CheckPlan], mode: Mode, prior: list[float | None] | None = None, *,
                 fast_stage: bool = False) -> list[Verdict | InputError]:
        """Run ``plans`` as their ``read`` says: score plans in one backend call, generate plans in
        one per token budget. ``prior``: each plan's earlier (fast) score, kept on an unparseable reason.
        ``fast_stage``: the plans are fast plans (a generated-fast verdict with a score is the threshold's)."""
        out: list[Verdict | InputError | None] = [None] * len(plans)
        scored = [i for i, plan in enumerate(plans) if plan.read == "score"]
        if scored:
            for i, result in zip(scored, self._score([plans[i] for i in scored], mode), strict=True):
                out[i] = result
        generated = [i for i, plan in enumerate(plans) if plan.read == "generate"]
        for budget in sorted({plans[i].max_new_tokens for i in generated}):
            group = [i for i in generated if plans[i].max_new_tokens == budget]
            results = self._generate([plans[i] for i in group], mode, budget, [prior[i] if prior else None for i in group],
                                     fast_stage=fast_stage)
            for i, result in zip(group, results, strict=True):
                out[i] = result
        return out  # type: ignore[return-value]

    @staticmethod
    def _call(run: Callable[[list[GuardPrompt]], list[Any]], prompts: list[GuardPrompt], owners: list[int]
              ) -> tuple[dict[int, Any], dict[int, str]]:
        """``run(prompts)`` as ``{prompt index: result}``, and ``{owner: why}`` for the checks (``owners[k]``:
        prompt ``k``'s) whose prompts the backend found too long: their prompts are left out and the
        rest run again (re-encoded; the backend refuses before its model runs)."""
        refused: dict[int, str] = {}
        keep = list(range(len(prompts)))
        while keep:
            try:
                results = run([prompts[k] for k in keep])
            except PromptTooLongError as exc:
                bad = {owners[keep[k]]: why for k, why in exc.too_long.items() if 0 <= k < len(keep)}
                if not bad:
                    raise
                for owner, why in bad.items():
                    refused.setdefault(owner, why)
                keep = [k for k in keep if owners[k] not in refused]
                continue
            if len(results) != len(keep):
                raise RuntimeError(f"backend returned {len(results)} results for {len(keep)} prompts")
            return dict(zip(keep, results, strict=True)), refused
        return {}, refused

    def _score(self, plans: list[CheckPlan], mode: Mode) -> list[Verdict | InputError]:
        if not self.backend.supports_scores:
            raise RuntimeError(f"backend {self.backend.name!r} cannot score verdict tokens; use mode='reason'")
        owners = [i for i, plan in enumerate(plans) for _ in plan.prompts]
        scores, refused = self._call(self.backend.score, [p for plan in plans for p in plan.prompts], owners)
        out: list[Verdict | InputError] = []
        for i, plan in enumerate(plans):
            if i in refused:
                out.append(_too_long(refused[i]))
                continue
            mine = [scores[k] for k, owner in enumerate(owners) if owner == i]
            bad = [s for s in mine if not _is_probability(s)]
            if bad:
                out.append(self._unavailable(plan.request, mode, f"backend returned an invalid score {bad[0]!r}"))
                continue
            score, category = plan.combine([float(s) for s in mine])
            out.append(self._scored(plan.request, score, mode, category=category))
        return out

    def _scored(self, request: GuardRequest, score: float, mode: Mode, category: str | None = None) -> Verdict:
        if score is None or not 0.0 <= score <= 1.0 or score != score:
            return self._unavailable(request, mode, f"backend returned an invalid score {score!r}")
        label: Literal["safe", "unsafe"] = "unsafe" if self.policy.decides_unsafe(score) else "safe"
        category = category if label == "unsafe" else None
        return Verdict(label=label, score=float(score), category=category, categories=(category,) if category else (),
                       stage=request.stage, mode=mode, model=self.backend.model_id)

    def _generate(self, plans: list[CheckPlan], mode: Mode, max_new_tokens: int, prior: list[float | None], *,
                  fast_stage: bool = False) -> list[Verdict | InputError]:
        gens, refused = self._call(lambda prompts: self.backend.generate(prompts, max_new_tokens=max_new_tokens),
                                   [plan.prompts[0] for plan in plans], list(range(len(plans))))
        asked: dict[int, GuardPrompt] = {}
        for i in gens:
            follow = plans[i].followup
            prompt = follow(gens[i].text) if follow is not None else None
            if prompt is not None:
                asked[i] = prompt
        answers = self._followups(asked)
        out: list[Verdict | InputError] = []
        for i, plan in enumerate(plans):
            if i in refused:
                out.append(_too_long(refused[i]))
                continue
            req, gen = plan.request, gens[i]
            if plan.parse is None:  # CheckPlan refuses a generate plan without one
                raise RuntimeError("a generate plan without parse")
            parsed = plan.parse(gen.text)
            answer = answers.get(i)
            score: float | None
            if isinstance(answer, InputError):
                out.append(answer)
                continue
            if answer is not None:
                # The format's verdict question, asked after the guard's own text, decides.
                label, score, error = answer
                if label is None:
                    out.append(self._unavailable(req, mode, error or "no verdict in the follow-up answer", raw=gen.text))
                    continue
            elif parsed.label is None:
                out.append(self._unavailable(req, mode, parsed.error or "unparseable guard output", raw=gen.text,
                                             score=prior[i]))
                continue
            else:
                score, label = gen.score_at(parsed.verdict_offset), parsed.label
                if fast_stage and score is not None and _is_probability(score):
                    # Generated-fast (Llama Guard ...): the verdict word's probability is the fast
                    # score, and wherever a score exists the policy's threshold decides, not the greedy word.
                    label = "unsafe" if self.policy.decides_unsafe(score) else "safe"
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

    def _followups(self, asked: dict[int, GuardPrompt]) -> dict[int, tuple[Any, float | None, str | None] | InputError]:
        """``(label, P(unsafe), error)`` for each follow-up verdict prompt (by its check's index):
        scored in one forward pass or, on backends without scores, answered with a few greedy
        tokens whose first word is read against the prompt's verdict words; an
        :class:`InputTooLongError` where the prompt (request + the guard's answer + question) is
        too long for the model."""
        if not asked:
            return {}
        where = list(asked)
        prompts = [asked[i] for i in where]
        out: dict[int, tuple[Any, float | None, str | None] | InputError] = {}
        if self.backend.supports_scores:
            scores, refused = self._call(self.backend.score, prompts, where)
            for k, i in enumerate(where):
                if i in refused:
                    out[i] = _too_long(refused[i], " (the follow-up verdict question after the guard's own answer)")
                    continue
                s = scores[k]
                if not _is_probability(s):
                    raise RuntimeError(f"backend returned an invalid follow-up score {s!r}")
                out[i] = ("unsafe" if self.policy.decides_unsafe(s) else "safe", float(s), None)
        else:
            gens, refused = self._call(lambda ps: self.backend.generate(ps, max_new_tokens=4), prompts, where)
            for k, i in enumerate(where):
                if i in refused:
                    out[i] = _too_long(refused[i], " (the follow-up verdict question after the guard's own answer)")
                    continue
                text = gens[k].text
                label = verdict_word(text, prompts[k].verdict_words)
                out[i] = (label, None, None if label else f"no verdict word in the follow-up answer {text[:40]!r}")
        return out

    def _adaptive(self, checks: list[tuple[CheckPlan, ...]]) -> list[Verdict | InputError]:
        """Fast plans first; the checks whose score falls in the policy's band run their reason plan."""
        out: list[Verdict | InputError | None] = [None] * len(checks)
        direct = [i for i, check in enumerate(checks) if len(check) == 1]  # no fast score to be had: reason
        for i, result in zip(direct, self._execute([checks[i][0] for i in direct], "adaptive"), strict=True):
            out[i] = result
        staged = [i for i, check in enumerate(checks) if len(check) > 1]
        for i, result in zip(staged, self._execute([checks[i][0] for i in staged], "adaptive", fast_stage=True), strict=True):
            out[i] = result
        scores = {i: v.score for i in staged if isinstance(v := out[i], Verdict) and v.score is not None}
        unsure = [i for i, score in scores.items() if self.policy.in_band(score)]
        if unsure:
            prior: list[float | None] = [scores[i] for i in unsure]
            for i, result in zip(unsure, self._execute([checks[i][1] for i in unsure], "adaptive", prior), strict=True):
                out[i] = result
        return out  # type: ignore[return-value]


_CACHE_SALT: contextvars.ContextVar[str] = contextvars.ContextVar("visguard_cache_salt", default="")


@contextlib.contextmanager
def cache_salt(salt: str) -> Iterator[None]:
    """Check every request planned inside the block with this cache salt (where the request names
    none): its cached prompt prefixes are shared only with requests of the same salt (see
    :attr:`~visguard.core.types.GuardRequest.cache_salt`). A server sets one per API key around a
    call: guarded calls plan their checks in the caller's context (worker threads copy it)."""
    token = _CACHE_SALT.set(str(salt))
    try:
        yield
    finally:
        _CACHE_SALT.reset(token)


def _salted(plan: CheckPlan, salt: str) -> CheckPlan:
    """``plan`` with ``salt`` on every prompt it runs, follow-ups included."""
    if not salt:
        return plan
    follow = plan.followup
    return dataclasses.replace(
        plan,
        prompts=tuple(dataclasses.replace(p, cache_salt=salt) for p in plan.prompts),
        followup=None if follow is None else lambda text: (
            None if (prompt := follow(text)) is None else dataclasses.replace(prompt, cache_salt=salt)),
    )


def _is_probability(score: Any) -> bool:
    return isinstance(score, int | float) and score == score and 0.0 <= score <= 1.0


def _too_long(why: str, where: str = "") -> InputTooLongError:
    return InputTooLongError(f"request refused: {why}{where}; shorten the text, response or conversation")


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
    """The guard format to run ``model`` with: :func:`visguard.plugins.resolve_format` (the one
    resolver), typed; an explicit instance wins, then the checkpoint's own, then ``visguard``.

    Raises:
        PluginError: an unknown format name.
        InputError: ``format`` is neither a name nor a GuardFormat.
    """
    if format is not None and not isinstance(format, str | GuardFormat):
        raise InputError(f"format must be a name or a GuardFormat, got {type(format).__name__}")
    resolved: GuardFormat = plugins.resolve_format(model, format)
    return resolved
