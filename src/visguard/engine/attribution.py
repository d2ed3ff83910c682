"""Cross-image attribution: which images, or the text, carry a request's harm.

With ``Policy(explain=True)`` a :class:`~visguard.engine.guard.Guard` scores, besides the request,
subsets of its parts, each asked as a request of its own (the same response and conversation):

- each image alone (without the text) and the text alone;
- 2 or 3 images: every non-empty subset of the images and the text;
- 4 or more: each part alone, the request without each one part (leave-one-out), the request.

All of them are the format's fast score plans, executed as ONE backend ``score`` call (one batch:
the prompts share the format's cached static prefix), together with the request's own fast plan,
inside :meth:`~visguard.engine.backend.Backend.prompts_sharing_prefixes`: a backend that can (the
transformers backend with its KV cache on) runs the subsets that begin like no other first and
continues the rest from their cached prefixes (``[image 1, text]`` and ``[image 1]`` from the
request's ``[image 1, image 2, ...]``), so a subset computes its tail only and its images' pixels
are not encoded again; other backends (vLLM, OpenAI-compatible servers) run the one call as any other;
in ``fast`` mode that plan is the verdict itself, in ``reason`` / ``adaptive`` mode the verdict comes
from the mode's own check and the attribution is a second, fast pass. :func:`summarize` reads the
rows with the policy's threshold into :class:`~visguard.core.types.Attribution`: ``single image``
(an image alone is unsafe), ``text`` (the text alone is), ``combination only`` (the request is
unsafe, no part alone is) or ``none`` (the request is not unsafe).

A format that cannot score subsets refuses with :class:`~visguard.core.errors.UnsupportedRequestError`
saying why: one without fast scores (generated-fast or reason-only formats), a backend without
scores, or a fixed image count (one-image formats such as ShieldGemma or opennsfw cannot see an
image-less subset). A :class:`~visguard.engine.cascade.Cascade` does not attribute: a stage's guard
with an explaining policy attributes its own verdicts (in ``Verdict.stages``); ``visguard check
--explain`` refuses a cascade.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from visguard.core.errors import BackendError, InputError, UnsupportedRequestError
from visguard.core.policy import Mode
from visguard.core.types import Attribution, AttributionRow, AttributionSummary, GuardRequest, Verdict
from visguard.engine.checker import checked_requests
from visguard.engine.format import CheckPlan

if TYPE_CHECKING:  # pragma: no cover
    from visguard.engine.guard import Guard

#: up to this many images every subset is scored; beyond it, leave-one-out
ALL_SUBSETS_UP_TO = 3

Subset = tuple[tuple[int, ...], bool]


def subsets(n_images: int, has_text: bool) -> list[Subset]:
    """The ``(image indices, includes_text)`` subsets scored for a request, smallest first, the
    whole request last (see the module docstring); without text no subset includes it."""
    parts: list[int | str] = [*range(n_images), *(["text"] if has_text else [])]
    if not parts:
        return []
    chosen: list[tuple[int | str, ...]]
    if n_images <= ALL_SUBSETS_UP_TO:
        chosen = [c for k in range(1, len(parts) + 1) for c in itertools.combinations(parts, k)]
    else:
        singles = [(p,) for p in parts]
        leave_one_out = [tuple(q for q in parts if q != p) for p in parts]
        chosen = singles + sorted(leave_one_out, key=lambda c: [str(q) for q in c]) + [tuple(parts)]
    out: list[Subset] = []
    for combo in chosen:
        item = (tuple(p for p in combo if isinstance(p, int)), "text" in combo)
        if item not in out:
            out.append(item)
    out.sort(key=lambda s: (len(s[0]) + s[1], s[0], s[1]))
    return out


def subset_request(request: GuardRequest, subset: tuple[int, ...], includes_text: bool) -> GuardRequest:
    """``request`` keeping only the images ``subset`` names and, where ``includes_text``, its text."""
    return request.model_copy(update={"images": tuple(request.images[i] for i in subset),
                                      "text": request.text if includes_text else ""})


def summarize(rows: Sequence[AttributionRow], threshold: float) -> Attribution:
    """Read scored subsets (the whole request last) into an :class:`Attribution`.

    The whole request below ``threshold``: ``none``. Else the highest-scoring single part at or
    above it names the driver (an image alone: ``single image``; the text alone: ``text``); no
    single part unsafe: ``combination only``, naming the smallest unsafe subset's images.
    """
    rows = tuple(rows)
    if not rows:
        return Attribution(rows=(), summary="none", threshold=threshold, detail="nothing to attribute (no images, no text)")
    whole = rows[-1]
    unsafe = [r for r in rows if r.score >= threshold]
    summary: AttributionSummary
    if whole.score < threshold:
        summary, images = "none", ()
        detail = f"not unsafe: the request scores {whole.score:.2f} < {threshold:g}"
        if unsafe:
            top = max(unsafe, key=lambda r: r.score)
            detail += f" (though {top.name} alone scores {top.score:.2f})"
        return Attribution(rows=rows, summary=summary, images=images, threshold=threshold, detail=detail)
    singles = [r for r in unsafe if len(r.subset) + r.includes_text == 1]
    if singles and len(rows) > 1:
        top = max(singles, key=lambda r: r.score)
        summary = "text" if top.includes_text else "single image"
        others = [r.name for r in singles if r is not top]
        detail = f"{top.name} alone is unsafe ({top.score:.2f})" + (f"; also alone: {', '.join(others)}" if others else "")
        return Attribution(rows=rows, summary=summary, images=top.subset, threshold=threshold, detail=detail)
    if len(rows) == 1:  # one part only: it is the request
        summary = "text" if whole.includes_text else "single image"
        return Attribution(rows=rows, summary=summary, images=whole.subset, threshold=threshold,
                           detail=f"{whole.name} (the whole request) is unsafe ({whole.score:.2f})")
    size = min(len(r.subset) + r.includes_text for r in unsafe)
    smallest = max((r for r in unsafe if len(r.subset) + r.includes_text == size), key=lambda r: r.score)
    detail = (f"only the combination is unsafe: {smallest.name} ({smallest.score:.2f}); "
              "no image alone and not the text alone")
    return Attribution(rows=rows, summary="combination only", images=smallest.subset, threshold=threshold,
                       detail=detail)


def _refuse(guard: Guard, why: str) -> UnsupportedRequestError:
    name = guard.format.name or type(guard.format).__name__
    return UnsupportedRequestError(f"format {name!r} cannot attribute a verdict to its images and text (explain): {why}")


def _plans(guard: Guard, request: GuardRequest) -> tuple[list[Subset], list[CheckPlan]]:
    """The subsets of ``request`` and their fast score plans (the whole request's last)."""
    caps = guard.format.capabilities
    if not caps.score or "fast" not in caps.modes or caps.fast_tokens:
        raise _refuse(guard, "it has no fast P(unsafe) score to compare subsets by")
    if not caps.cross_image or caps.max_images == 1:
        raise _refuse(guard, "it judges one image per request on its own (a fixed image count), so it cannot "
                             "score subsets of a request's parts against their combination")
    if not guard.backend.supports_scores:
        raise _refuse(guard, f"backend {guard.backend.name!r} cannot score verdict tokens")
    chosen = subsets(len(request.images), bool(request.text.strip()))
    plans: list[CheckPlan] = []
    for subset, with_text in chosen:
        sub = subset_request(request, subset, with_text)
        try:
            planned = guard._plan(sub, "fast")
        except UnsupportedRequestError as exc:
            part = AttributionRow(subset=subset, includes_text=with_text, score=0.0).name
            raise _refuse(guard, f"it cannot judge the subset {part!r} alone ({exc})") from exc
        if isinstance(planned, Verdict):
            raise BackendError(planned.error or "the format could not plan a subset")
        if planned[0].read != "score":
            raise _refuse(guard, "its fast check generates text instead of scoring the verdict token")
        plans.append(planned[0])
    return chosen, plans


def _run(guard: Guard, items: list[list[CheckPlan]], mode: Any) -> list[Any]:
    """A batch of explained checks: every plan of every item in ONE ``_execute`` (one backend score call)."""
    flat = [plan for item in items for plan in item]
    with guard.backend.prompts_sharing_prefixes():  # subsets continue from one another's prefixes
        results = guard._execute(flat, "fast", fast_stage=True)
    out: list[Any] = []
    k = 0
    for item in items:
        out.append(results[k:k + len(item)])
        k += len(item)
    return out


def report_explained(guard: Guard, requests: Sequence[GuardRequest], mode: Mode | None = None) -> list[Verdict]:
    """:meth:`Guard.report_batch` with :attr:`Verdict.attribution` on each verdict (``guard.policy.explain``).

    Raises:
        UnsupportedRequestError: the format (or backend) cannot score the subsets, saying why.
        InputError: as :meth:`Guard.report_batch`.
    """
    requests = checked_requests(requests)
    if not requests:
        return []
    mode = mode or guard.policy.mode or "fast"
    for request in requests:
        guard.format.check_request(request, mode)
    planned = [_plans(guard, r) for r in requests]
    # reason / adaptive: the verdict is that mode's own check; the attribution a second, fast pass
    verdicts = None if mode == "fast" else guard.with_policy(explain=False).report_batch(requests, mode=mode)
    start = time.perf_counter()
    timeout = guard.policy.timeout_s
    runner = _Runner(guard)
    futures = guard.batcher.submit([plans for _, plans in planned], (runner, "fast"))
    concurrent.futures.wait(futures, timeout=timeout)
    elapsed = (time.perf_counter() - start) * 1000.0
    late = [f for f in futures if not f.done()]
    if late:
        guard.batcher.abandon(late)
    out: list[Verdict] = []
    for i, (request, (chosen, _), future) in enumerate(zip(requests, planned, futures, strict=True)):
        error: str | None = None
        results: list[Any] = []
        if future in late:
            error = f"guard timed out after {timeout:g} s (queueing included)"
        elif isinstance(future.exception(), InputError):
            raise future.exception()  # type: ignore[misc]
        elif (exc := future.exception()) is not None:
            error = str(exc) if isinstance(exc, BackendError) else f"guard batch failed: {type(exc).__name__}: {exc}"
        else:
            results = future.result()
            for r in results:
                if isinstance(r, InputError):
                    raise r
            bad = next((r for r in results if r.score is None), None)
            if bad is not None:
                error = bad.error or "a subset has no score"
        if verdicts is not None:
            verdict = verdicts[i]
        elif error is not None:
            verdict = guard._unavailable(request, mode, error)
        else:
            verdict = results[-1]
        attribution = None
        if error is None:
            rows = [AttributionRow(subset=s, includes_text=t, score=float(r.score))
                    for (s, t), r in zip(chosen, results, strict=True)]
            attribution = summarize(rows, guard.policy.threshold)
        latency = verdict.latency_ms + elapsed if verdicts is not None else elapsed
        out.append(verdict.model_copy(update={"attribution": attribution, "latency_ms": latency}))
    return out


class _Runner:
    """The batcher's runner for explained checks of one guard (equal for the same guard, so the
    explained checks of concurrent callers share a batch)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def __call__(self, items: list[list[CheckPlan]], mode: Any) -> list[Any]:
        return _run(self.guard, items, mode)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Runner) and other.guard is self.guard

    def __hash__(self) -> int:
        return id(self.guard)


def explaining(checker: Any) -> Any:
    """``checker`` with ``explain`` on (a :class:`~visguard.engine.guard.Guard` sharing its model).

    Raises:
        UnsupportedRequestError: ``checker`` is not one guard (a cascade: explain one of its stages'
            guards, e.g. the last, ``cascade.stages[-1].guards[-1]``).
    """
    from visguard.engine.guard import Guard  # the guard module imports this one

    if not isinstance(checker, Guard):
        raise UnsupportedRequestError(
            f"attribution (explain) runs on one guard, not a {type(checker).__name__}: explain one of its "
            "stages' guards (e.g. the last stage's)")
    return checker if checker.policy.explain else checker.with_policy(explain=True)
