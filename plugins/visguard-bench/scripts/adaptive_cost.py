"""Accuracy and per-request cost of fast, reason and adaptive mode on one guard (issue 26).

A reasoning guard (e.g. the MIRage loop's distilled guard, ``examples/mirage_loop.py`` with
``VISGUARD_LOOP_DISTILL=1``) checks every held-out item of a MIS-test-layout split once in each mode,
one request at a time (a serving call, not an offline batch), the three modes taking turns item by
item (the order rotates) so a shared machine's load falls on all alike. Each mode runs on a guard of
its own (``Guard.from_pretrained`` three times): no mode finds another's cached prefix, answer or
images. Reported per mode: accuracy at the policy's threshold, recall, false-positive rate, the mean
wall seconds and process CPU seconds per request, and cost relative to reason mode (the ratio of the
means, measured in this one run). For adaptive also the share of requests whose fast score fell in
the policy's ``adaptive_band`` and so were reasoned about.

Why one request at a time: adaptive reasons only about the unsure requests; in an offline batch of 8
one unsure request makes the whole batch pay a generation (on a CPU, and on a GPU where decoding is
memory-bound, a batch of 8 decodes about as fast as one), so batched throughput hides what adaptive
saves a served request. ``visguard eval --mode adaptive`` reports that batched throughput.

Usage: python plugins/visguard-bench/scripts/adaptive_cost.py --guard DIR --data MIS_TEST_ROOT
       [--split hard] [--limit 200] [--band 0.2,0.8] [--max-new-tokens N] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

MODES = ("fast", "reason", "adaptive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guard", required=True, help="a guard directory (Guard.from_pretrained)")
    parser.add_argument("--data", required=True, type=Path, help="a MIS-test-layout root (mis_<split>.json)")
    parser.add_argument("--split", default="hard")
    parser.add_argument("--limit", type=int, default=200, help="items (default 200)")
    parser.add_argument("--band", default=None, help="adaptive_band LOW,HIGH (default: the Policy's)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="reasoning budget (default: the format's own; the mirage format's is 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    args = parser.parse_args()

    from visguard_bench.latency import torch_threads

    with torch_threads(args.threads):
        out = measure(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"guard {out['guard']}, {out['n']} items ({out['split']}), one request at a time, "
          f"{args.threads} thread(s), adaptive_band {out['band']}")
    print("| mode | accuracy | recall | FPR | wall s / request | CPU s / request | cost vs reason (wall) | (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        r = out["modes"][mode]
        print(f"| {mode} | {r['accuracy']} | {r['recall']} | {r['fpr']} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['cost_vs_reason']} | {r['cpu_cost_vs_reason']} |")
    print(f"adaptive reasoned about {out['modes']['adaptive']['reasoned']} of {out['n']} requests")


def measure(args: argparse.Namespace) -> dict:
    """Every item in every mode, in turns; returns what ``main`` prints."""
    from visguard import Guard, Policy
    from visguard.datasets import read_mis_test

    records = read_mis_test(args.data / f"mis_{args.split}.json", split=args.split)[: args.limit]
    band: dict = {} if args.band is None else {"adaptive_band": tuple(float(x) for x in args.band.split(","))}
    if args.max_new_tokens is not None:
        band["max_new_tokens"] = args.max_new_tokens
    policy = Policy(**band)
    guards = {m: Guard.from_pretrained(args.guard, policy=Policy(mode=m, **band), device=args.device) for m in MODES}
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    cpus: dict[str, list[float]] = {m: [] for m in MODES}
    preds: dict[str, list[tuple[str | None, str | None]]] = {m: [] for m in MODES}
    fast_scores: list[float | None] = []
    try:
        for i, rec in enumerate(records):
            order = MODES[i % 3:] + MODES[: i % 3]
            for mode in order:
                guard = guards[mode]
                request = guard.request([p.read_bytes() for p in rec.images], rec.text)
                t, c = time.perf_counter(), time.process_time()
                (verdict,) = guard.report_batch([request], mode=mode)
                walls[mode].append(time.perf_counter() - t)
                cpus[mode].append(time.process_time() - c)
                preds[mode].append((verdict.label, rec.label))
                if mode == "fast":
                    fast_scores.append(verdict.score)
    finally:
        for guard in guards.values():
            guard.close()
    reason_wall, reason_cpu = statistics.mean(walls["reason"]), statistics.mean(cpus["reason"])
    modes = {}
    for m in MODES:
        w, c = statistics.mean(walls[m]), statistics.mean(cpus[m])
        modes[m] = {**_metrics(preds[m]), "wall_s": round(w, 4), "cpu_s": round(c, 4),
                    "cost_vs_reason": round(w / reason_wall, 3), "cpu_cost_vs_reason": round(c / reason_cpu, 3)}
    # adaptive's fast stage is this same fast prompt on the same model: its score decides the escalation
    modes["adaptive"]["reasoned"] = sum(s is not None and policy.in_band(s) for s in fast_scores)
    return {"guard": args.guard, "split": args.split, "n": len(records), "band": list(policy.adaptive_band),
            "threads": args.threads, "modes": modes}


def _metrics(pairs: list[tuple[str | None, str | None]]) -> dict[str, float | int | None]:
    """Accuracy, recall and false-positive rate; an unavailable verdict counts as wrong."""
    tp = sum(p == "unsafe" and g == "unsafe" for p, g in pairs)
    fp = sum(p == "unsafe" and g == "safe" for p, g in pairs)
    pos, neg = sum(g == "unsafe" for _, g in pairs), sum(g == "safe" for _, g in pairs)
    return {"accuracy": round(sum(p == g for p, g in pairs) / len(pairs), 4),
            "recall": round(tp / pos, 4) if pos else None, "fpr": round(fp / neg, 4) if neg else None,
            "unavailable": sum(p not in ("safe", "unsafe") for p, _ in pairs)}


if __name__ == "__main__":
    main()
