"""plugins/visguard-bench/scripts/adaptive_cost.py: each mode's accuracy and per-request cost in one run.

On a tiny random-weight Qwen2-VL run through the ``mirage`` format (its ``visguard.json``), a short
reasoning budget, and a few MIS-test-layout items: every item is checked once in each mode on a guard
of its own, the counts follow the verdicts, and adaptive reasons about exactly the items whose fast
score falls in the band (the same fast prompt on the same model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "adaptive_cost.py"


def _script():
    spec = importlib.util.spec_from_file_location("adaptive_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_count_unavailable_as_wrong():
    m = _script()._metrics([("unsafe", "unsafe"), ("safe", "unsafe"), ("unsafe", "safe"), ("unavailable", "safe")])
    assert m == {"accuracy": 0.25, "recall": 0.5, "fpr": 0.5, "unavailable": 1}


@pytest.mark.slow
def test_adaptive_cost_on_a_tiny_mirage_guard(tmp_path, qwen_path, one_torch_thread):
    from visguard_testing.synthetic import write_mis_test_layout

    from visguard import Guard, Policy

    guard_dir = tmp_path / "guard"
    shutil.copytree(qwen_path, guard_dir)
    (guard_dir / "visguard.json").write_text(json.dumps({"format": "mirage"}))
    root = write_mis_test_layout(tmp_path / "mis", {"hard": 3}, seed=3)
    # the band holds every score: adaptive must reason about all 3 items
    args = argparse.Namespace(guard=str(guard_dir), data=root, split="hard", limit=3, band="0,1",
                              max_new_tokens=8, threads=1, device="cpu")
    out = _script().measure(args)
    assert out["n"] == 3 and out["band"] == [0.0, 1.0]
    assert set(out["modes"]) == {"fast", "reason", "adaptive"}
    for row in out["modes"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["wall_s"] > 0 and row["cpu_s"] >= 0
    assert out["modes"]["reason"]["cost_vs_reason"] == 1.0
    assert out["modes"]["adaptive"]["reasoned"] == 3
    # a band no score can fall in: adaptive is its fast stage alone, and gives fast mode's verdicts
    args.band = "2,2"
    with pytest.raises(ValueError):  # the Policy refuses a band outside [0, 1]
        _script().measure(args)
    args.band = "0.5,0.5"
    out = _script().measure(args)
    fast = Guard.from_pretrained(str(guard_dir), policy=Policy(mode="fast"), device="cpu")
    try:
        from visguard.datasets import read_mis_test

        records = read_mis_test(root / "mis_hard.json", split="hard")
        scores = [fast.report_batch([fast.request([p.read_bytes() for p in r.images], r.text)])[0].score
                  for r in records]
    finally:
        fast.close()
    assert out["modes"]["adaptive"]["reasoned"] == sum(s == 0.5 for s in scores)
    if out["modes"]["adaptive"]["reasoned"] == 0:  # (a score of exactly 0.5 would be reasoned about)
        assert out["modes"]["adaptive"]["accuracy"] == out["modes"]["fast"]["accuracy"]
