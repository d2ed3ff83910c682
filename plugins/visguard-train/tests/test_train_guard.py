"""visguard train end to end: a guard trained on the synthetic two-image data flags held-out pairs in fast mode.

Each image is benign alone (every object also appears in safe pairs); only the combination is unsafe.
The model is a tiny random-init Qwen2-VL (0.66 M parameters), trained from scratch on CPU in ~4 minutes
(one torch thread).
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

pytest.importorskip("visguard_train")

from visguard_testing.synthetic import write_jsonl  # noqa: E402

from visguard import Guard  # noqa: E402
from visguard.cli import _register_plugin_commands, cli  # noqa: E402

# Tuned for a tiny random-init model on 2 CPU cores: 1,600 training items give 3,200 examples per
# epoch (fast + reason prompts); the reason targets, which name each image's object, are what teach
# the model to read the images at all (fast examples alone stay at chance).
# Warm-up 0.1 (80 of 800 steps), not 0.03: with 24 warm-up steps at lr 4e-3 the fast verdict's accuracy
# hung on float summation order (0.91 with 2 torch threads, 0.655 with 1: the suite once left torch at
# 1 thread); with 80 it is 0.900 (AUROC 0.951) with 1 thread and 0.895 (AUROC 0.971) with 2
# (plugins/visguard-train/benchmarks/train_vs_plain.py --variants visguard --train 1600 --epochs 2 --warmup-ratio 0.1
# --threads 1|2; docs/training.md). One pinned thread: the float order is the test's own, whatever
# the process did before, and one thread is fastest on a busy machine.
# Token averaging, named: this short schedule (800 steps) was tuned with it, the default before issue
# 26. With the default now (`example`: the fast verdict weighs as much as a reason example, and the
# reason targets that teach the model to read the images weigh half as much) it reached 0.79 here
# (one run, 1 thread): at 800 steps the images are read later. At the 1,600-step MIS-layout
# recipe `example` reached 0.995-1.000 in 3 seeds x 1 and 2 threads where `token` failed a seed
# (docs/training.md, "The MIS-layout recipe of issue 26").
HIDDEN, LAYERS = 64, 2
N_TRAIN, N_TEST = 1600, 200
TRAIN_FLAGS = ["--lr", "4e-3", "--epochs", "2", "--batch-size", "8", "--warmup-ratio", "0.1", "--seed", "0",
               "--cpu-threads", "1", "--loss-average", "token"]


@pytest.mark.slow
# ~4 min alone on 2 idle cores; the generous limit only stops a hang, it is not a speed target.
@pytest.mark.timeout(2400)
def test_trained_guard_flags_unsafe_combinations_of_benign_images(tmp_path, tiny_cache):
    from visguard_testing.checkpoints import cached_tiny_checkpoint
    from visguard_train.data import load_records

    base = cached_tiny_checkpoint("qwen2_vl", cache_dir=tiny_cache, hidden_size=HIDDEN, num_layers=LAYERS)
    train = write_jsonl(tmp_path / "data", N_TRAIN, seed=0, name="train.jsonl")
    test = write_jsonl(tmp_path / "data", N_TEST, seed=1, name="test.jsonl")  # other items, fresh images
    test_items = [json.loads(line) for line in test.read_text().splitlines()]
    train_ids = {json.loads(line)["id"] for line in train.read_text().splitlines()}
    assert not train_ids & {it["id"] for it in test_items}

    out = tmp_path / "guard"
    _register_plugin_commands()
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["train", "--data", str(train), "--base", str(base), "--output", str(out),
                                   "--device", "cpu", "--eval-data", str(test), "--save-steps", "100000",
                                   "--logging-steps", "50", *TRAIN_FLAGS])
    wall = time.perf_counter() - start
    assert res.exit_code == 0, res.output + repr(res.exception)
    meta = json.loads((out / "visguard_train.json").read_text())
    print(f"\ntrained {meta['num_parameters']:,} parameters on {meta['examples']} examples in "
          f"{meta['train_seconds']:.0f} s (CLI wall {wall:.0f} s); built-in eval {meta['eval']}")

    # Independent check through the public API, in fast mode: one forward pass per request.
    guard = Guard.from_pretrained(str(out), device="cpu")
    records = load_records(test)
    verdicts = guard.check_batch([guard.request(list(r.images), r.text) for r in records], mode="fast")
    correct = [v.label == r.label for v, r in zip(verdicts, records, strict=True)]
    accuracy = sum(correct) / len(correct)
    assert all(v.mode == "fast" and v.score is not None for v in verdicts)
    assert accuracy == pytest.approx(meta["eval"]["accuracy"])
    # The margin is the recipe's spread over float order (0.895-0.900 measured), not slack for a worse one.
    assert accuracy >= 0.85, f"fast-mode accuracy {accuracy:.3f}"
    auroc = _auroc([v.score for v in verdicts], [r.label == "unsafe" for r in records])
    assert auroc >= 0.93, f"fast-mode AUROC {auroc:.3f}"

    # `visguard eval` on the same held-out split reports the accuracy that training measured.
    res = CliRunner().invoke(cli, ["eval", "--benchmark", "jsonl", "--data", str(test), "--model", str(out),
                                   "--device", "cpu", "--out", str(tmp_path / "eval"), "--no-progress",
                                   "--no-plots", "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads(res.stdout)
    assert summary["n"] == N_TEST
    assert summary["accuracy"] == pytest.approx(meta["eval"]["accuracy"])

    # The flagged pairs are made of images that are benign alone: each object of a correctly flagged
    # unsafe pair also appears in held-out items labelled safe.
    objects_in_safe = set()
    for item, rec in zip(test_items, records, strict=True):
        if rec.label == "safe":
            objects_in_safe.update(_objects(item))
    caught = [item for item, rec, ok in zip(test_items, records, correct, strict=True) if ok and rec.label == "unsafe"]
    assert len(caught) >= 0.85 * sum(r.label == "unsafe" for r in records)
    assert all(set(_objects(item)) <= objects_in_safe for item in caught)


def _auroc(scores: list[float], positives: list[bool]) -> float:
    from visguard.eval.metrics import auroc

    value, why = auroc(scores, positives)
    assert value is not None, why
    return value


def _objects(item: dict) -> tuple[str, str]:
    # "Image 1: a crowbar (...)" -> "crowbar"
    lines = item["target"].splitlines()[:2]
    return tuple(line.split(": ", 1)[1].split(" (")[0].split(" ", 1)[1] for line in lines)
