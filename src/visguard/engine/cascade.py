"""Cascades: a guard made of guards, cheap ones first, an expensive one only where needed.

The idea follows SafeRoute (adaptive selection between a small and a large guard model): most
requests are easy, and a small guard's confident verdict is as good as a large guard's. A
:class:`Cascade` runs its stages in order; a stage decides a request unless its verdict escalates
it (the stage is unsure, or flags it, or cannot judge it), and only escalated requests reach the
next stage. A stage may hold several guards that look at different parts of a request (an image
classifier and a text guard side by side). Every stage's verdict is kept on the final verdict
(``Verdict.stages``), and :meth:`Cascade.stats` measures the cost saved against running the last
stage on everything.

A cascade is the second :class:`~visguard.engine.checker.Checker` beside :class:`~visguard.engine.guard.Guard`
(it is not a Guard: it has no format or backend of its own), so it is used wherever a guard is:
``check_input`` / ``check_output`` / ``check`` / ``check_batch`` / ``report_batch`` and their async
forms, ``wrap(host)``, ``visguard serve`` / ``eval`` / ``check`` (``--stage``), LangChain.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from visguard.core.errors import InputError, UnsupportedRequestError
from visguard.core.policy import Mode, Policy
from visguard.core.types import GuardRequest, Verdict
from visguard.engine.checker import BatchObserver, Checker, CheckerBase, checked_requests, worst_verdict
from visguard.engine.format import Capabilities

Escalate = Literal["unsure", "flagged", "unsure_or_flagged"]


@dataclass(frozen=True)
class Stage:
    """One step of a cascade.

    Args:
        guards: the guard(s) of this stage (any :class:`~visguard.engine.checker.Checker`: a
            :class:`~visguard.engine.guard.Guard`, or a cascade); each judges the requests it can (a guard
            that cannot judge a request, e.g. an image classifier on a text-only request, sits it out).
        escalate: which verdicts go on to the next stage: ``unsure`` (a score inside ``band``, or
            no verdict), ``flagged`` (unsafe or no verdict: a later guard confirms flags) or
            ``unsure_or_flagged``. The last stage always decides.
        band: closed interval of P(unsafe) that counts as unsure.
        name: shown in stats (default: the guards' model ids).
        checks: which checks this stage takes part in: ``input`` (pre-checks of requests),
            ``output`` (post-checks of answers) or both; e.g. a visual guard on inputs and a cheap
            text guard on the host's answers.
    """

    guards: tuple[Checker, ...]
    escalate: Escalate = "unsure"
    band: tuple[float, float] = (0.2, 0.8)
    name: str = ""
    checks: tuple[Literal["input", "output"], ...] = ("input", "output")

    def __post_init__(self) -> None:
        if not self.guards:
            raise InputError("a cascade stage needs at least one guard")
        for g in self.guards:
            if not isinstance(g, Checker):
                raise InputError(f"cascade stages hold guards (Checkers), got {type(g).__name__}")
        if self.escalate not in ("unsure", "flagged", "unsure_or_flagged"):
            raise InputError(f"escalate must be unsure, flagged or unsure_or_flagged, got {self.escalate!r}")
        if not self.checks or set(self.checks) - {"input", "output"}:
            raise InputError(f"checks must be 'input' and/or 'output', got {self.checks!r}")
        low, high = self.band
        if not 0.0 <= low <= high <= 1.0:
            raise InputError(f"band must satisfy 0 <= low <= high <= 1, got {self.band}")
        if not self.name:
            object.__setattr__(self, "name", "+".join(g.model_id or str(g.describe().get("format")) for g in self.guards))

    def escalates(self, verdict: Verdict) -> bool:
        """Whether this stage's (combined) verdict sends the request on."""
        if verdict.label == "unavailable":
            return True
        unsure = verdict.score is not None and self.band[0] <= verdict.score <= self.band[1]
        flagged = verdict.label == "unsafe"
        return {"unsure": unsure, "flagged": flagged, "unsure_or_flagged": unsure or flagged}[self.escalate]


@dataclass
class _StageCost:
    runs: int = 0  # requests this stage judged
    ms: float = 0.0  # wall time of its calls
    decided: int = 0  # requests whose final verdict came from it


class Cascade(CheckerBase):
    """A guard made of guards (see the module docstring): a :class:`~visguard.engine.checker.Checker`.

    Args:
        stages: :class:`Stage` objects, or guards (each becomes a one-guard stage with the default
            ``escalate="unsure"``), cheapest first.
        policy: what the cascade's verdicts do (``on_error``, limits); each stage keeps its own
            policy for its thresholds and categories. Default: the last stage's policy.

    Example:
        ``Cascade([Stage((nsfw, text_guard), escalate="unsure_or_flagged"), reasoner])``
    """

    def __init__(self, stages: Sequence[Stage | Checker], *, policy: Policy | None = None) -> None:
        built = tuple(s if isinstance(s, Stage) else Stage((s,)) for s in stages)
        if not built:
            raise InputError("a cascade needs at least one stage")
        self.stages = built
        self.policy = policy or built[-1].guards[-1].policy
        self._costs = [_StageCost() for _ in built]
        self._requests = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what a Checker is
    @property
    def model_id(self) -> str:
        """``cascade(<stage> -> <stage> ...)``, each stage named by its guards' models."""
        return "cascade(" + " -> ".join(s.name for s in self.stages) + ")"

    @property
    def capabilities(self) -> Capabilities:
        """The union of the stages' guards' capabilities (requests: of the stages taking part in
        pre-checks; responses: of those taking part in post-checks)."""
        takes = [(g.capabilities, s.checks) for s in self.stages for g in s.guards]
        caps = [c for c, _ in takes]
        most = [c.max_images for c in caps]
        return Capabilities(
            min_images=min(c.min_images for c in caps),
            max_images=None if any(m is None for m in most) else max(m for m in most if m is not None),
            text=any(c.text for c in caps),
            images=any(c.images for c in caps),
            requests=any(c.requests for c, checks in takes if "input" in checks),
            responses=any(c.responses for c, checks in takes if "output" in checks),
            score=any(c.score for c in caps),
            categories=any(c.categories for c in caps),
            custom_categories=any(c.custom_categories for c in caps),
            modes=tuple(m for m in ("fast", "reason", "adaptive") if any(m in c.modes for c in caps)),
            cross_image=any(c.cross_image for c in caps),
            conversation=any(c.conversation for c in caps),
        )

    def describe(self) -> dict[str, Any]:
        """``model`` (:attr:`model_id`), ``backend`` and ``format`` ``cascade``, and each stage's name."""
        return {"model": self.model_id, "backend": "cascade", "format": "cascade",
                "stages": [s.name for s in self.stages]}

    def check_supported(self, request: GuardRequest, mode: Mode | None = None) -> None:
        """Raise :class:`UnsupportedRequestError` when no guard of a stage taking part in the request's
        check can judge it (``mode`` is not used: each guard runs in its own policy's mode)."""
        reasons = []
        for stage in self.stages:
            if request.stage not in stage.checks:
                continue
            for guard in stage.guards:
                try:
                    guard.check_supported(request)
                    return
                except UnsupportedRequestError as exc:
                    reasons.append(str(exc))
        raise UnsupportedRequestError(f"no stage of the cascade can judge this {request.stage} check: "
                                      + ("; ".join(reasons) or "no stage takes part in it"))

    def with_policy(self, policy: Policy | None = None, **changes: Any) -> Cascade:
        """The same stages (and guards) with another cascade policy (or this one with ``changes``)."""
        return Cascade(self.stages, policy=policy or self.policy.updated(**changes))

    def report_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Run the stages; ``mode`` is ignored (each stage runs in its own policy's mode).

        Raises:
            InputError: an element is not a :class:`GuardRequest`.
            UnsupportedRequestError: no stage can judge a request.
        """
        requests = checked_requests(requests)
        for r in requests:
            self.check_supported(r)
        start = time.perf_counter()
        deadline = None if self.policy.timeout_s is None else start + self.policy.timeout_s
        history: list[list[Verdict]] = [[] for _ in requests]
        decided: list[tuple[int, Verdict] | None] = [None] * len(requests)
        failed: list[list[str]] = [[] for _ in requests]  # earlier stages that gave no verdict, and why
        pending = list(range(len(requests)))
        for k, stage in enumerate(self.stages):
            if not pending:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                break  # out of time: the requests still pending get the cascade's timeout below
            combined = self._run_stage(k, stage, [requests[i] for i in pending], deadline)
            last = k == len(self.stages) - 1
            still = []
            for i, (verdict, members, unread) in zip(pending, combined, strict=True):
                history[i] += members
                if verdict is None:  # no guard of this stage could judge it
                    still.append(i)
                    continue
                if verdict.label == "unavailable":
                    failed[i].append(f"stage {stage.name!r}: {verdict.error}")
                # A stage decides "safe" only for what its guards read: a request with a part none
                # of them read (a second image, text beside a photo) goes on to the next stage.
                partial_safe = bool(unread) and verdict.label == "safe"
                if last or not (stage.escalates(verdict) or partial_safe):
                    decided[i] = (k, verdict)
                else:
                    decided[i] = (k, verdict)  # provisional: a later stage may replace it
                    still.append(i)
            pending = still
        timed_out = set(pending) if deadline is not None and time.perf_counter() >= deadline else set()
        elapsed = (time.perf_counter() - start) * 1000.0
        out = []
        with self._lock:
            self._requests += len(requests)
            for i, request in enumerate(requests):
                outcome = decided[i]
                if i in timed_out and not (outcome is not None and outcome[1].label == "unsafe"):
                    # out of time before a stage could decide it (a flag already raised stands)
                    verdict = Verdict.unavailable(f"cascade timed out after {self.policy.timeout_s:g} s",
                                                  stage=request.stage, model=self.model_id)
                    outcome = (outcome[0] if outcome else len(self.stages) - 1, verdict)
                if outcome is None:
                    raise UnsupportedRequestError(f"request {i}: no guard of the cascade could judge it in its mode")
                k, verdict = outcome
                self._costs[k].decided += 1
                update: dict[str, Any] = {"stages": tuple(history[i]), "latency_ms": elapsed, "stage": request.stage}
                earlier = failed[i]
                if earlier and verdict.label != "unavailable":
                    # the deciding stage's verdict stands, and the failure before it stays visible
                    update["error"] = "earlier stage unavailable: " + "; ".join(earlier)
                out.append(verdict.model_copy(update=update))
        return out

    def _run_stage(self, k: int, stage: Stage, requests: list[GuardRequest], deadline: float | None = None
                   ) -> list[tuple[Verdict | None, list[Verdict], set[str]]]:
        """Each request's combined verdict for this stage (``None``: no guard judged it), its guards'
        verdicts, and the parts of the request none of the guards that judged it read."""
        members: list[list[Verdict]] = [[] for _ in requests]
        read: list[set[str]] = [set() for _ in requests]
        for guard in stage.guards:
            idx = []
            for i, r in enumerate(requests):
                if r.stage not in stage.checks:
                    continue
                try:
                    guard.check_supported(r, guard.policy.mode)
                    idx.append(i)
                except UnsupportedRequestError:
                    continue
            if not idx:
                continue
            t0 = time.perf_counter()
            verdicts = self._call_guard(guard, [requests[i] for i in idx], deadline)
            with self._lock:
                self._costs[k].runs += len(idx)
                self._costs[k].ms += (time.perf_counter() - t0) * 1000.0
            caps = guard.capabilities
            for i, v in zip(idx, verdicts, strict=True):
                members[i].append(v)
                read[i] |= {part for part, seen in (("text", caps.text), ("images", caps.images),
                                                    ("conversation", caps.conversation)) if seen}
        # any unsafe, else any unavailable, else the least confident safe (its score decides escalation)
        return [(worst_verdict(m) if m else None, m, _parts(r) - seen) for r, m, seen in zip(requests, members, read, strict=True)]

    def _call_guard(self, guard: Checker, requests: list[GuardRequest], deadline: float | None) -> list[Verdict]:
        """``guard.report_batch(requests)``, given at most the time left before the cascade's deadline;
        past it, each request's verdict is ``unavailable`` (the guard's own call ends by its own time limit)."""
        if deadline is None:
            return guard.report_batch(requests)
        future: concurrent.futures.Future[list[Verdict]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(guard.report_batch(requests))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                future.set_exception(exc)

        # the caller's context goes with it (the request's cache salt: engine.guard.cache_salt)
        threading.Thread(target=contextvars.copy_context().run, args=(run,), name="visguard-cascade-stage",
                         daemon=True).start()
        try:
            return future.result(timeout=max(0.0, deadline - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            why = f"cascade timed out after {self.policy.timeout_s:g} s (stage guard {guard.model_id!r} still running)"
            return [Verdict.unavailable(why, stage=r.stage, model=guard.model_id) for r in requests]

    # ------------------------------------------------------------------ the stages' models
    def stage_guards(self) -> list[Checker]:
        """Every guard of every stage, each once (a guard may sit in several stages)."""
        seen: dict[int, Checker] = {}
        for stage in self.stages:
            for guard in stage.guards:
                seen.setdefault(id(guard), guard)
        return list(seen.values())

    def close(self) -> None:
        """Close every stage's guards."""
        for guard in self.stage_guards():
            guard.close()

    def configure_batching(self, *, max_batch: int | None = None, max_wait_ms: float | None = None) -> None:
        """Set the micro-batching limits of every stage's guards."""
        for guard in self.stage_guards():
            guard.configure_batching(max_batch=max_batch, max_wait_ms=max_wait_ms)

    def add_batch_observer(self, observer: BatchObserver) -> None:
        """Observe every stage guard's batches: ``observer(mode, verdicts, waited_s)`` sees each stage's
        own verdicts (their ``model``), not the cascade's combined one."""
        for guard in self.stage_guards():
            guard.add_batch_observer(observer)

    # ------------------------------------------------------------------ cost
    def stats(self) -> CascadeStats:
        """What the cascade did so far and what it saved against running the last stage on everything."""
        with self._lock:
            rows = [StageStats(name=s.name, runs=c.runs, decided=c.decided, ms=c.ms)
                    for s, c in zip(self.stages, self._costs, strict=True)]
            return CascadeStats(requests=self._requests, stages=tuple(rows))

    def reset_stats(self) -> None:
        with self._lock:
            self._costs = [_StageCost() for _ in self.stages]
            self._requests = 0


def _parts(request: GuardRequest) -> set[str]:
    """The parts of a request a guard must read to clear it: its text (or, in a post-check, the
    response beside it), its images, its earlier conversation turns."""
    parts = set()
    if request.text.strip():
        parts.add("text")
    if request.images:
        parts.add("images")
    if request.conversation:
        parts.add("conversation")
    return parts


@dataclass(frozen=True)
class StageStats:
    """One stage's share: requests it judged (``runs``), decided, and wall time of its calls."""

    name: str
    runs: int
    decided: int
    ms: float

    @property
    def ms_per_request(self) -> float | None:
        return self.ms / self.runs if self.runs else None


@dataclass(frozen=True)
class CascadeStats:
    """Cost of a cascade's checks so far.

    Attributes:
        requests: requests checked.
        stages: per-stage counts and time.
    """

    requests: int
    stages: tuple[StageStats, ...] = field(default_factory=tuple)

    @property
    def cost_ms(self) -> float:
        """Wall time spent in all stages."""
        return sum(s.ms for s in self.stages)

    @property
    def last_stage_only_ms(self) -> float | None:
        """Estimated time of running the last stage on every request (from its measured time per request)."""
        per = self.stages[-1].ms_per_request if self.stages else None
        return None if per is None else per * self.requests

    @property
    def saved(self) -> float | None:
        """Fraction of the last-stage-only time the cascade saved (negative: it cost more)."""
        full = self.last_stage_only_ms
        return None if not full else 1.0 - self.cost_ms / full

    @property
    def escalation_rate(self) -> float | None:
        """Share of requests that reached the last stage."""
        return self.stages[-1].runs / self.requests if self.requests and self.stages else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "stages": [{"name": s.name, "runs": s.runs, "decided": s.decided, "ms": round(s.ms, 3),
                        "ms_per_request": None if s.ms_per_request is None else round(s.ms_per_request, 3)}
                       for s in self.stages],
            "cost_ms": round(self.cost_ms, 3),
            "last_stage_only_ms": None if self.last_stage_only_ms is None else round(self.last_stage_only_ms, 3),
            "saved": self.saved,
            "escalation_rate": self.escalation_rate,
        }
