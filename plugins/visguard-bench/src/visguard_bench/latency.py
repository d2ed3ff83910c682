"""What a guard check costs against its physical floor, measured in one process (:class:`LatencyBench`).

The measurements behind ``visguard bench`` (:mod:`visguard_bench.cli`) and the pytest-benchmark
suite (``plugins/visguard-bench/benchmarks``). :class:`LatencyBench` builds (or loads) a guard
model, runs every latency measurement on it in this process and returns a report (p50 / p95 / p99,
mean, throughput, tokens, the machine and the model) with the ratios at its top level:

- ``fast_over_floor``: a fast pre-check, as a user calls it (image bytes in, verdict out) / the
  model's forward over the request's own tokens (images + request + question) on the cached
  static prefix, processor included (the backend's public ``forward_floor``).
- ``post_reuse_over_cold``: a post-check continuing from its pre-check's cache / a cold
  post-check (no cache: the whole prompt computed, as before caching), response much shorter than
  the image tokens; ``post_reuse_over_prefix_only`` (in ``ratios``) compares with a post-check
  that has the static prefix but not its pre-check.
- ``adaptive_over_reason``: mean cost of adaptive mode / always-reason, on a set where fast is
  confident on 80% of the items (the band is set from the fast scores to make it so).
- ``batch_speedup``: 8 checks one after another / the same 8 from 8 threads (micro-batched).
- ``guarded_over_host``: guarded end to end (parallel pre-check, host, post-check with reuse) /
  the unguarded host, with host generation >= 4x a check (the guard passes everything here, so
  no call is cut short by a block).
- ``stream_ttft_over_host``: time to the first released token of a guarded stream / of the host's.
- ``peak_rss_ratio_8_images``: peak RSS of a process running a fast check at 8 images / of one
  running the model's own forward on the same prompt (each in a fresh child process: the only
  measurement outside this process, since a process's peak RSS never goes down).

The default size makes model compute dominate (width 384, 6 layers, a 32k vocabulary, two 224 px
images); ``tiny`` is a seconds-long smoke run whose ratios are fixed overheads, not caching (its
report says so). Every request uses images not seen before, so no check is served by an earlier
identical one. Models are built locally by ``visguard_testing.checkpoints`` (random weights, real
architecture); ``model=`` measures a checkpoint of your own. The backend is read only through its
public diagnostics (``Backend.diagnostics``, ``TransformersBackend.forward_floor``), and torch's
process-wide thread count is changed only inside :func:`torch_threads`, which restores it.
"""

from __future__ import annotations

import io
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click

TEXT = "How can I use the object in the first image on the thing in the second image?"


@dataclass(frozen=True)
class BenchSize:
    """Model and run size of one ``--size`` choice."""

    hidden_size: int
    num_layers: int
    vocab_size: int | None
    max_pixels: int | None
    image_px: int
    repeats: int
    scaling_repeats: int
    images: tuple[int, ...] = (1, 2, 4, 8)
    responses: tuple[int, ...] = (16, 64, 256, 1024)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    #: what the report must say about this size's numbers ("" when they stand as measured)
    note: str = ""


TINY_NOTE = (
    "size tiny is a smoke run: at width 64 the model's compute is a small share of each call, so fixed "
    "per-call overheads (processor, tokenizer, Python, thread hand-offs) dominate every timing, and the ratios "
    "say nothing about caching or batching (a cached check may even time slower than an uncached one). "
    "For numbers that mean something run the default size."
)


SIZES: dict[str, BenchSize] = {
    # seconds: a smoke run (CI); model compute does not dominate at this size
    "tiny": BenchSize(64, 2, None, None, 64, repeats=2, scaling_repeats=1, images=(1, 2), responses=(16,), batches=(1, 2),
                      note=TINY_NOTE),
    "small": BenchSize(128, 4, 8000, 112 * 112, 112, repeats=10, scaling_repeats=3),
    # the model: model compute dominates
    "default": BenchSize(384, 6, 32000, 224 * 224, 224, repeats=15, scaling_repeats=3),
}

RATIO_KEYS = (
    "fast_over_floor",
    "post_reuse_over_cold",
    "adaptive_over_reason",
    "batch_speedup",
    "guarded_over_host",
    "stream_ttft_over_host",
    "peak_rss_ratio_8_images",
)


# ---------------------------------------------------------------------- process state
@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's count (also on error).

    torch's thread count is process-wide: left changed, it changes every later computation's float
    summation order (a training test once lost 25 points of accuracy to a count a bench run left
    behind). ``None`` leaves the count as it is.
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ---------------------------------------------------------------------- statistics
def summarize(samples_ms: list[float], *, tokens: float | None = None, items: int = 1,
              cpu_ms: list[float] | None = None) -> dict[str, Any]:
    """p50 / p95 / p99 / mean (ms), throughput (items per second), tokens and mean CPU time of timings."""
    xs = sorted(samples_ms)

    def pct(q: float) -> float:
        if len(xs) == 1:
            return xs[0]
        k = (len(xs) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    mean = statistics.fmean(xs)
    return {
        "n": len(xs),
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": mean,
        "throughput_per_s": items * 1000.0 / mean if mean > 0 else float("inf"),
        "tokens": tokens,
        "cpu_mean_ms": statistics.fmean(cpu_ms) if cpu_ms else None,
    }


def _timed(fn: Callable[[int], Any], repeats: int, warmup: int = 1) -> list[float]:
    return _interleaved([fn], repeats, warmup=warmup)[0][0]


def _interleaved(fns: list[Callable[[int], Any]], repeats: int, *, warmup: int = 1,
                 setup: Callable[[int], Any] | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """Wall and process-CPU milliseconds of each function, run in turns (``f0(i), f1(i), f0(i+1) ...``).

    Taking turns gives every function the same share of whatever else the machine runs, so ratios
    between them hold on a shared machine; process CPU time (all threads of this process) does not
    count time lost to other processes. ``setup(i)`` runs untimed before each round.
    """
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for i in range(-warmup, repeats):
        if setup is not None:
            setup(i)
        for k, fn in enumerate(fns):
            wall, cpu = time.perf_counter(), time.process_time()
            fn(i)
            if i >= 0:
                walls[k].append((time.perf_counter() - wall) * 1000.0)
                cpus[k].append((time.process_time() - cpu) * 1000.0)
    return walls, cpus


# ---------------------------------------------------------------------- inputs
class _Images:
    """Distinct PNG images (noise + a colour per index), so no request repeats an earlier one."""

    def __init__(self, px: int) -> None:
        self.px = px
        self._n = 0

    def take(self, k: int) -> list[bytes]:
        import numpy as np
        from PIL import Image

        out = []
        for _ in range(k):
            rng = np.random.default_rng(self._n)
            self._n += 1
            arr = rng.integers(0, 255, (self.px, self.px, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


def _response_of(tokenizer: Any, n_tokens: int) -> str:
    """An English-looking response of about ``n_tokens`` guard tokens."""
    sentence = "First take the tool from the first picture, then hold it firmly and move it slowly toward the door. "
    text = sentence
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += sentence
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- the bench
class LatencyBench:
    """Every measurement of ``visguard bench`` on one guard model, in this process.

    Args:
        size: a :data:`SIZES` key.
        model: a guard checkpoint to measure instead of building one.
        threads: torch intra-op threads for :meth:`run` (default: the process's count); set when
            the run starts and restored when it ends, so the process keeps its own count. The
            ``measure_*`` methods called on their own run with the caller's count.
        progress: called with a short label before each measurement.
    """

    def __init__(self, size: str = "default", *, model: str | None = None, threads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        from visguard import Guard, Policy
        from visguard.default_plugins.transformers_backend import TransformersBackend
        from visguard.default_plugins.transformers_host import TransformersHost
        from visguard.engine.guard import resolve_format

        if size not in SIZES:
            raise click.BadParameter(f"unknown size {size!r}; one of {', '.join(SIZES)}", param_hint="--size")
        self.size_name, self.size = size, SIZES[size]
        self.progress = progress or (lambda label: None)
        self.threads = threads
        if model is None:
            try:
                from visguard_testing.checkpoints import cached_tiny_checkpoint
            except ImportError as exc:  # pragma: no cover - the dev install has it
                raise click.ClickException("building bench models needs visguard-testing "
                                           "(pip install -e plugins/visguard-testing), or pass --model") from exc
            self.progress("building the model")
            s = self.size
            model = str(cached_tiny_checkpoint("qwen2_vl", hidden_size=s.hidden_size, num_layers=s.num_layers,
                                               vocab_size=s.vocab_size, max_pixels=s.max_pixels))
        self.model_path = model
        self.backend = TransformersBackend(model, device="cpu")
        hf_model, processor = self.backend.model, self.backend.processor
        self.cold_backend = TransformersBackend.from_objects(hf_model, processor, model_id=model, kv_cache_mb=0)
        self.policy = Policy(max_new_tokens=32)
        self.guard = Guard(self.backend, resolve_format(model), self.policy)
        self.cold_guard = Guard(self.cold_backend, self.guard.format, self.policy)
        self.host = TransformersHost.from_objects(hf_model, processor, model_id=model)
        self.images = _Images(self.size.image_px)
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def _prompt(self, pngs: list[bytes], text: str = TEXT, response: str | None = None) -> Any:
        req = self.guard.request(pngs, text, response)
        return self.guard.format.build(req, self.policy, mode="fast", special_tokens=self.backend.special_tokens)

    def _tokens(self, prompt: Any) -> int:
        return int(self.backend.diagnostics(prompt).prompt_tokens or 0)

    def floor_call(self, prompt: Any) -> None:
        """The floor: processor + one forward over the request's own tokens after the cached static prefix."""
        self.backend.forward_floor(prompt)

    def bare_forward(self, prompt: Any) -> None:
        """Processor + the model's own forward over the whole prompt, last logits only, no cache."""
        self.backend.forward_floor(prompt, static_prefix=False)

    # ------------------------------------------------------------------ measurements
    def measure_fast(self) -> None:
        self.progress("fast check vs its floor")
        n = self.size.repeats
        probe = self.backend.diagnostics(self._prompt(self.images.take(2)))
        total, static = int(probe.prompt_tokens or 0), int(probe.static_prefix_tokens or 0)
        m = n + 1
        floor_prompts = [self._prompt(self.images.take(2)) for _ in range(m)]
        inputs = [self.images.take(2) for _ in range(m)]
        cold_inputs = [self.images.take(2) for _ in range(m)]
        bare_prompts = [self._prompt(self.images.take(2)) for _ in range(m)]
        (floor, fast, cold, bare), cpu = _interleaved([
            lambda i: self.floor_call(floor_prompts[i]),
            lambda i: self.guard.check_input(inputs[i], TEXT),
            lambda i: self.cold_guard.check_input(cold_inputs[i], TEXT),
            lambda i: self.bare_forward(bare_prompts[i]),
        ], n)
        self.results["prompt_tokens"] = {"total": total, "static_prefix": static, "request": total - static}
        self.results["timings"].update({
            "floor: processor + forward over the request's tokens on the cached prefix": summarize(floor, tokens=total - static, cpu_ms=cpu[0]),
            "fast check (guard.check_input)": summarize(fast, tokens=total - static, cpu_ms=cpu[1]),
            "fast check, caching off": summarize(cold, tokens=total, cpu_ms=cpu[2]),
            "processor + forward over the whole prompt (last logits)": summarize(bare, tokens=total, cpu_ms=cpu[3]),
        })
        self.results["ratios"]["fast_over_floor"] = _p50(fast) / _p50(floor)
        self.results["ratios"]["fast_over_floor_cpu"] = statistics.fmean(cpu[1]) / statistics.fmean(cpu[0])
        self.results["ratios"]["fast_uncached_over_floor"] = _p50(cold) / _p50(floor)

    def measure_post(self) -> None:
        self.progress("post-check: reuse vs cold")
        n = self.size.repeats
        tok = self.backend.tokenizer
        image_tokens = self._image_tokens(2)
        response = _response_of(tok, max(8, image_tokens // 8))  # image tokens >= 4x response tokens
        m = n + 1
        pre = [self.images.take(2) for _ in range(m)]
        cold_inputs = [self.images.take(2) for _ in range(m)]
        prefix_inputs = [self.images.take(2) for _ in range(m)]
        (reused, cold, prefix_only), cpu = _interleaved([
            lambda i: self.guard.check_output(pre[i], TEXT, response),
            lambda i: self.cold_guard.check_output(cold_inputs[i], TEXT, response),
            lambda i: self.guard.check_output(prefix_inputs[i], TEXT, response),
        ], n, setup=lambda i: self.guard.check_input(pre[i], TEXT))  # the pre-check, untimed, as a guarded call runs it
        resp_tokens = len(tok(response, add_special_tokens=False)["input_ids"])
        self.results["post"] = {"image_tokens": image_tokens, "response_tokens": resp_tokens}
        self.results["timings"].update({
            f"post-check after its pre-check ({resp_tokens}-token response)": summarize(reused, cpu_ms=cpu[0]),
            "post-check cold (no cache: the prompt computed from scratch)": summarize(cold, cpu_ms=cpu[1]),
            "post-check without its pre-check (static prefix cached)": summarize(prefix_only, cpu_ms=cpu[2]),
        })
        self.results["ratios"]["post_reuse_over_cold"] = _p50(reused) / _p50(cold)
        self.results["ratios"]["post_reuse_over_cold_cpu"] = statistics.fmean(cpu[0]) / statistics.fmean(cpu[1])
        self.results["ratios"]["post_reuse_over_prefix_only"] = _p50(reused) / _p50(prefix_only)

    def measure_adaptive(self, items: int = 10) -> None:
        self.progress("adaptive vs reason")
        reqs = [self.guard.request(self.images.take(2), f"{TEXT} ({k})") for k in range(items)]
        # fast scores from the uncached guard (the same numbers; the cached guard has not seen these)
        scores = [v.score for v in self.cold_guard.check_batch(reqs, mode="fast")]
        # the band leaves 80% of the items confident: the 20% nearest the threshold are "unsure"
        t = self.policy.threshold
        dist = sorted(abs(x - t) for x in scores)
        unsure_n = max(1, items // 5)
        width = (dist[unsure_n - 1] + dist[unsure_n]) / 2 if unsure_n < items else dist[-1]
        band = (max(0.0, t - width), min(1.0, t + width))
        guard = self.guard.with_policy(adaptive_band=band)
        confident = [k for k in range(items) if not guard.policy.in_band(scores[k])]
        adaptive, reason, labels = [], [], {}
        for mode, out in (("adaptive", adaptive), ("reason", reason)):
            for k, req in enumerate(reqs):
                start = time.perf_counter()
                labels[(mode, k)] = guard.check(req, mode=mode).label
                out.append((time.perf_counter() - start) * 1000.0)
        same = [k for k in confident if labels[("adaptive", k)] == labels[("reason", k)]]
        self.results["adaptive"] = {
            "items": items, "band": band, "confident": len(confident),
            "same_decision_as_reason_on_confident": len(same),
            "reason_unavailable": sum(labels[("reason", k)] == "unavailable" for k in range(items)),
            "reason_max_new_tokens": self.policy.max_new_tokens,
        }
        self.results["timings"].update({
            "adaptive check (mean cost per item)": summarize(adaptive),
            f"reason check ({self.policy.max_new_tokens} new tokens)": summarize(reason),
        })
        self.results["ratios"]["adaptive_over_reason"] = statistics.fmean(adaptive) / statistics.fmean(reason)

    def measure_batch(self, k: int = 8) -> None:
        self.progress(f"{k} concurrent vs {k} sequential")
        reps = max(2, self.size.repeats // 3)

        def sequential(_: int) -> None:
            for pngs in [self.images.take(2) for _ in range(k)]:
                self.guard.check_input(pngs, TEXT)

        def concurrent(_: int) -> None:
            inputs = [self.images.take(2) for _ in range(k)]
            threads = [threading.Thread(target=self.guard.check_input, args=(p, TEXT)) for p in inputs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        (seq, conc), _ = _interleaved([sequential, concurrent], reps)
        self.results["timings"].update({
            f"{k} checks one after another": summarize(seq, items=k),
            f"{k} checks from {k} threads (micro-batched)": summarize(conc, items=k),
        })
        self.results["ratios"]["batch_speedup"] = _p50(seq) / _p50(conc)

    def measure_guarded(self) -> None:
        self.progress("guarded vs unguarded host")
        n = max(3, self.size.repeats // 3)
        check_ms = self.results["timings"]["fast check (guard.check_input)"]["p50_ms"]
        per_token = self._decode_ms_per_token()
        new_tokens = int(min(512, max(16, math.ceil(6.0 * check_ms / per_token))))  # margin: generation >= 4x a check
        gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        # A guard that passes everything (threshold 1): random weights would block some requests,
        # and a blocked request cancels the host early, which is not the cost of guarding.
        passing = self.guard.with_policy(threshold=1.0)
        guarded = passing.wrap(self.host, pre_check="parallel")
        blocked: list[bool] = []
        host_in = [self.images.take(2) for _ in range(n + 1)]
        from visguard.core.images import load_images

        guarded_in = [self.images.take(2) for _ in range(n + 1)]
        (host_ms, guarded_ms), _ = _interleaved([
            lambda i: self.host.generate(load_images(host_in[i]), TEXT, **gen),
            lambda i: blocked.append(guarded.generate(guarded_in[i], TEXT, **gen).blocked),
        ], n)
        streamer = passing.wrap(self.host, pre_check="sequential")
        host_ttft, guarded_ttft = [], []
        for _ in range(n):
            imgs = load_images(self.images.take(2))
            host_ttft.append(_first_piece_ms(lambda imgs=imgs: self.host.stream(imgs, TEXT, **gen)))
            pngs = self.images.take(2)
            guarded_ttft.append(_first_piece_ms(lambda pngs=pngs: streamer.stream(pngs, TEXT, **gen)))
        self.results["host"] = {"new_tokens": new_tokens, "decode_ms_per_token": per_token,
                                "generation_over_check": _p50(host_ms) / check_ms, "guarded_calls_blocked": sum(blocked)}
        self.results["timings"].update({
            f"host alone ({new_tokens} new tokens)": summarize(host_ms, tokens=new_tokens),
            "guarded: parallel pre-check + host + post-check": summarize(guarded_ms, tokens=new_tokens),
            "host stream: first token": summarize(host_ttft),
            "guarded stream: first released token": summarize(guarded_ttft),
        })
        self.results["ratios"]["guarded_over_host"] = _p50(guarded_ms) / _p50(host_ms)
        self.results["ratios"]["stream_ttft_over_host"] = _p50(guarded_ttft) / _p50(host_ttft)

    def _decode_ms_per_token(self) -> float:
        from visguard.core.images import load_images

        imgs = load_images(self.images.take(2))
        short = _timed(lambda i: self.host.generate(imgs, TEXT, max_new_tokens=2, min_new_tokens=2), 2)
        long = _timed(lambda i: self.host.generate(imgs, TEXT, max_new_tokens=18, min_new_tokens=18), 2)
        return max(0.01, (_p50(long) - _p50(short)) / 16)

    def measure_memory(self, k: int = 8) -> None:
        """Peak RSS of a fast check at ``k`` images vs the model's own forward, each in a fresh process.

        A process's peak RSS only grows, so each case runs in a child process that loads the model
        and runs its case once (after one warm-up at the same size); ``ru_maxrss`` is its peak.
        """
        self.progress(f"peak RSS at {k} images (two child processes)")
        peaks = {case: _child_peak_mb(self.model_path, self.size.image_px, k, case) for case in ("forward", "check")}
        self.results["memory"] = {
            "images": k, "tokens": self._tokens(self._prompt(self.images.take(k))),
            "model_forward_peak_mb": peaks["forward"], "fast_check_peak_mb": peaks["check"],
            "kv_store_limit_mb": self.backend.diagnostics().cache_limit_bytes / (1 << 20),
        }
        self.results["ratios"]["peak_rss_ratio_8_images"] = peaks["check"] / peaks["forward"]

    def measure_scaling(self) -> None:
        s = self.size
        r = s.scaling_repeats
        rows: dict[str, list[dict[str, Any]]] = {"images": [], "response": [], "batch": []}
        for k in s.images:
            self.progress(f"scaling: {k} image(s)")
            inputs = [self.images.take(k) for _ in range(r + 1)]
            fast = _timed(lambda i, inputs=inputs: self.guard.check_input(inputs[i], TEXT), r)
            rows["images"].append({"images": k, "tokens": self._tokens(self._prompt(inputs[0])), "fast_p50_ms": _p50(fast)})
        tok = self.backend.tokenizer
        for n in s.responses:
            self.progress(f"scaling: {n}-token response")
            response = _response_of(tok, n)
            pre = [self.images.take(2) for _ in range(r + 1)]
            cold_in = [self.images.take(2) for _ in range(r + 1)]
            (reuse, cold), _ = _interleaved([
                lambda i, pre=pre, response=response: self.guard.check_output(pre[i], TEXT, response),
                lambda i, cold_in=cold_in, response=response: self.cold_guard.check_output(cold_in[i], TEXT, response),
            ], r, setup=lambda i, pre=pre: self.guard.check_input(pre[i], TEXT))
            rows["response"].append({"response_tokens": n, "post_reuse_p50_ms": _p50(reuse), "post_uncached_p50_ms": _p50(cold)})
        for b in s.batches:
            self.progress(f"scaling: batch of {b}")
            batches = [[self.guard.request(self.images.take(2), TEXT) for _ in range(b)] for _ in range(r + 1)]
            ms = _timed(lambda i, batches=batches: self.guard.check_batch(batches[i]), r)
            rows["batch"].append({"batch": b, "per_check_p50_ms": _p50(ms) / b, "batch_p50_ms": _p50(ms)})
        self.results["scaling"] = rows

    def _image_tokens(self, k: int) -> int:
        prompt = self._prompt(self.images.take(k))
        with_images, without = self._tokens(prompt), self._tokens(self._prompt([]))
        return with_images - without

    # ------------------------------------------------------------------ all
    def run(self, *, scaling: bool = True) -> dict[str, Any]:
        """Run every measurement with ``threads`` torch threads; returns the report (ratios also at its top level).

        The process's torch thread count is the caller's again when this returns or raises.
        """
        with torch_threads(self.threads):
            return self._run(scaling=scaling)

    def _run(self, *, scaling: bool) -> dict[str, Any]:
        import torch
        import transformers

        load_before = os.getloadavg()
        self.results = {"timings": {}, "ratios": {}}
        started = time.perf_counter()
        self.measure_fast()
        self.measure_post()
        self.measure_adaptive()
        self.measure_batch()
        self.measure_guarded()
        self.measure_memory()
        if scaling:
            self.measure_scaling()
        hf = self.backend.model
        text_cfg = hf.config.get_text_config()
        report: dict[str, Any] = {key: self.results["ratios"].get(key) for key in RATIO_KEYS}
        report.update({
            "size": self.size_name,
            "notes": [self.size.note] if self.size.note else [],
            "machine": {
                "platform": platform.platform(),
                "cpu": _cpu_name(),
                "cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": "cpu",
            },
            "model": {
                "path": self.model_path,
                "architecture": hf.config.model_type,
                "hidden_size": text_cfg.hidden_size,
                "num_layers": text_cfg.num_hidden_layers,
                "vocab_size": text_cfg.vocab_size,
                "parameters": sum(p.numel() for p in hf.parameters()),
                "image_px": self.size.image_px,
                "format": f"{self.guard.format.name} v{self.guard.format.version}",
            },
            "seconds": time.perf_counter() - started,
            **self.results,
        })
        return report


_CHILD = """
import io, resource, sys, numpy as np, torch
from PIL import Image
from visguard import Guard
model, px, k, case = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
def pngs(seed):
    out = []
    for j in range(k):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed * 100 + j).integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
guard = Guard.from_pretrained(model, device="cpu")
for seed in (1, 2):
    if case == "check":
        guard.check_input(pngs(seed), "How can I use the object in the first image on the thing in the second image?")
    else:
        prompt = guard.format.build(guard.request(pngs(seed), "How can I use the object in the first image on the thing in the second image?"),
                                    guard.policy, mode="fast", special_tokens=guard.backend.special_tokens)
        guard.backend.forward_floor(prompt, static_prefix=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _child_peak_mb(model: str, px: int, k: int, case: str) -> float:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CHILD, model, str(px), str(k), case], capture_output=True, text=True,
                         check=True, timeout=900)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def _first_piece_ms(open_stream: Callable[[], Iterator[str]]) -> float:
    start = time.perf_counter()
    stream = open_stream()
    first = None
    for piece in stream:
        if first is None and piece:
            first = (time.perf_counter() - start) * 1000.0
    return first if first is not None else (time.perf_counter() - start) * 1000.0


def _p50(xs: list[float]) -> float:
    return statistics.median(xs)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

