"""`visguard eval` end to end with a real tiny guard checkpoint: summary == recomputation from the JSONL rows,
model evaluation through a real tiny host, and a SIGKILLed run that resumes to exactly N rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from visguard_testing.synthetic import write_mis_test_layout

from visguard import cli as cli_module
from visguard.cli import cli
from visguard.eval import read_rows

KEYS = ("n", "accuracy", "precision", "recall", "f1", "fpr", "auroc", "auprc", "per_category", "latency_ms")


@pytest.fixture(scope="module")
def mis_root(tmp_path_factory):
    return write_mis_test_layout(tmp_path_factory.mktemp("syn"), {"easy": 12, "hard": 6}, seed=5)


@pytest.fixture(scope="module", autouse=True)
def plugin_commands():
    cli_module._register_plugin_commands()  # what the `visguard` entry point does first


def invoke(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


def ratio(a, b):
    return None if b == 0 else a / b


def test_guard_eval_on_synthetic_mis_summary_equals_recomputation_from_rows(mis_root, qwen_path, tmp_path):
    out = tmp_path / "out"
    result = invoke(["eval", "--benchmark", "mis", "--data", str(mis_root), "--split", "hard", "--model", qwen_path,
                     "--device", "cpu", "--batch-size", "4", "--out", str(out), "--json", "--no-progress"])
    summary = json.loads(result.stdout)
    assert all(k in summary for k in KEYS) and set(summary["latency_ms"]) >= {"p50", "p95", "p99"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    gold = json.loads((mis_root / "mis_hard.json").read_text())
    assert sorted(r["id"] for r in rows) == sorted(f"hard/{g['id']}" for g in gold)  # --split picked mis_hard.json
    assert {r["label"] for r in rows} == {g["label"] for g in gold}

    # recompute every headline number from the rows, by hand
    avail = [r for r in rows if r["pred"] in ("safe", "unsafe")]
    tp = sum(r["label"] == "unsafe" and r["pred"] == "unsafe" for r in avail)
    fp = sum(r["label"] == "safe" and r["pred"] == "unsafe" for r in avail)
    tn = sum(r["label"] == "safe" and r["pred"] == "safe" for r in avail)
    fn = sum(r["label"] == "unsafe" and r["pred"] == "safe" for r in avail)
    assert summary["n"] == len(rows) == 6 and summary["unavailable"] == len(rows) - len(avail)
    assert summary["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for key, value in (("accuracy", ratio(tp + tn, len(avail))), ("precision", ratio(tp, tp + fp)),
                       ("recall", ratio(tp, tp + fn)), ("f1", ratio(2 * tp, 2 * tp + fp + fn)), ("fpr", ratio(fp, fp + tn))):
        assert summary[key] == pytest.approx(value), key
    pos = [r["score"] for r in avail if r["label"] == "unsafe"]
    neg = [r["score"] for r in avail if r["label"] == "safe"]
    pairs = [Fraction(1) if p > q else Fraction(1, 2) if p == q else Fraction(0) for p in pos for q in neg]
    assert summary["auroc"] == pytest.approx(float(sum(pairs) / len(pairs)))
    for q in (50, 95, 99):
        assert summary["latency_ms"][f"p{q}"] == pytest.approx(float(np.percentile([r["latency_ms"] for r in rows], q)))
    for cat, n in Counter(r["category"] or "(none)" for r in rows).items():
        assert summary["per_category"][cat]["n"] == n
    assert summary["per_split"]["hard"]["n"] == 6
    # outputs on disk agree with what was printed
    assert json.loads((out / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    assert "## Confusion matrix" in (out / "report.md").read_text()
    for name in ("confusion_matrix", "per_category", "scores_roc", "latency"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the Python API the training check uses gives the same numbers
    from visguard import Guard
    from visguard.eval import evaluate_guard, load_benchmark

    again = evaluate_guard(Guard.from_pretrained(qwen_path, device="cpu"), load_benchmark("mis", mis_root, "hard"),
                           batch_size=4, progress=False)
    assert again.accuracy == summary["accuracy"] and again.confusion == summary["confusion"]


def test_model_eval_cli_with_a_tiny_host_and_the_refusal_judge(mis_root, qwen_path, tmp_path):
    out = tmp_path / "model"
    result = invoke(["eval", "-B", "mis", "-d", str(mis_root), "-s", "hard", "-m", qwen_path, "--host", "auto",
                     "--device", "cpu", "--judge", "refusal", "--host-max-new-tokens", "4",
                     "--out", str(out), "--json", "--no-progress", "--no-plots"])
    summary = json.loads(result.stdout)
    rows = read_rows(out / "results.jsonl")
    assert summary["n"] == len(rows) == 6 and summary["kind"] == "model"
    assert all(isinstance(r["response"], str) and r["judgment"]["judge"] == "refusal" for r in rows)
    unsafe = [r["judgment"] for r in rows if r["label"] == "unsafe"]
    assert summary["asr"] == pytest.approx(100 * sum(not j["safe"] for j in unsafe) / len(unsafe))
    assert summary["asr"] + summary["rsr"] + summary["rr"] + summary["hr"] == pytest.approx(100.0)
    assert set(summary["latency_ms"]) >= {"p50", "p95", "p99"}

    # the same host behind a guard (--guard: guard.wrap), pre- and post-checked by the tiny guard
    guarded = json.loads(invoke(["eval", "-B", "mis", "-d", str(mis_root), "-s", "hard", "-m", qwen_path,
                                 "--host", "auto", "--guard", qwen_path, "--device", "cpu", "--judge", "refusal",
                                 "--host-max-new-tokens", "4", "--limit", "2", "--out", str(tmp_path / "guarded"),
                                 "--json", "--no-progress", "--no-plots"]).stdout)
    rows = read_rows(tmp_path / "guarded" / "results.jsonl")
    assert guarded["guard"] == qwen_path and guarded["n"] == 2
    assert all(r["guard_input_verdict"]["label"] in ("safe", "unsafe", "unavailable") for r in rows)
    assert guarded["guard_blocked"] == sum(bool(r["guard_blocked"]) for r in rows)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_exactly_n_rows(mis_root, qwen_path, tmp_path):
    out = tmp_path / "killed"
    args = ["eval", "-B", "mis", "-d", str(mis_root), "-s", "easy", "-m", qwen_path, "--device", "cpu",
            "--batch-size", "1", "--out", str(out), "--no-progress", "--no-plots"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "visguard.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if results.exists() and results.read_bytes().count(b"\n") >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(read_rows(results))
    assert 3 <= done_before < 12
    with results.open("ab") as fh:  # a crash can also leave half a row behind
        fh.write(b'{"id": "easy/torn", "pred": "saf')

    result = invoke(args + ["--json"])  # the same command again
    summary = json.loads(result.stdout)
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    gold = [f"easy/{g['id']}" for g in json.loads((mis_root / "mis_easy.json").read_text())]
    assert len(ids) == 12 and Counter(ids) == Counter(gold)  # every item exactly once, no torn row
    assert summary["n"] == 12 and summary["resumed"] == done_before

    # the same run never interrupted: the same verdict and score for every item
    reference = tmp_path / "uninterrupted"
    invoke([*args[:-3], str(reference), "--no-progress", "--no-plots"])
    want = {r["id"]: r for r in read_rows(reference / "results.jsonl")}
    got = {r["id"]: r for r in read_rows(results)}
    assert got.keys() == want.keys()
    for rid, row in got.items():
        assert row["pred"] == want[rid]["pred"], rid
        assert row["score"] == pytest.approx(want[rid]["score"], abs=1e-5), rid


def test_model_eval_cli_host_and_judge_behind_openai_compatible_endpoints(mis_root, tmp_path):
    from test_eval_judges import fake_openai_server

    def answer(body):
        text = body["messages"][0]["content"][-1]["text"]
        if body["model"] == "judge":
            refused = "I can't help" in text
            return json.dumps({"verdict": "Safe" if refused else "Unsafe", "level": 2 if refused else 1, "refusal": refused})
        return "I can't help with that." if "first" in text else "Sure, here is how."

    with fake_openai_server(answer) as (url, bodies):
        summary = json.loads(invoke(["eval", "-B", "mis", "-d", str(mis_root), "-s", "easy", "--host", "auto",
                                     "--base-url", url, "-m", "host-vlm", "--judge-model", "judge",
                                     "--judge-backend", "openai", "--judge-base-url", url, "--out", str(tmp_path / "o"),
                                     "--json", "--no-progress", "--no-plots"]).stdout)
    rows = read_rows(tmp_path / "o" / "results.jsonl")
    assert summary["n"] == len(rows) == 12 and summary["judge"] == "mis" and summary["judge_model"] == "judge"
    assert {b["model"] for b in bodies} == {"host-vlm", "judge"} and len(bodies) == 24
    unsafe = [r for r in rows if r["label"] == "unsafe"]
    complied = sum(r["response"] == "Sure, here is how." for r in unsafe)
    assert summary["asr"] == pytest.approx(100 * complied / len(unsafe))
    assert summary["asr"] + summary["rr"] == pytest.approx(100.0) and summary["rsr"] == summary["hr"] == 0.0
