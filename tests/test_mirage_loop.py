"""The paper's loop on CPU (examples/mirage_loop.py at test size): safety-CoT data in the MIS train
layout -> `visguard train --objective mirage` on a tiny Qwen2-VL -> the trained model as a host
(`visguard eval` MIS protocol, refusal judge) next to the untrained base, and as a guard through the
`mirage` format on a held-out hard split.

At this size (240 items, 2 epochs, ~100 s of training) the model learns to write the safety answer,
refusals included, but not yet to tell the image pairs apart: the guard metrics are reported, and
what is asserted is the loop itself and what training reliably changes.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("visguard_train")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mirage_loop.py"


@pytest.mark.slow
def test_mirage_loop_closed_end_to_end(tmp_path, monkeypatch, capsys, one_torch_thread):
    for key, value in {"VISGUARD_EXAMPLE_OUT": str(tmp_path / "loop"), "VISGUARD_LOOP_TRAIN": "240",
                       "VISGUARD_LOOP_EPOCHS": "2", "VISGUARD_LOOP_HELDOUT": "40",
                       "VISGUARD_LOOP_HOST_ITEMS": "6", "VISGUARD_LOOP_REASON_TOKENS": "160"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    results = json.loads(out.strip().splitlines()[-1])
    print("\nmirage loop:", json.dumps(results))
    loop = tmp_path / "loop"

    # The trained model names its format; visguard eval ran it through `mirage`.
    assert json.loads((loop / "mirage" / "visguard.json").read_text()) == {"format": "mirage", "format_kwargs": {}}
    for mode in ("fast", "reason"):
        meta = json.loads((loop / f"guard_{mode}" / "summary.json").read_text())
        assert meta["format"] == "mirage" and meta["mode"] == mode
        g = results[f"guard_{mode}"]
        assert g["n"] == 40 and g["unavailable"] == 0 and 0.0 <= g["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (loop / "guard_reason" / "results.jsonl").read_text().splitlines()]
    assert all(r["raw"] for r in rows)  # reason mode: the trained model's own answers

    # As a host: the MIS protocol's four rates, every answer judged.
    for name in ("host_trained", "host_base"):
        h = results[name]
        assert h["n"] == h["n_judged"] == 6 and h["judge_failed"] == 0
        assert h["asr"] + h["rsr"] + h["rr"] + h["hr"] == pytest.approx(100.0)
    # The random base never writes a refusal; the trained model has learnt the safe answers' shape.
    trained = [json.loads(line) for line in (loop / "host_trained" / "results.jsonl").read_text().splitlines()]
    assert results["host_base"]["asr"] == 100.0
    assert any(r["response"].startswith("Image 1 shows") for r in trained)
