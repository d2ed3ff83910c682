"""Evaluate a guard on a local copy of the MIS test set (arXiv 2501.18533) in its published layout.

    python examples/evaluate_mis.py [MIS_ROOT [SPLIT]]

MIS_ROOT holds mis_<split>.json and <split>_image/<n>/object{1,2}.png (default data/mis_test,
split hard). The guard is $VISGUARD_EXAMPLE_GUARD (default Tuwhy/Qwen2-VL-7B-MIRage). The same run
from the command line:

    visguard eval -B mis -d data/mis_test -s hard -m Tuwhy/Qwen2-VL-7B-MIRage

Results stream to OUT/results.jsonl (a rerun resumes); OUT also gets summary.json, report.md and
plots (ROC, confusion matrix, per category, latency).
"""

import os
import sys

from visguard import Guard
from visguard.eval import evaluate_guard, load_benchmark

root = sys.argv[1] if len(sys.argv) > 1 else "data/mis_test"
split = sys.argv[2] if len(sys.argv) > 2 else "hard"
out = os.environ.get("VISGUARD_EXAMPLE_OUT", f"runs/examples/eval-mis-{split}")

guard = Guard.from_pretrained(os.environ.get("VISGUARD_EXAMPLE_GUARD", "Tuwhy/Qwen2-VL-7B-MIRage"))
items = load_benchmark("mis", root, split)
summary = evaluate_guard(guard, items, out_dir=out, benchmark="mis", split=split, mode="fast")
print(f"{summary['n']} items: accuracy {summary['accuracy']:.3f}, F1 {summary['f1']:.3f}, "
      f"AUROC {summary['auroc']:.3f}, unavailable {summary['unavailable']}")
print(f"latency p50 {summary['latency_ms']['p50']:.0f} ms, p95 {summary['latency_ms']['p95']:.0f} ms")
print(f"report: {summary['files']['report']}")
