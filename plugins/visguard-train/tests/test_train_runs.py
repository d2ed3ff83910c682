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

    from visguard.integrations.hf import HFPromptCodec

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


_RESUME_ARGS = ["--guard-modes", "fast", "--lr", "1e-2", "--batch-size", "2", "--max-steps", "6", "--save-steps", "3",
                "--save-total-limit", "5", "--logging-steps", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_base, data) -> Path:
    """A 6-step full run that wrote checkpoints at steps 3 and 6: the reference a resumed run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _train(["--data", str(data), "--base", small_base, "--output", str(out), *_RESUME_ARGS])
    return out


def _losses(output: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _log(output) if "loss" in e}


def _interrupted_copy(reference: Path, dest: Path, step: int) -> Path:
    """The state a run killed after checkpoint ``step`` leaves: that checkpoint and the log up to it."""
    import shutil

    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / f"checkpoint-{step}", dest / "checkpoints" / f"checkpoint-{step}")
    kept = [line for line in (reference / "train_log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dest / "train_log.jsonl").write_text("".join(line + "\n" for line in kept))
    return dest


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= 1e-6, f"final weights differ by up to {worst}"


def test_resume_restores_the_weights_and_continues_the_same_curve(tmp_path, small_base, data, uninterrupted):
    """Issue 10 #2: the checkpoint's key names did not match the model, so --resume kept the base weights."""
    out = _interrupted_copy(uninterrupted, tmp_path / "resumed", 3)
    text = _train(["--data", str(data), "--base", small_base, "--output", str(out), *_RESUME_ARGS, "--resume"])
    assert "resumed from" in text and "checkpoint-3" in text
    ref, got = _losses(uninterrupted), _losses(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([ref[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-6)
    _assert_same_weights(uninterrupted, out)
    assert not (_weights(out)["lm_head.weight"] == _weights(Path(small_base))["lm_head.weight"]).all()


def test_lora_resume_restores_the_adapter(tmp_path, small_base, data):
    """LoRA checkpoints hold the adapter only: the resumed run equals the uninterrupted one too."""
    lora = [*_RESUME_ARGS, "--trainer", "lora", "--lora-r", "4", "--merge"]
    ref = tmp_path / "lora-ref"
    _train(["--data", str(data), "--base", small_base, "--output", str(ref), *lora])
    out = _interrupted_copy(ref, tmp_path / "lora-resumed", 3)
    assert (out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    _train(["--data", str(data), "--base", small_base, "--output", str(out), *lora, "--resume"])
    want, got = _losses(ref), _losses(out)
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-5, abs=1e-6)
    _assert_same_weights(ref, out)  # the merged checkpoints


def test_resume_refuses_a_malicious_optimizer_file(tmp_path, small_base, data, uninterrupted):
    """A pickled optimizer.pt that would run code is refused by weights_only loading: one line, exit 2."""
    import torch

    out = _interrupted_copy(uninterrupted, tmp_path / "evil", 3)
    marker = tmp_path / "pwned"
    torch.save({"state": _Evil(str(marker))}, out / "checkpoints" / "checkpoint-3" / "optimizer.pt")
    run = subprocess.run(_cmd("--data", str(data), "--base", small_base, "--output", str(out), *_RESUME_ARGS, "--resume"),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "optimizer.pt was refused" in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, small_base, data):
    """SIGKILL mid-run, then --resume: one loss curve equal to an uninterrupted run's, same final weights."""
    out = tmp_path / "resume"
    args = ["--data", str(data), "--base", small_base, "--guard-modes", "fast", "--lr", "1e-2",
            "--batch-size", "2", "--epochs", "2", "--save-steps", "3", "--save-total-limit", "5", "--logging-steps", "1"]
    proc = subprocess.Popen(_cmd(*args, "--output", str(out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
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
    res = CliRunner().invoke(cli, ["train", *args, "--output", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output

    text = _train([*args, "--output", str(out), "--resume"])
    assert "resumed from" in text and "checkpoint-" in text
    resumed_from = int(text.split("checkpoint-")[1].split()[0].rstrip(","))
    assert resumed_from >= 3
    log = _log(out)
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == list(range(1, steps_per_run + 1))  # one curve: no lost, no repeated step
    state = json.loads((out / "checkpoints" / f"checkpoint-{steps_per_run}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps_per_run
    meta = json.loads((out / "visguard_train.json").read_text())
    assert meta["global_step"] == steps_per_run and meta["resumed_from"].endswith(f"checkpoint-{resumed_from}")

    # the same run, never interrupted: same losses after the resume point, same final weights
    ref = tmp_path / "reference"
    _train([*args, "--output", str(ref)])
    want, got = _losses(ref), _losses(out)
    after = [s for s in sorted(want) if s > resumed_from]
    assert after and [got[s] for s in after] == pytest.approx([want[s] for s in after], rel=1e-5, abs=1e-6)
    _assert_same_weights(ref, out)


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


def test_a_base_model_that_cannot_be_had_fails_in_one_line(tmp_path, data, monkeypatch):
    """Offline, an unknown hub id as --base is refused before any download or retry (hf.resolve_checkpoint)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    _register_plugin_commands()
    res = CliRunner().invoke(cli, ["train", "--data", str(data), "--base", "no/such-model", "--output", str(tmp_path / "o"),
                                   "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "no/such-model" in res.output and "local checkpoint directory" in res.output
    assert not (tmp_path / "o" / "checkpoints").exists()
