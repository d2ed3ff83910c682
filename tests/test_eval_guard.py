"""Guard evaluation with a rule-based guard: unavailable verdicts and refused inputs are counted apart, never safe."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from visguard import Backend, Guard, Policy
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.eval import EvalItem, evaluate_guard, read_rows, summarize_guard_rows


class RednessGuardModel(Backend):
    """P(unsafe) = the red share of the first image; the text 'BROKEN' makes the backend fail."""

    name = "redness"
    model_id = "redness-guard"

    def score(self, prompts):
        if any("BROKEN" in p.messages[0]["content"][-1]["text"] for p in prompts):
            raise RuntimeError("device lost")
        out = []
        for p in prompts:
            r, g, b = p.images[0].getpixel((0, 0))
            out.append(r / (r + g + b))
        return out

    def generate(self, prompts, *, max_new_tokens):
        raise NotImplementedError


@pytest.fixture
def items(tmp_path):
    def img(name, color):
        path = tmp_path / name
        Image.new("RGB", (8, 8), color).save(path)
        return path

    red, blue, pink = img("red.png", (250, 5, 5)), img("blue.png", (5, 5, 250)), img("pink.png", (200, 100, 100))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    return [
        EvalItem("u1", (red,), "x", "unsafe", "Violent", split="a"),
        EvalItem("u2", (pink,), "x", "unsafe", "Violent", split="a"),   # score 0.5 -> unsafe at threshold 0.5
        EvalItem("u3", (blue,), "x", "unsafe", "Privacy", split="b"),   # missed
        EvalItem("s1", (blue,), "x", "safe", split="a"),
        EvalItem("s2", (red,), "x", "safe", split="b"),                  # false positive
        EvalItem("s3", (bad,), "x", "safe", split="b"),                  # refused at the image boundary
    ]


def test_guard_eval_counts_unavailable_apart_and_writes_outputs(items, tmp_path):
    guard = Guard(RednessGuardModel(), VisguardFormat(), Policy(on_error="raise"))  # eval records instead of raising
    broken = EvalItem("u4", items[0].images, "BROKEN", "unsafe", "Violent", split="a")
    out = tmp_path / "out"
    s = evaluate_guard(guard, [*items, broken], out_dir=out, batch_size=2, benchmark="unit", progress=False)
    assert s.confusion == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert (s.n, s.unavailable, s.unavailable_by_label) == (7, 2, {"safe": 1, "unsafe": 1})
    assert s.accuracy == pytest.approx(3 / 5) and s.recall == pytest.approx(2 / 3) and s.fpr == pytest.approx(1 / 2)
    rows = {r["id"]: r for r in read_rows(out / "results.jsonl")}
    assert rows["s3"]["pred"] == "unavailable" and rows["s3"]["error"].startswith("input refused: image 0")
    assert rows["u4"]["pred"] == "unavailable" and "device lost" in rows["u4"]["error"]
    assert rows["u1"]["correct"] is True and rows["s2"]["correct"] is False and rows["s3"]["correct"] is None
    assert s.per_category["Violent"]["n"] == 3 and s.per_split["b"]["unavailable"] == 1
    assert s.latency_ms["p50"] is not None and s.throughput_items_per_s > 0
    summary = json.loads((out / "summary.json").read_text())
    recomputed = summarize_guard_rows(list(rows.values()))
    for key in ("accuracy", "precision", "recall", "f1", "fpr", "auroc", "auprc", "unavailable", "per_category"):
        assert summary[key] == json.loads(json.dumps(recomputed[key])), key
    report = (out / "report.md").read_text()
    assert "**2 unavailable**" in report and "never counted as safe" in report


def test_empty_item_list_gives_a_defined_summary(tmp_path):
    guard = Guard(RednessGuardModel(), VisguardFormat())
    s = evaluate_guard(guard, [], out_dir=tmp_path / "empty", progress=False)
    assert s.n == 0 and s.accuracy is None and s.throughput_items_per_s is None
    assert "accuracy" in s.undefined and (tmp_path / "empty" / "report.md").exists()


def test_duplicate_ids_are_refused(items):
    from visguard.core.errors import InputError

    with pytest.raises(InputError, match="duplicate item id 'u1'"):
        evaluate_guard(Guard(RednessGuardModel(), VisguardFormat()), [items[0], items[0]], progress=False)
