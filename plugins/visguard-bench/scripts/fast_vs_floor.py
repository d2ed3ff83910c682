"""A lone caller's fast check on fresh images against its physical floor (issue 26).

On a guard checkpoint (``--guard``: any directory ``Guard.from_pretrained`` loads, e.g. the demo
guard, which the bench never built), with the ``visguard bench`` machinery (``LatencyBench``), it
times in turns, each call on two PNG images never seen before:

- the floor: ``backend.forward_floor`` (the processor, then one forward over the request's own
  tokens after the cached static prefix; given decoded images);
- ``guard.check_input(pngs, text)``: the whole public call from PNG bytes (decoding included);
- ``guard.check(request)`` on an already decoded request;
- ``backend.score([prompt])``: the backend alone.

Prints p50 ratios to the floor (and the process-CPU-time ratio of ``check_input``) as one JSON line.

Usage: python plugins/visguard-bench/scripts/fast_vs_floor.py --guard DIR [--repeats 80] [--runs 3]
"""

from __future__ import annotations

import argparse
import json


def one_run(guard_dir: str, repeats: int) -> dict[str, float]:
    """One run: a new bench guard on ``guard_dir``, each kind of call ``repeats`` times in turns."""
    import statistics

    from visguard_bench import latency as bench

    b = bench.LatencyBench("default", model=guard_dir, threads=1)
    m = repeats + 1
    floor_prompts = [b._prompt(b.images.take(2)) for _ in range(m)]
    inputs = [b.images.take(2) for _ in range(m)]
    score_prompts = [b._prompt(b.images.take(2)) for _ in range(m)]
    requests = [b.guard.request(b.images.take(2), bench.TEXT) for _ in range(m)]
    (floor, fast, score, check), cpu = bench._interleaved([
        lambda i: b.floor_call(floor_prompts[i]),
        lambda i: b.guard.check_input(inputs[i], bench.TEXT),
        lambda i: b.backend.score([score_prompts[i]]),
        lambda i: b.guard.check(requests[i]),
    ], repeats)
    b.guard.close()
    p50 = statistics.median
    return {
        "floor_p50_ms": round(p50(floor), 2),
        "check_input_over_floor": round(p50(fast) / p50(floor), 3),
        "check_input_over_floor_cpu": round(statistics.fmean(cpu[1]) / statistics.fmean(cpu[0]), 3),
        "check_decoded_over_floor": round(p50(check) / p50(floor), 3),
        "backend_score_over_floor": round(p50(score) / p50(floor), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guard", required=True, help="guard directory (e.g. `visguard demo --print-guard-path`)")
    parser.add_argument("--repeats", type=int, default=80, help="interleaved calls of each kind per run")
    parser.add_argument("--runs", type=int, default=3, help="independent runs (a new guard each)")
    args = parser.parse_args()
    for run in range(args.runs):
        print(json.dumps({"run": run + 1, **one_run(args.guard, args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
