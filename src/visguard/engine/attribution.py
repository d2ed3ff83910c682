"""Cross-image attribution: which images, or the text, carry a request's harm.

With ``Policy(explain=True)`` a :class:`~visguard.engine.guard.Guard` scores, besides the request,
the same question over subsets of the request's IMAGES, each asked with the request's text (the same
response and conversation) as a request of its own, and the text alone:

- the text alone (no image), when the request has text;
- each image alone, with the request's text;
- 2 or 3 images: every pair of images, with the text;
- 4 or more: the request without each one image (leave-one-out), with the text;
- the whole request, last.

A request without text has the image subsets only (no text-alone row). Images without the request's
text are not scored: "image 1 with the question 0.05, image 2 with it 0.08, both 0.97" is what
tells an operator that only the combination carries the harm. For 2 images that is 4 prompts, 8 for
3, 10 for 4 (:func:`subsets`).

All of them are the format's fast score plans, executed as ONE backend ``score`` call (one batch:
the prompts share the format's cached static prefix), together with the request's own fast plan,
inside :meth:`~visguard.engine.backend.Backend.prompts_sharing_prefixes`: a backend that can (the
transformers backend with its KV cache on) runs the subsets that begin like no other first and
continues the rest from their cached prefixes (``[image 1, text]`` from the request's ``[image 1,
image 2, ..., text]``), so a subset computes its tail only and its images' pixels are not encoded
again, where that saves more than the extra forward costs; other backends (vLLM, OpenAI-compatible
servers) run the one call as any other;
in ``fast`` mode that plan is the verdict itself, in ``reason`` / ``adaptive`` mode the verdict comes
from the mode's own check and the attribution is a second, fast pass. :func:`summarize` reads the
rows with the policy's threshold into :class:`~visguard.core.types.Attribution`: ``single image``
(one image with the request's text is unsafe), ``text`` (the text alone is), ``combination only``
(the request is unsafe, no image with the text and not the text alone) or ``none`` (the request is
not unsafe).

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

#: up to this many images every pair of images is scored; beyond it, leave-one-out
ALL_PAIRS_UP_TO = 3

Subset = tuple[tuple[int, ...], bool]


def subsets(n_images: int, has_text: bool) -> list[Subset]:
    """The ``(image indices, includes_text)`` subsets scored for a request, fewest images first, the
    whole request last (see the module docstring): the text alone ``((), True)``, then subsets of
    the images each with the request's text (``includes_text`` is ``has_text`` on every image row)."""
    if n_images == 0:
        return [((), True)] if has_text else []
    everything = tuple(range(n_images))
    chosen: set[tuple[int, ...]] = {(i,) for i in everything} | {everything}
    if n_images <= ALL_PAIRS_UP_TO:
        chosen |= set(itertools.combinations(everything, 2))
    else:
        chosen |= {tuple(j for j in everything if j != i) for i in everything}
    out: list[Subset] = [((), True)] if has_text else []
    out += [(images, has_text) for images in sorted(chosen, key=lambda c: (len(c), c))]
    return out


def subset_request(request: GuardRequest, subset: tuple[int, ...], includes_text: bool) -> GuardRequest:
    """``request`` keeping only the images ``subset`` names and, where ``includes_text``, its text."""
    return request.model_copy(update={"images": tuple(request.images[i] for i in subset),
                                      "text": request.text if includes_text else ""})


def _part(row: AttributionRow) -> str:
    """A row as the summary's detail names it: ``image 1 with the request's text``, ``the text alone``."""
    if not row.subset:
        return "the text alone"
    images = " + ".join(f"image {i}" for i in row.subset)
    return f"{images} with the request's text" if row.includes_text else images


def summarize(rows: Sequence[AttributionRow], threshold: float) -> Attribution:
    """Read scored subsets (:func:`subsets`' rows, the whole request last) into an :class:`Attribution`.

    The whole request below ``threshold``: ``none``. Else the highest-scoring single part at or
    above it names the driver (one image with the request's text: ``single image``; the text alone:
    ``text``); no single part unsafe: ``combination only``, naming the unsafe subset of the fewest
    images.
    """
    rows = tuple(rows)
    if not rows:
        return Attribution(rows=(), summary="none", threshold=threshold, detail="nothing to attribute (no images, no text)")
    whole = rows[-1]
    unsafe = [r for r in rows if r.score >= threshold]
    summary: AttributionSummary
    if whole.score < threshold:
        detail = f"not unsafe: the request scores {whole.score:.2f} < {threshold:g}"
        if unsafe:
            top = max(unsafe, key=lambda r: r.score)
            detail += f" (though {_part(top)} scores {top.score:.2f})"
        return Attribution(rows=rows, summary="none", images=(), threshold=threshold, detail=detail)
    # a single part: the text alone, or one image with the request's text (for a one-image request,
    # that row is the whole request)
    singles = [r for r in unsafe if len(r.subset) <= 1]
    if singles:
        top = max(singles, key=lambda r: r.score)
        summary = "text" if not top.subset else "single image"
        others = [_part(r) for r in singles if r is not top]
        detail = (f"{_part(top)} is unsafe ({top.score:.2f})" + (" (the whole request)" if top is whole else "")
                  + (f"; also: {', '.join(others)}" if others else ""))
        return Attribution(rows=rows, summary=summary, images=top.subset, threshold=threshold, detail=detail)
    size = min(len(r.subset) for r in unsafe)
    smallest = max((r for r in unsafe if len(r.subset) == size), key=lambda r: r.score)
    detail = (f"only the combination is unsafe: {_part(smallest)} ({smallest.score:.2f}); "
              "no single image" + (" with the request's text and not the text alone" if whole.includes_text else ""))
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
