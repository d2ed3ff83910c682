"""visguard train: LoRA + merge, frozen vision tower, the response objective, kill + resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("visguard_train")

from visguard_testing.synthetic import write_jsonl, write_mis_train_layout  # noqa: E402

from visguard import Guard  # noqa: E402
from visguard.cli import _register_plugin_commands, cli  # noqa: E402


@pytest.fixture(scope="module")
def small_base(tiny_cache) -> str:
    """A deliberately small qwen2_vl checkpoint: these tests check mechanics, not accuracy."""
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    return str(cached_tiny_checkpoint("qwen2_vl", cache_dir=tiny_cache, hidden_size=32, num_layers=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("train-runs"), 24, seed=5)


def _train(args: list[str]) -> str:
    _register_plugin_commands()
    res = CliRunner().invoke(cli, ["train", "--device", "cpu", "--cpu-threads", "1", *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def _log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_lora_adapter_merges_into_a_checkpoint_the_guard_loads(tmp_path, small_base, data):
    out = tmp_path / "lora"
    text = _train(["--data", str(data), "--base", small_base, "--output", str(out), "--trainer", "lora", "--merge",
                   "--guard-modes", "fast", "--lr", "1e-2", "--batch-size", "4", "--max-steps", "4",
                   "--lora-r", "4", "--logging-steps", "1"])
    assert "Model saved to" in text
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and "language_model" in adapter["target_modules"]
    meta = json.loads((out / "visguard_train.json").read_text())
    assert 0 < meta["trainable_parameters"] < meta["num_parameters"] / 4

    base, merged = _weights(Path(small_base)), _weights(out)
    assert set(merged) == set(base)  # a plain checkpoint: no lora_A / lora_B keys left
    q = next(k for k in base if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not (merged[q] == base[q]).all()  # the adapter was trained and merged in
    vision = [k for k in base if "visual." in k]
    assert vision and all((merged[k] == base[k]).all() for k in vision)  # LoRA never touched the vision tower

    guard = Guard.from_pretrained(str(out), device="cpu")
    item = json.loads(data.read_text().splitlines()[0])
    verdict = guard.check_input([str(data.parent / p) for p in item["images"]], item["text"])
    assert verdict.label in ("safe", "unsafe") and 0.0 <= verdict.score <= 1.0

    # `visguard train merge` gives the same checkpoint from the adapter
    res = CliRunner().invoke(cli, ["train", "merge", str(out / "adapter"), "-o", str(tmp_path / "merged2")])
    assert res.exit_code == 0, res.output
    again = _weights(tmp_path / "merged2")
    assert all((again[k] == merged[k]).all() for k in merged)


def test_full_training_can_freeze_the_vision_tower(tmp_path, small_base, data):
    out = tmp_path / "full"
    _train(["--data", str(data), "--base", small_base, "--output", str(out), "--freeze-vision", "--guard-modes", "fast",
            "--lr", "1e-2", "--batch-size", "4", "--max-steps", "3", "--gradient-checkpointing"])
    base, trained = _weights(Path(small_base)), _weights(out)
    vision = [k for k in base if "visual." in k]
    assert vision and all((trained[k] == base[k]).all() for k in vision)
    assert not (trained["lm_head.weight"] == base["lm_head.weight"]).all()
    assert Guard.from_pretrained(str(out), device="cpu").check_input(None, "hello").label in ("safe", "unsafe")


def test_response_objective_learns_the_safety_answer_shape(tmp_path, small_base):
    """MIRage SFT: after overfitting a few MIS-train items, greedy decoding reproduces the answer's start."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visguard_train.data import load_records
    from visguard_train.encode import response_prompt

    from visguard.hf import HFPromptCodec

    root = write_mis_train_layout(tmp_path / "mis", 4, seed=2)
    out = tmp_path / "resp"
    _train(["--data", str(root), "--base", small_base, "--output", str(out), "--objective", "response",
            "--lr", "1e-2", "--batch-size", "4", "--epochs", "100", "--warmup-ratio", "0", "--logging-steps", "10"])
    losses = [e["loss"] for e in _log(out) if "loss" in e]
    assert losses[-1] < losses[0] / 5
    rec = load_records(root)[0]
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    prompt = response_prompt(rec, 1, [Image.open(p).convert("RGB") for p in rec.images])
    text = HFPromptCodec(processor).render(prompt)
    inputs = processor(text=[text], images=[prompt.images], return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    gen = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert gen.startswith("Image 1 shows"), gen
    assert rec.turns[1][1].startswith(gen.strip()[:20])


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "visguard_train", "--device", "cpu", "--cpu-threads", "1", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, small_base, data):
    out = tmp_path / "resume"
    args = ["--data", str(data), "--base", small_base, "--output", str(out), "--guard-modes", "fast", "--lr", "1e-3",
            "--batch-size", "2", "--epochs", "2", "--save-steps", "3", "--save-total-limit", "5", "--logging-steps", "1"]
    proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file(), "no checkpoint appeared before the deadline"
    steps_per_run = 2 * 24 // 2  # 2 epochs of 24 items, batch 2
    killed_at = max(e["step"] for e in _log(out))
    assert 3 <= killed_at < steps_per_run  # killed mid-run (first epoch = 12 steps)

    # without --resume the earlier run is protected
    _register_plugin_commands()
    res = CliRunner().invoke(cli, ["train", *args])
    assert res.exit_code == 2 and "--resume" in res.output

    text = _train([*args, "--resume"])
    assert "resumed from" in text and "checkpoint-" in text
    resumed_from = int(text.split("checkpoint-")[1].split()[0].rstrip(","))
    assert resumed_from >= 3
    log = _log(out)
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one curve, no restart from step 1
    assert steps[-1] == steps_per_run
    state = json.loads((out / "checkpoints" / f"checkpoint-{steps_per_run}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps_per_run
    meta = json.loads((out / "visguard_train.json").read_text())
    assert meta["global_step"] == steps_per_run and meta["resumed_from"].endswith(f"checkpoint-{resumed_from}")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, small_base, data):
    common = ["--data", str(data), "--base", small_base, "--guard-modes", "fast", "--lr", "5e-3", "--batch-size", "4",
              "--max-steps", "6", "--logging-steps", "1", "--seed", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train([*common, "--output", str(one)])
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "visguard_train", "--device", "cpu", "--cpu-threads", "1", *common, "--output", str(two)],
        env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    meta = json.loads((two / "visguard_train.json").read_text())
    assert meta["world_size"] == 2 and meta["global_step"] == 6
    a = [e["loss"] for e in _log(one) if "loss" in e]
    b = [e["loss"] for e in _log(two) if "loss" in e]
    assert len(a) == len(b) == 6
    assert a[-1] < a[0]  # it trains
    assert b == pytest.approx(a, rel=2e-3, abs=1e-3)
    assert Guard.from_pretrained(str(two), device="cpu").check_input(None, "hi").label in ("safe", "unsafe")
