"""Reason mode's follow-up verdict with and without the generation's own key/value cache.

Measures, on the random-weight Qwen2-VL of ``visguard bench`` (``--size``, default: width 384, 6
layers, 32k vocabulary, two 224 px images) with the ``mirage`` format in reason mode:

- the whole reason check (generation + follow-up verdict), the transformers backend with its
  caches on vs ``kv_cache_mb=0``;
- the follow-up scoring forward alone, right after its generation, on both backends;
- tokens the follow-up forward computed and took from the cache.

Random weights write byte pieces that re-tokenise otherwise inside the follow-up prompt (reuse then
stops where the ids part), while a trained guard writes words. So, by default, the answer is made
of single digits (the checkpoint's ``suppress_tokens``), which re-tokenise exactly under the Qwen2
pre-tokenizer, and is exactly ``--answer-tokens`` long (``min_new_tokens``), like a MIRage answer of
that length; ``--raw-answers`` measures the random answers as they come.

The two backends share one model; the cases alternate round by round on images not seen before, so
a shared machine's load falls on both alike. Ratios are what to read; milliseconds are this machine's.

Usage: python plugins/visguard-bench/scripts/bench_followup_cache.py [--size default] [--answer-tokens 128] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="default", help="a visguard bench size: tiny, small, default")
    parser.add_argument("--answer-tokens", type=int, default=128, help="length of the guard's answer")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds per case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--raw-answers", action="store_true", help="leave the random answers as they come")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    args = parser.parse_args()

    from visguard_bench.latency import torch_threads

    with torch_threads(args.threads):  # restored when the run ends
        out = measure(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"size {args.size}, {args.threads} thread(s), answer {out['answer_tokens']} tokens, {args.rounds} rounds")
    print("| case | reason check p50 ms | follow-up forward p50 ms | follow-up tokens computed | reused |")
    print("|---|---:|---:|---:|---:|")
    for k in out["reason_check_ms"]:
        print(f"| {k} | {out['reason_check_ms'][k]} | {out['followup_forward_ms'][k]} | "
              f"{out['followup_tokens_computed'][k]} | {out['followup_tokens_reused'][k]} |")
    print(f"reuse / no cache: reason check {out['reason_check_reuse_over_no_cache']}, "
          f"follow-up forward {out['followup_reuse_over_no_cache']}")


def measure(args: argparse.Namespace) -> dict:
    """Run every round; returns the numbers ``main`` prints."""
    from visguard_bench.latency import SIZES, TEXT, _Images
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    from visguard import Guard, Policy
    from visguard.default_plugins.mirage_format import MirageFormat
    from visguard.default_plugins.transformers_backend import TransformersBackend

    s = SIZES[args.size]
    path = str(cached_tiny_checkpoint("qwen2_vl", hidden_size=s.hidden_size, num_layers=s.num_layers,
                                      vocab_size=s.vocab_size, max_pixels=s.max_pixels))
    warm = TransformersBackend(path, device="cpu")
    cold = TransformersBackend.from_objects(warm.model, warm.processor, model_id=path, kv_cache_mb=0)
    if not args.raw_answers:
        config = warm.model.generation_config
        digits = {i for t, i in warm.tokenizer.get_vocab().items() if len(t) == 1 and t.isascii() and t.isdigit()}
        config.suppress_tokens = [i for i in range(warm.model.config.get_text_config().vocab_size) if i not in digits]
        config.min_new_tokens = args.answer_tokens
    policy = Policy(mode="reason", max_new_tokens=args.answer_tokens)
    fmt = MirageFormat()
    guards = {"reuse": Guard(warm, fmt, policy), "no cache": Guard(cold, fmt, policy)}
    images = _Images(s.image_px)

    checks: dict[str, list[float]] = {k: [] for k in guards}
    followups: dict[str, list[float]] = {k: [] for k in guards}
    tokens: dict[str, list[tuple[int, int]]] = {k: [] for k in guards}
    answers: list[int] = []
    for round_ in range(args.rounds + 1):
        for name in (list(guards) if round_ % 2 else list(reversed(guards))):
            guard, backend = guards[name], guards[name].backend
            request = guard.request(images.take(2), TEXT)
            start = time.perf_counter()
            guard.check(request)
            check_s = time.perf_counter() - start
            # the follow-up alone: a fresh generation (kept in the store by the warm backend), then its score
            request = guard.request(images.take(2), TEXT)
            prompt = fmt.build(request, policy, mode="reason", special_tokens=backend.special_tokens)
            gen = backend.generate([prompt], max_new_tokens=args.answer_tokens)[0]
            followup = fmt.followup(request, policy, gen.text, special_tokens=backend.special_tokens)
            before = backend.diagnostics()
            start = time.perf_counter()
            backend.score([followup])
            followup_s = time.perf_counter() - start
            if round_ == 0:
                continue  # warm-up
            checks[name].append(check_s)
            followups[name].append(followup_s)
            after = backend.diagnostics()
            computed = after.computed_tokens - before.computed_tokens
            reused = after.reused_tokens - before.reused_tokens
            tokens[name].append((computed, reused) if name == "reuse" else (backend.diagnostics(followup).prompt_tokens, 0))
            if name == "reuse":
                answers.append(len(gen.token_spans))

    def ms(xs: list[float]) -> float:
        return round(1000 * statistics.median(xs), 1)

    out = {
        "size": args.size, "rounds": args.rounds, "threads": args.threads, "answer_tokens": statistics.median(answers),
        "raw_answers": args.raw_answers,
        "reason_check_ms": {k: ms(v) for k, v in checks.items()},
        "followup_forward_ms": {k: ms(v) for k, v in followups.items()},
        "followup_tokens_computed": {k: statistics.median(c for c, _ in v) for k, v in tokens.items()},
        "followup_tokens_reused": {k: statistics.median(r for _, r in v) for k, v in tokens.items()},
    }
    out["reason_check_reuse_over_no_cache"] = round(ms(checks["reuse"]) / ms(checks["no cache"]), 3)
    out["followup_reuse_over_no_cache"] = round(ms(followups["reuse"]) / ms(followups["no cache"]), 3)
    return out


if __name__ == "__main__":
    main()
