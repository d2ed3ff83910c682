"""Multi-process ``visguard train`` under ``accelerate launch``, run for real: 2 CPU processes, gloo.

What each launch command does was read in accelerate 1.16.0's source (github.com/huggingface/accelerate,
``src/accelerate/commands/launch.py`` ``launch_command`` / ``_validate_launch_command`` and
``src/accelerate/utils/launch.py`` ``prepare_simple_launcher_cmd_env``):

- ``accelerate launch --num_processes N --multi_gpu`` (chosen by itself without ``--multi_gpu`` when
  the machine has more than one GPU) runs ``torch.distributed.run``: N processes, ``WORLD_SIZE=N``.
  On a CPU machine the same command with ``visguard train --device cpu`` trains over gloo: this is the
  test below, and the GPU command in docs/training.md without ``--device cpu``.
- ``accelerate launch --num_processes N --cpu`` runs its *simple* launcher: ONE process, with
  ``MASTER_ADDR``/``MASTER_PORT`` set and no ``WORLD_SIZE`` (several CPU processes need
  ``--mpirun_hostfile``). That is how a launched run reported world size 1; ``visguard train`` now
  refuses it with one line instead of training alone.
- Under ``--mpirun_hostfile`` the processes come from MPI, which sets ``PMI_SIZE``/``PMI_RANK`` (Intel
  MPI) instead of ``WORLD_SIZE``; accelerate reads those (``src/accelerate/utils/environment.py``
  ``get_cpu_distributed_information``). The last test sets them as mpirun would (no MPI here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("visguard_train")

from visguard_testing.synthetic import write_jsonl  # noqa: E402

from visguard import Guard  # noqa: E402
from visguard.cli import _register_plugin_commands, cli  # noqa: E402

N_RECORDS = 16
BATCH = 4  # global: each of 2 processes trains 2 examples per optimiser step
STEPS = N_RECORDS // BATCH  # one epoch


@pytest.fixture(scope="module")
def small_base(tiny_cache) -> str:
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    return str(cached_tiny_checkpoint("qwen2_vl", cache_dir=tiny_cache, hidden_size=32, num_layers=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("train-mp"), N_RECORDS, seed=5)


def _train_args(small_base: str, data: Path, output: Path) -> list[str]:
    return ["--device", "cpu", "--cpu-threads", "1", "--data", str(data), "--base", small_base, "--output", str(output),
            "--guard-modes", "fast", "--lr", "5e-3", "--batch-size", str(BATCH), "--epochs", "1",
            "--logging-steps", "1", "--save-steps", str(STEPS), "--seed", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # HF_HOME: no accelerate default_config.yaml of this machine changes the launch; offline, one thread each
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _accelerate(*launch: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "-m", "visguard_train"]


def _steps(output: Path) -> list[int]:
    lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [e["step"] for e in lines if "loss" in e]


def _losses(output: Path) -> list[float]:
    lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in lines if "loss" in e]


def _assert_two_ranks_trained_one_guard(out: Path, data: Path) -> None:
    meta = json.loads((out / "visguard_train.json").read_text())
    assert meta["world_size"] == 2
    # the global batch was split over the 2 processes: one epoch is N/BATCH steps, not N/(2*BATCH)
    assert meta["global_step"] == STEPS and meta["examples"] == N_RECORDS
    # each rank trained its own half of every global batch (gathered from both processes)
    assert [(r["rank"], r["examples"]) for r in meta["ranks"]] == [(0, N_RECORDS // 2), (1, N_RECORDS // 2)]
    assert all(r["micro_batches"] >= STEPS for r in meta["ranks"])
    # one writer: every logged step once (a second writer would append its own copy)
    assert _steps(out) == list(range(1, STEPS + 1))
    ckpt = out / "checkpoints" / f"checkpoint-{STEPS}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == STEPS
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]  # both ranks ran
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # one model, written by rank 0

    guard = Guard.from_pretrained(str(out), device="cpu")
    item = json.loads(data.read_text().splitlines()[0])
    verdict = guard.check_input([str(data.parent / p) for p in item["images"]], item["text"])
    assert verdict.label in ("safe", "unsafe") and 0.0 <= verdict.score <= 1.0


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_train_one_guard(tmp_path, small_base, data):
    """The documented multi-process command, run: 2 ranks, the 1-process loss curve, one guard that loads."""
    out = tmp_path / "two"
    run = subprocess.run(
        [*_accelerate("--multi_gpu", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                      "--main_process_port", str(_free_port())),
         *_train_args(small_base, data, out)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _assert_two_ranks_trained_one_guard(out, data)

    # DDP averaged both ranks' gradients: the curve is the one-process curve of the same global batches
    # (rank 0's half alone would give other losses)
    one = tmp_path / "one"
    _register_plugin_commands()
    res = CliRunner().invoke(cli, ["train", *_train_args(small_base, data, one)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    a, b = _losses(one), _losses(out)
    assert len(a) == len(b) == STEPS and a[-1] != a[0]
    assert b == pytest.approx(a, rel=2e-3, abs=1e-3)


def test_accelerate_cpu_launch_that_starts_one_process_is_refused(tmp_path, small_base, data):
    """``--num_processes 2 --cpu`` starts one process (accelerate's simple launcher): refused in one line, no training."""
    out = tmp_path / "alone"
    run = subprocess.run(
        [*_accelerate("--cpu", "--num_processes", "2", "--main_process_port", str(_free_port())),
         *_train_args(small_base, data, out)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode != 0, run.stdout[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and "accelerate launch started only this one process" in errors[0], run.stderr[-3000:]
    assert "--multi_gpu --num_processes N" in errors[0]
    assert not (out / "model.safetensors").exists() and not (out / "visguard_train.json").exists()


@pytest.mark.slow
def test_mpi_launched_processes_split_the_global_batch(tmp_path, small_base, data):
    """Processes started by mpirun (``accelerate launch --cpu --mpirun_hostfile``) carry PMI_SIZE, not WORLD_SIZE."""
    out = tmp_path / "mpi"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "visguard_train", *_train_args(small_base, data, out)],
            env=_env(tmp_path, PMI_SIZE="2", PMI_RANK=str(rank), MPI_LOCALNRANKS="2", MPI_LOCALRANKID=str(rank),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, ACCELERATE_USE_CPU="True"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    _assert_two_ranks_trained_one_guard(out, data)


def test_world_size_comes_from_the_launchers_variables():
    from visguard_train.run import launched_world_size

    from visguard.core.errors import InputError

    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4", "PMI_SIZE": "2"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    # a plain one-process run with MASTER_ADDR exported (no accelerate launcher) trains as before
    assert launched_world_size({"MASTER_ADDR": "10.0.0.1"}) == 1
    # accelerate's one-process launch without MASTER_ADDR (num_processes 1) trains as before
    assert launched_world_size({"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "True"}) == 1
    with pytest.raises(InputError, match="started only this one process"):
        launched_world_size({"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    with pytest.raises(InputError, match="WORLD_SIZE='two'"):
        launched_world_size({"WORLD_SIZE": "two"})
