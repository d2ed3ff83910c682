"""Run evaluations: a guard over labelled items, or a (guarded) host VLM judged item by item.

Both runners stream one result row per item to ``results.jsonl`` as soon as it is produced (see
:mod:`visguard.eval.store`), resume from an earlier run in the same output directory, and finish
with ``summary.json``, ``report.md`` and PNG plots. The summary is computed from the result rows
alone, so it can always be recomputed from the JSONL file (:func:`summarize_guard_rows`,
:func:`summarize_model_rows`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError
from visguard.core.images import GuardImage, ImageLimits, load_images
from visguard.core.policy import Mode
from visguard.core.redact import redact_fields
from visguard.engine.checker import Checker
from visguard.eval.benchmarks import Benchmark, EvalItem
from visguard.eval.judges import Judge, JudgeCase, Judgment
from visguard.eval.metrics import guard_metrics, latency_stats, model_metrics, per_group
from visguard.eval.store import ResultStore, write_atomic


class Summary(Mapping[str, Any]):
    """The result of an evaluation: a read-only mapping with attribute access.

    ``summary["accuracy"]`` and ``summary.accuracy`` are the same value; :meth:`to_dict` gives a
    JSON-ready copy. Keys are documented in ``docs/eval.md``.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probe dunders before _data exists
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"summary has no {name!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data, default=str))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self._data, indent=indent, default=str)

    def __repr__(self) -> str:
        keys = ("kind", "n", "accuracy", "f1", "auroc", "asr", "rsr", "rr", "hr")
        shown = ", ".join(f"{k}={self._data[k]!r}" for k in keys if k in self._data)
        return f"Summary({shown})"


class _MemoryStore:
    """The :class:`ResultStore` interface without files (``out_dir=None``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.resumed = 0

    def __enter__(self) -> _MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def append(self, row: Mapping[str, Any]) -> None:
        if row["id"] not in self.done:
            self.rows.append(dict(row))
            self.done.add(row["id"])


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)


def _chunks(items: Sequence[EvalItem], size: int) -> Iterator[Sequence[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _checked_items(items: Iterable[EvalItem]) -> list[EvalItem]:
    out = list(items)
    seen: set[str] = set()
    for i, it in enumerate(out):
        if not isinstance(it, EvalItem):
            raise InputError(f"item {i} is a {type(it).__name__}, not an EvalItem")
        if it.id in seen:
            raise InputError(f"duplicate item id {it.id!r}: results are keyed by id")
        seen.add(it.id)
    return out


def _rows_for(rows: Iterable[Mapping[str, Any]], items: Sequence[EvalItem]) -> list[Mapping[str, Any]]:
    """The stored rows of ``items``, in item order (rows of other items are left out)."""
    by_id = {r["id"]: r for r in rows}
    return [by_id[it.id] for it in items if it.id in by_id]


# ---------------------------------------------------------------------------------------------- guard


def summarize_guard_rows(rows: Sequence[Mapping[str, Any]], **meta: Any) -> Summary:
    """The guard-evaluation summary of result rows (what ``summary.json`` holds).

    Args:
        rows: guard result rows (``label``, ``pred``, ``score``, ``category``, ``split``,
            ``latency_ms``, ``batch_size``).
        **meta: run settings copied into the summary (benchmark, split, model ...).
    """
    overall = guard_metrics(rows)
    guard_time_s = sum(float(r.get("latency_ms") or 0.0) / max(int(r.get("batch_size") or 1), 1) for r in rows) / 1000.0
    data: dict[str, Any] = {"kind": "guard", **meta, **overall}
    data["per_category"] = per_group(rows, "category", guard_metrics)
    data["per_split"] = per_group(rows, "split", guard_metrics)
    data["latency_ms"] = latency_stats(r.get("latency_ms") for r in rows)
    data["throughput_items_per_s"] = len(rows) / guard_time_s if guard_time_s > 0 else None
    if any("attribution" in r for r in rows):  # an explained run (Policy(explain=True), eval --explain)
        data["attribution"] = attribution_stats(rows)
    return Summary(data)


def attribution_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What drove the unsafe verdicts of an explained run (rows' ``attribution``, see
    :mod:`visguard.engine.attribution`): counts per summary and the share attributed to the
    combination only, over the guard's unsafe verdicts and over those on gold-unsafe items."""
    explained = [r for r in rows if r.get("attribution")]
    flagged = [r for r in explained if r.get("pred") == "unsafe"]
    hits = [r for r in flagged if r.get("label") == "unsafe"]
    kinds = ("combination only", "single image", "text")

    def share(group: Sequence[Mapping[str, Any]]) -> float | None:
        return sum(1 for r in group if r["attribution"] == "combination only") / len(group) if group else None

    return {
        "explained": len(explained),
        "unsafe_verdicts": len(flagged),
        "by_summary": {k: sum(1 for r in flagged if r["attribution"] == k) for k in kinds},
        "combination_only_share": share(flagged),
        "combination_only_share_gold_unsafe": share(hits),
    }


def evaluate_guard(
    guard: Checker,
    items: Iterable[EvalItem],
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    mode: Mode | None = None,
    benchmark: str = "",
    split: str | None = None,
    restart: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> Summary:
    """Run ``guard`` over labelled items and measure it against the gold labels.

    Items are checked in batches through ``guard.report_batch``. Each verdict becomes one result row
    (``unavailable`` verdicts included, with their error; an item whose images are refused at the
    image boundary is recorded as ``unavailable`` too). With ``out_dir``, rows stream to
    ``out_dir/results.jsonl`` and a rerun resumes; then ``summary.json``, ``report.md`` and plots
    are written.

    Args:
        guard: any :class:`~visguard.engine.checker.Checker` (a :class:`visguard.Guard`, a
            :class:`visguard.Cascade`).
        items: the labelled items (ids must be unique).
        out_dir: output directory (``None``: in memory only, nothing written).
        batch_size: requests per ``report_batch`` call.
        mode: guard mode override (``fast``, ``reason``, ``adaptive``; default: the policy's).
        benchmark / split: recorded in the summary and the run metadata.
        restart: discard earlier results in ``out_dir`` instead of resuming.
        progress: show a tqdm progress bar (stderr).
        plots: write PNG plots (needs matplotlib; skipped with a note when it is missing).

    Returns:
        The :class:`Summary` (accuracy, precision, recall, f1, fpr, auroc, auprc, confusion,
        per-category and per-split tables, latency percentiles, throughput, unavailable counts).

    Raises:
        InputError: bad items or settings; :class:`~visguard.eval.store.ResumeError` when
            ``out_dir`` holds another run's results.
    """
    if batch_size < 1:
        raise InputError("batch_size must be >= 1")
    items = _checked_items(items)
    mode = mode or guard.policy.mode
    meta = {
        "kind": "guard",
        "benchmark": benchmark,
        "split": split,
        **{key: guard.describe().get(key) for key in ("model", "backend", "format")},
        "mode": mode,
        "threshold": guard.policy.threshold,
        **({"explain": True} if getattr(guard.policy, "explain", False) else {}),
    }
    store: Any = ResultStore(out_dir, meta=meta, restart=restart) if out_dir is not None else _MemoryStore()
    with store:
        pending = [it for it in items if it.id not in store.done]
        bar = _progress(len(items), len(items) - len(pending), f"guard {benchmark or 'eval'}", progress)
        try:
            for batch in _chunks(pending, batch_size):
                for row in _guard_batch(guard, batch, mode):
                    store.append(row)
                bar.update(len(batch))
        finally:
            bar.close()
        rows = _rows_for(store.rows, items)
        summary = summarize_guard_rows(rows, **{k: v for k, v in meta.items() if k != "kind"}, resumed=store.resumed)
    if out_dir is not None:
        summary = _write_outputs(Path(out_dir), summary, rows, plots)
    return summary


def _guard_batch(guard: Checker, batch: Sequence[EvalItem], mode: Mode | None) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    requests, where = [], []
    for i, item in enumerate(batch):
        try:
            requests.append(guard.request([str(p) for p in item.images], item.text, item.response))
            where.append(i)
        except InputError as exc:  # refused at the image boundary: no verdict, never "safe"
            rows[i] = _guard_row(item, pred="unavailable", error=f"input refused: {exc}", mode=mode, model=guard.model_id)
    verdicts = guard.report_batch(requests, mode=mode) if requests else []  # recorded, never acted on
    for i, v in zip(where, verdicts, strict=True):
        explained = {} if v.attribution is None else {"attribution": v.attribution.summary,
                                                      "attribution_images": list(v.attribution.images)}
        rows[i] = _guard_row(
            batch[i],
            pred=v.label,
            score=v.score,
            pred_category=v.category,
            pred_sub_category=v.sub_category,
            latency_ms=v.latency_ms,
            batch_size=len(requests),
            error=v.error,
            mode=v.mode,
            model=v.model,
            raw=v.raw or None,
            **explained,
        )
    return [rows[i] for i in range(len(batch))]


def _guard_row(item: EvalItem, *, pred: str, **fields: Any) -> dict[str, Any]:
    row = item.record()
    row.update({"pred": pred, "score": None, "pred_category": None, "pred_sub_category": None,
                "latency_ms": None, "batch_size": None, "error": None})
    row.update(fields)
    row["correct"] = (pred == item.label) if pred in ("safe", "unsafe") else None
    return row


# ---------------------------------------------------------------------------------------------- models


def summarize_model_rows(rows: Sequence[Mapping[str, Any]], *, extras: Iterable[str] = (), **meta: Any) -> Summary:
    """The model-evaluation summary of result rows (what ``summary.json`` holds).

    Args:
        rows: model result rows (``label``, ``judgment``, ``host_error``, ``host_ms``, ...).
        extras: benchmark-specific metrics (see :func:`visguard.eval.metrics.model_metrics`).
        **meta: run settings copied into the summary.
    """
    extras = tuple(extras)

    def metrics(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return model_metrics(group, extras)

    data: dict[str, Any] = {"kind": "model", **meta, **metrics(rows)}
    data["per_category"] = per_group(rows, "category", metrics)
    data["per_split"] = per_group(rows, "split", metrics)
    if any("guard_blocked" in r for r in rows):
        data["guard_blocked"] = sum(1 for r in rows if r.get("guard_blocked"))
        data["guard_blocked_by_stage"] = {
            stage: sum(1 for r in rows if r.get("guard_blocked") and r.get("guard_stage") == stage)
            for stage in ("input", "output")
        }
    data["latency_ms"] = latency_stats(r.get("host_ms") for r in rows if not r.get("host_error"))
    data["judge_latency_ms"] = latency_stats(r.get("judge_ms") for r in rows)
    return Summary(data)


def evaluate_model(
    host: Any,
    items: Iterable[EvalItem],
    judge: Judge,
    *,
    guard: Checker | None = None,
    benchmark: Benchmark | None = None,
    split: str | None = None,
    out_dir: str | Path | None = None,
    judge_batch_size: int = 8,
    limits: ImageLimits | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    restart: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> Summary:
    """The paper's protocol: run a host VLM (bare, or wrapped by ``guard``) and judge each answer.

    Every item's images pass the image boundary (:func:`visguard.core.images.load_images`), the host
    answers the benchmark's prompt, and ``judge`` labels the answer. A host failure is recorded on
    the row (``host_error``) and the item is not judged; a failed judgement is recorded as such.
    Neither stops the run.

    Args:
        host: a :class:`visguard.hosting.hosts.Host`, or anything :func:`visguard.hosting.hosts.resolve_host` takes.
        items: the benchmark items (ids must be unique).
        judge: the response judge.
        guard: any :class:`~visguard.engine.checker.Checker` (a Guard, a Cascade); the host is then called
            through a :class:`~visguard.hosting.guarded.GuardedModel` (``guard.wrap(host)``)
            (a policy with ``on_error="raise"`` is run as ``"block"``: the run records the block).
        benchmark: the benchmark (its prompt and its own metrics); ``None``: item text, ASR/RR.
        split: recorded in the summary and run metadata.
        out_dir: output directory (``None``: in memory only).
        judge_batch_size: responses judged per judge call.
        limits: image-boundary limits (default: the guard's, else :class:`ImageLimits()`).
        gen_kwargs: extra keyword arguments for the host's ``generate``.
        restart / progress / plots: as in :func:`evaluate_guard`.

    Returns:
        The :class:`Summary`: ``asr``, ``rsr``, ``rr``, ``hr`` (percent of judged responses to
        unsafe items, summing to 100), ``refusal_rate`` (safe items), benchmark-specific rates,
        per-category and per-split tables, host latency percentiles, failure counts.
    """
    from visguard.hosting.guarded import GuardedModel
    from visguard.hosting.hosts import resolve_host

    if judge_batch_size < 1:
        raise InputError("judge_batch_size must be >= 1")
    items = _checked_items(items)
    bare = resolve_host(host)
    target: Any = bare  # the host, or the guarded model around it
    if guard is not None:
        if not isinstance(guard, Checker):
            raise InputError(f"{type(guard).__name__} is not a visguard Checker; pass a visguard.Guard or Cascade")
        if guard.policy.on_error == "raise":  # documented: an unavailable check is recorded as a block
            guard = guard.with_policy(on_error="block")
        target = GuardedModel(guard, bare)
    limits = limits or (guard.policy.limits if guard is not None else ImageLimits())
    prompt: Callable[[EvalItem], str] = benchmark.prompt if benchmark is not None else (lambda it: it.text)
    meta = {
        "kind": "model",
        "benchmark": benchmark.name if benchmark is not None else "",
        "split": split,
        "model": getattr(bare, "model_id", "") or type(bare).__name__,
        "guard": guard.model_id if guard is not None else None,
        **{f"judge_{k}" if k != "judge" else k: v for k, v in judge.describe().items()},
    }
    store: Any = ResultStore(out_dir, meta=meta, restart=restart) if out_dir is not None else _MemoryStore()
    with store:
        pending = [it for it in items if it.id not in store.done]
        bar = _progress(len(items), len(items) - len(pending), f"model {meta['benchmark'] or 'eval'}", progress)
        try:
            for batch in _chunks(pending, judge_batch_size):
                answered = [_answer(target, item, prompt(item), limits, gen_kwargs or {}) for item in batch]
                cases = [JudgeCase(item, images, text) for item, images, text, _, _, _ in answered if text is not None]
                start = time.perf_counter()
                judgments = iter(_judge_safely(judge, cases)) if cases else iter(())
                judge_ms = (time.perf_counter() - start) * 1000.0 / max(len(cases), 1)
                for item, _, response, err, host_ms, extra in answered:
                    row = item.record()
                    row.update({"prompt": prompt(item), "response": response, "host_error": err, "host_ms": host_ms})
                    row.update(extra)
                    if response is not None:  # answered (err is None): judged, in order
                        row["judgment"] = next(judgments).to_dict()
                        row["judge_ms"] = judge_ms
                    else:
                        row["judgment"] = None
                        row["judge_ms"] = None
                    store.append(row)
                bar.update(len(batch))
        finally:
            bar.close()
        rows = _rows_for(store.rows, items)
        extras = benchmark.metrics if benchmark is not None else ()
        summary = summarize_model_rows(
            rows, extras=extras, **{k: v for k, v in meta.items() if k != "kind"}, headline=list(extras),
            resumed=store.resumed,
        )
    if out_dir is not None:
        summary = _write_outputs(Path(out_dir), summary, rows, plots)
    return summary


def _answer(
    target: Any, item: EvalItem, text: str, limits: ImageLimits, gen_kwargs: Mapping[str, Any]
) -> tuple[EvalItem, list[GuardImage], str | None, str | None, float | None, dict[str, Any]]:
    """(item, images, response, host_error, host_ms, extra row fields) for one item."""
    try:
        images = load_images([str(p) for p in item.images], limits)
    except InputError as exc:
        return item, [], None, f"input refused: {exc}", None, {}
    start = time.perf_counter()
    try:
        out = target.generate(images, text, **gen_kwargs)
    except Exception as exc:  # noqa: BLE001 - one failed host call is recorded, the run goes on
        return item, images, None, f"{type(exc).__name__}: {exc}", (time.perf_counter() - start) * 1000.0, {}
    host_ms = (time.perf_counter() - start) * 1000.0
    response, extra = _response_text(out)
    if not isinstance(response, str):
        return item, images, None, f"host returned {type(out).__name__}, not text", host_ms, {}
    return item, images, response, None, host_ms, extra


def _response_text(out: Any) -> tuple[Any, dict[str, Any]]:
    """The text of an answer, plus the guard's decisions when it is a ``GuardedResult``.

    A guarded call's text is what the user would see: the host's answer, or the refusal that
    replaced it; that is what the judge labels.
    """
    if isinstance(out, str):
        return out, {}
    text = getattr(out, "text", None)
    extra: dict[str, Any] = {}
    for name in ("blocked", "flagged", "reason", "stage"):
        value = getattr(out, name, None)
        if value is None or isinstance(value, bool | str):
            extra[f"guard_{name}"] = value
    for name in ("input_verdict", "output_verdict"):
        verdict = getattr(out, name, None)
        if verdict is not None and hasattr(verdict, "label"):
            extra[f"guard_{name}"] = {"label": verdict.label, "score": verdict.score, "error": verdict.error,
                                      "category": verdict.category}
    timings = getattr(out, "timings", None)
    for name in ("pre_check_ms", "post_check_ms"):
        if getattr(timings, name, None) is not None:
            extra[f"guard_{name}"] = getattr(timings, name)
    return text, extra


def _judge_safely(judge: Judge, cases: Sequence[JudgeCase]) -> list[Judgment]:
    """Judge a batch; a judge that raises (a bug) yields failed judgements instead of a crash."""
    try:
        out = judge.judge_batch(cases)
        if len(out) != len(cases):
            raise RuntimeError(f"judge returned {len(out)} judgements for {len(cases)} cases")
        return list(out)
    except Exception as exc:  # noqa: BLE001 - recorded as "judge failed", never a crash
        return [Judgment.failed(f"judge error: {type(exc).__name__}: {exc}", judge=judge.name) for _ in cases]


# ---------------------------------------------------------------------------------------------- outputs


def _write_outputs(out_dir: Path, summary: Summary, rows: Sequence[Mapping[str, Any]], plots: bool) -> Summary:
    from visguard.eval.report import render_markdown, write_plots

    files = {"results": str(out_dir / "results.jsonl"), "summary": str(out_dir / "summary.json"),
             "report": str(out_dir / "report.md")}
    plot_files: list[str] = []
    plot_note = None
    if plots:
        plot_files, plot_note = write_plots(out_dir / "plots", summary, rows)
    files["plots"] = plot_files  # type: ignore[assignment]
    data = dict(summary)
    data["files"] = files
    if plot_note:
        data["plots_note"] = plot_note
    summary = Summary(redact_fields(data))  # run metadata may name URLs with credentials
    write_atomic(out_dir / "summary.json", summary.to_json() + "\n")
    write_atomic(out_dir / "report.md", render_markdown(summary, out_dir))
    return summary
