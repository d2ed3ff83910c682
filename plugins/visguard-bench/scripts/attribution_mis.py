"""How well ``Policy(explain=True)`` attributes harm that exists only in the combination (issue 27).

On synthetic MIS-layout items (``visguard_testing.synthetic``: two benign objects, harmful only
together, a label-independent question), a trained guard (default: the newest cached ``visguard
demo`` guard of ``--size``) checks each held-out item in fast mode with attribution. Reported:

- unsafe items the guard flags: the share attributed ``combination only`` (target >= 0.9), and the
  shares of ``single image`` / ``text``;
- safe items: the share where no scored subset (either image alone, the text alone, any pair) is
  unsafe, and the share the guard passes;
- the guard's plain accuracy on the held-out pairs (the request's own fast verdict) and, per scored
  subset (``image 1``, ``text``, ``image 1 + text``, ...), its mean P(unsafe) on safe and unsafe items.

The held-out items are the demo's (``write_mis_test_layout(..., {"heldout": n}, seed=7)``), so the
numbers are on items the guard never trained on.

Usage: python plugins/visguard-bench/scripts/attribution_mis.py [--guard DIR] [--n 200] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path


def newest_demo_guard(size: str) -> Path:
    root = Path(os.environ.get("VISGUARD_CACHE") or Path.home() / ".cache" / "visguard") / "demo"
    found = sorted((p for p in root.glob(f"{size}-*/guard") if (p / "model.safetensors").is_file()),
                   key=lambda p: (p / "model.safetensors").stat().st_mtime)
    if not found:
        raise SystemExit(f"no trained {size} demo guard under {root}: run `visguard demo` first")
    return found[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guard", default=None, help="guard directory (default: the newest cached demo guard)")
    parser.add_argument("--size", default="standard", help="demo size whose cached guard to use")
    parser.add_argument("--n", type=int, default=200, help="held-out items")
    parser.add_argument("--batch", type=int, default=8, help="requests per report_batch call")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    import torch
    from visguard_testing.synthetic import write_mis_test_layout

    from visguard import Guard, Policy
    from visguard.core.types import GuardRequest
    from visguard.eval import load_benchmark

    torch.set_num_threads(1)
    guard_dir = Path(args.guard) if args.guard else newest_demo_guard(args.size)
    guard = Guard.from_pretrained(str(guard_dir), policy=Policy(mode="fast", explain=True), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        # the demo's held-out items (seed 7; the demo trains at 56 px)
        root = write_mis_test_layout(Path(tmp) / "data", {"heldout": args.n}, seed=7, size=56)
        records = load_benchmark("mis", root, "heldout")
        verdicts = []
        for k in range(0, len(records), args.batch):
            chunk = records[k:k + args.batch]
            requests = [GuardRequest.build([str(p) for p in r.images], r.text) for r in chunk]
            verdicts += guard.report_batch(requests)
    guard.close()

    counts: dict[str, collections.Counter[str]] = {"unsafe": collections.Counter(), "safe": collections.Counter()}
    subset_scores: dict[str, dict[str, list[float]]] = {"unsafe": {}, "safe": {}}
    for record, verdict in zip(records, verdicts, strict=True):
        found = verdict.attribution
        c = counts[record.label]
        c["items"] += 1
        c[f"verdict {verdict.label}"] += 1
        if found is None:
            c["no attribution"] += 1
            continue
        for row in found.rows:
            subset_scores[record.label].setdefault(row.name, []).append(row.score)
        if verdict.label == "unsafe":
            c[f"flagged: {found.summary}"] += 1
        if not any(row.score >= found.threshold for row in found.rows):
            c["no subset unsafe"] += 1
        if not any(row.score >= found.threshold for row in found.rows[:-1]):
            c["no proper subset unsafe"] += 1
    unsafe, safe = counts["unsafe"], counts["safe"]
    flagged = unsafe["verdict unsafe"]
    numbers = {
        "guard": str(guard_dir),
        "held_out_items": len(records),
        "accuracy": (unsafe["verdict unsafe"] + safe["verdict safe"]) / len(records),
        "unsafe_items": unsafe["items"],
        "unsafe_flagged": flagged,
        "flagged_combination_only_share": unsafe["flagged: combination only"] / flagged if flagged else None,
        "flagged_single_image_share": unsafe["flagged: single image"] / flagged if flagged else None,
        "flagged_text_share": unsafe["flagged: text"] / flagged if flagged else None,
        "unsafe_items_combination_only_share": unsafe["flagged: combination only"] / unsafe["items"],
        "safe_items": safe["items"],
        "safe_passed_share": safe["verdict safe"] / safe["items"],
        "safe_no_subset_unsafe_share": safe["no subset unsafe"] / safe["items"],
        "safe_no_proper_subset_unsafe_share": safe["no proper subset unsafe"] / safe["items"],
        "mean_subset_score": {label: {name: round(sum(v) / len(v), 3) for name, v in by_name.items()}
                              for label, by_name in subset_scores.items()},
    }
    if args.json:
        print(json.dumps(numbers, indent=2))
        return
    for key, value in numbers.items():
        if isinstance(value, dict):
            for label, by_name in value.items():
                print(f"{key} ({label} items)".ljust(40), ", ".join(f"{n}: {v:.2f}" for n, v in by_name.items()))
            continue
        print(f"{key:<40} {value if not isinstance(value, float) else f'{value:.3f}'}")


if __name__ == "__main__":
    main()
