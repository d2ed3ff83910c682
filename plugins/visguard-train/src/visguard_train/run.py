"""One training run: data -> examples -> Hugging Face ``Trainer`` -> a checkpoint the guard loads.

The same function runs in one process and under ``torchrun`` / ``accelerate launch`` (DDP; FSDP or
DeepSpeed through their config files): the Hugging Face ``Trainer`` reads the launcher's
environment. ``batch_size`` is the global batch per optimiser step, so a run gives the same
optimisation on one process or many.

Output layout::

    <output>/                      final model (full; lora with --merge) + processor
    <output>/adapter/              lora with --merge: the adapter (without --merge it is <output> itself)
    <output>/checkpoints/checkpoint-<step>/   periodic checkpoints (for --resume)
    <output>/train_log.jsonl       one line per logged step: step, epoch, loss, learning_rate ...
    <output>/visguard.json         the guard format and prompt layout version it was trained on
    <output>/visguard_train.json   the configuration, data summary, model size, timings, eval metrics
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError
from visguard_train.config import TrainConfig
from visguard_train.data import TrainRecord, load_records

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
META_FILE = "visguard_train.json"


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        output: the output directory.
        global_step: optimiser steps done (counting steps before a resume).
        resumed_from: the checkpoint the run resumed from, if any.
        num_parameters / trainable_parameters: model size.
        num_examples: training examples (a record can give a fast and a reason example).
        train_seconds: wall time of ``Trainer.train``.
        final_loss: mean training loss reported by the ``Trainer``.
        eval: fast-mode metrics on ``eval_data`` (empty when not asked).
        ranks: per process, in rank order: ``{"rank", "examples", "micro_batches"}`` it trained on in
            this run (since the resume point after ``--resume``).
    """

    output: Path
    global_step: int = 0
    resumed_from: str | None = None
    num_parameters: int = 0
    trainable_parameters: int = 0
    num_examples: int = 0
    train_seconds: float = 0.0
    final_loss: float | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, int]] = field(default_factory=list)


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The highest-step ``checkpoint-<n>`` in ``folder`` whose trainer state was fully written.

    The ``Trainer`` writes ``trainer_state.json`` last, so a checkpoint interrupted mid-write (a
    killed job) is skipped rather than resumed from.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for d in folder.glob("checkpoint-*"):
        try:
            step = int(d.name.rsplit("-", 1)[1])
            json.loads((d / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, d))
    return max(found)[1] if found else None


#: Where launchers put the number of processes: torchrun and ``accelerate launch`` (``WORLD_SIZE``) and the
#: MPI launchers behind ``accelerate launch --cpu --mpirun_hostfile`` (Intel MPI, Open MPI, MVAPICH2): the
#: variables accelerate itself reads (``accelerate.utils.environment.get_cpu_distributed_information``).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size(environ: Any = None) -> int:
    """The number of training processes the launcher started (1 without a launcher).

    Raises:
        InputError: ``accelerate launch`` was asked for several processes but started only this one
            (with ``--cpu`` and no MPI hostfile, or without ``--multi_gpu`` on a machine with fewer than two
            GPUs, it runs its one-process launcher, which still sets ``MASTER_ADDR``): refused rather than
            trained alone.
    """
    env = os.environ if environ is None else environ
    world = 1
    for var in WORLD_SIZE_VARS:
        if env.get(var):
            try:
                world = int(env[var])
            except ValueError:
                raise InputError(f"the launcher's {var}={env[var]!r} is not a number of processes") from None
            break
    if world == 1 and env.get("MASTER_ADDR") and "ACCELERATE_DYNAMO_BACKEND" in env:
        raise InputError(
            "accelerate launch started only this one process although it set MASTER_ADDR for several (with --cpu, "
            "or without --multi_gpu on a machine with fewer than two GPUs, it runs one process): for N processes run "
            "`accelerate launch --multi_gpu --num_processes N -m visguard_train ...` (add --device cpu on CPUs) "
            "or `torchrun --nproc_per_node N -m visguard_train ...`; unset MASTER_ADDR to train in one process"
        )
    return world


def batch_split(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """``(per_device_batch, gradient_accumulation)`` that give the global ``batch_size``.

    Raises:
        InputError: the global batch cannot be split evenly over ``world_size`` processes.
    """
    if config.batch_size % world_size:
        raise InputError(f"--batch-size {config.batch_size} is not divisible by the {world_size} processes")
    per_process = config.batch_size // world_size
    per_device = min(config.per_device_batch_size or per_process, per_process)
    if per_process % per_device:
        raise InputError(
            f"--per-device-batch-size {per_device} does not divide the per-process batch {per_process} "
            f"(--batch-size {config.batch_size} over {world_size} processes)"
        )
    return per_device, per_process // per_device


def run_training(config: TrainConfig) -> TrainResult:
    """Train a guard (or a safety-answer model) as described by ``config``.

    Raises:
        InputError: missing paths, bad data, a bad configuration or an existing run in ``output``.
        PluginError: unknown trainer, dataset layout or guard format name.
    """
    config.require_paths()
    from visguard import plugins

    method = plugins.get("trainers", config.trainer)(config=config)
    from visguard_train.trainable import trainable_format

    # before any data or model is loaded: a format without the training hooks is refused by name
    fmt = trainable_format(plugins.get("formats", config.guard_format)(), config.objective)
    records = load_records(config.data, config.data_format, limit=config.limit)
    eval_records = load_records(config.eval_data, None) if config.eval_data else []
    from visguard_train.encode import example_specs

    specs = example_specs(records, config.objective, config.guard_modes, _distilled_fast_labels(config, records))

    import torch

    threads = torch.get_num_threads()
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    try:
        return _train(config, method, fmt, records, eval_records, specs)
    finally:
        torch.set_num_threads(threads)


def _distilled_fast_labels(config: TrainConfig, records: list[TrainRecord]) -> list[Any] | None:
    """``--distill``: the teacher's reason-mode verdicts, one per record (:mod:`visguard_train.distill`)."""
    if config.distill is None:
        return None
    from visguard_train.distill import distilled_fast_labels

    return distilled_fast_labels(config.distill, str(config.base), records, Path(config.output).expanduser(),
                                 device=config.device, write=int(os.environ.get("RANK", "0")) == 0)


def _train(
    config: TrainConfig, method: Any, fmt: Any, records: list[TrainRecord], eval_records: list[TrainRecord],
    specs: list[Any],
) -> TrainResult:
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

    from visguard import plugins
    from visguard.core.errors import BackendError
    from visguard.integrations.hf import HFPromptCodec, resolve_checkpoint
    from visguard_train.encode import (
        ExampleBuilder,
        ExampleDataset,
        MultiImageCollator,
        continuation_loss,
        image_token_ids,
    )

    world = launched_world_size()
    per_device, accum = batch_split(config, world)
    output = Path(config.output).expanduser()
    ckpt_dir = output / CHECKPOINTS
    use_cpu = config.device == "cpu" or not torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    if config.bf16 and use_cpu:
        raise InputError("--bf16 needs a GPU with bfloat16 support (this run is on the CPU)")

    resume_from = _resume_point(config, output, ckpt_dir)

    transformers.set_seed(config.seed)
    try:  # an id that cannot be had fails in seconds, with one line
        base = resolve_checkpoint(config.base, role="base")
    except BackendError as exc:
        raise InputError(str(exc)) from exc
    try:
        processor = AutoProcessor.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load base model {config.base!r}: {exc}") from exc
    codec = HFPromptCodec(processor)
    if config.objective == "guard":
        _require_verdict_tokens(codec, fmt, config.base)
    try:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError ...: one typed message
        raise InputError(f"cannot load base model {config.base!r}: {type(exc).__name__}: {exc}") from exc
    builder = ExampleBuilder(codec, fmt)
    dataset = ExampleDataset(specs, builder, max_length=config.max_length)
    try:
        dataset[0]  # fail early, with the data's own error, before any training starts
    except NotImplementedError as exc:
        raise InputError(f"guard format {config.guard_format!r} cannot be trained: {exc}") from exc

    model = method.prepare(model)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        **_checkpointing_args(config.gradient_checkpointing),
        use_cpu=use_cpu,
        ddp_backend="gloo" if (use_cpu and world > 1) else None,
        dataloader_num_workers=config.num_workers,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
        deepspeed=config.deepspeed,
        fsdp=config.fsdp or "",
        fsdp_config=config.fsdp_config,
    )
    if args.world_size != world:  # the global batch was split for `world` processes: never train another split
        raise InputError(f"the launcher's environment says {world} processes but the Trainer runs {args.world_size}")
    if resume_from is not None and args.should_save:
        _trim_log(output / LOG_FILE, int(resume_from.name.rsplit("-", 1)[1]))
    if args.should_save and resume_from is None:
        # A fresh run: its log starts empty; --overwrite also drops the earlier checkpoints.
        (output / LOG_FILE).unlink(missing_ok=True)
        if config.overwrite and ckpt_dir.is_dir():
            shutil.rmtree(ckpt_dir)

    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=MultiImageCollator(
            processor, image_token_ids(processor), logits_to_keep=_accepts_logits_to_keep(model)
        ),
        compute_loss_func=functools.partial(
            continuation_loss, average=config.loss_average, examples_per_step=config.batch_size
        ),
        callbacks=[_JsonlLog(output / LOG_FILE)],
    )
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    ranks = _rank_summary(trainer)  # a collective: every process takes part
    method.save(trainer, processor, output)
    if trainer.is_world_process_zero():  # the prompt layout this guard learned: loaders must use exactly it
        record = _format_record(config, fmt)
        for directory in (output, output / "adapter"):
            if directory.is_dir():
                (directory / plugins.MODEL_FORMAT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    result = TrainResult(
        output=output,
        global_step=trainer.state.global_step,
        resumed_from=str(resume_from) if resume_from else None,
        num_parameters=n_params,
        trainable_parameters=n_train,
        num_examples=len(dataset),
        train_seconds=seconds,
        final_loss=train_out.training_loss,
        ranks=ranks,
    )
    if trainer.is_world_process_zero():
        if eval_records and config.objective in ("guard", "mirage"):
            result.eval = _evaluate_after_training(config, output, trainer.model, processor, fmt, eval_records)
        _write_meta(output, config, result, records, world)
    return result


def _rank_summary(trainer: Any) -> list[dict[str, int]]:
    """What each process trained on (gathered from all of them when several run)."""
    import torch.distributed as dist

    own = {"rank": trainer.args.process_index, "examples": trainer.rank_examples, "micro_batches": trainer.rank_micro_batches}
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return sorted(gathered, key=lambda r: r["rank"])


def _format_record(config: TrainConfig, fmt: Any) -> dict[str, Any]:
    """What ``visguard.json`` records: the format that reads the trained model the way it was trained.

    The response objective trains MIRage-style answers (user turn ``[image, ..., text]``, no system
    prompt, the answer as the assistant turn): a model that only ``mirage`` (variant ``qwen2_vl``)
    reads, whatever ``--guard-format`` says.
    """
    if config.objective == "response":
        return {"format": "mirage", "format_kwargs": {"variant": "qwen2_vl"}}
    kwargs = fmt.checkpoint_kwargs() if callable(getattr(fmt, "checkpoint_kwargs", None)) else {}
    return {"format": fmt.name, "format_kwargs": kwargs}


def _require_verdict_tokens(codec: Any, fmt: Any, base: str) -> None:
    """Refuse, before any training, a base model whose trained guard could never be scored."""
    from visguard.core.errors import BackendError

    caps = fmt.capabilities
    if not (caps.score and "fast" in caps.modes and not caps.fast_tokens):
        return  # the format's verdicts are not read from verdict-token scores
    try:
        codec.verdict_token_ids(fmt.verdict_prefix, fmt.verdict_words)
    except BackendError as exc:
        raise InputError(f"base model {base!r} cannot become a {fmt.name!r} guard: {exc}") from exc


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; older releases lack it.
    import dataclasses

    from transformers import TrainingArguments

    name = "activation_checkpointing"
    if name not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        name = "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _resume_point(config: TrainConfig, output: Path, ckpt_dir: Path) -> Path | None:
    last = last_complete_checkpoint(ckpt_dir)
    if config.resume:
        if last is None:
            print(f"visguard train: --resume: no complete checkpoint in {ckpt_dir}; starting from scratch")
        return last
    if not config.overwrite and ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint-*")):
        raise InputError(
            f"{output} already holds checkpoints from an earlier run; pass --resume to continue it "
            "or --overwrite to start over"
        )
    return None


def _trim_log(path: Path, step: int) -> None:
    # Steps after the checkpoint are trained again: drop their entries so the log stays one curve.
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _evaluate_after_training(
    config: TrainConfig, output: Path, model: Any, processor: Any, fmt: Any, records: Sequence[TrainRecord]
) -> dict[str, Any]:
    from visguard.engine.guard import Guard

    if config.trainer == "lora" and not config.merge:
        from visguard.default_plugins.transformers_backend import TransformersBackend

        guard = Guard(TransformersBackend.from_objects(model, processor, model_id=str(output)), fmt)
    else:
        guard = Guard.from_pretrained(str(output), format=fmt, device="cpu" if config.device == "cpu" else "auto")
    metrics = evaluate_guard(guard, records)
    print(f"visguard train: fast-mode accuracy on {config.eval_data}: {metrics['accuracy']:.3f} (n={metrics['n']})")
    return metrics


def evaluate_guard(guard: Any, records: Sequence[TrainRecord], *, batch_size: int = 16, mode: str = "fast") -> dict[str, Any]:
    """Score labelled records with a guard (the core's :func:`visguard.eval.evaluate_guard`).

    ``unavailable`` verdicts count as wrong here (they are neither a correct block nor a correct pass).

    Args:
        guard: a :class:`visguard.Guard`.
        records: records with labels (post-checks where a record has a response).
        batch_size: requests per batch.
        mode: ``fast``, ``reason`` or ``adaptive``.

    Returns:
        ``{"n", "accuracy", "tp", "fp", "tn", "fn", "unavailable"}``.
    """
    from visguard.eval import EvalItem
    from visguard.eval import evaluate_guard as evaluate

    items = [EvalItem.of(r, id=f"{k}:{r.id}") for k, r in enumerate(records) if r.label is not None]
    summary = evaluate(guard, items, batch_size=batch_size, mode=mode, benchmark="train-eval", plots=False)
    counts = {**summary.confusion, "unavailable": summary.unavailable}
    n = len(items)
    return {"n": n, "accuracy": (counts["tp"] + counts["tn"]) / n if n else 0.0, **counts}


def _write_meta(output: Path, config: TrainConfig, result: TrainResult, records: Sequence[TrainRecord], world: int) -> None:
    from importlib.metadata import version

    meta_path = output / META_FILE
    if config.trainer == "lora" and config.merge:
        paths = [meta_path, output / "adapter" / META_FILE]
    else:
        paths = [meta_path]
    meta = {
        "visguard_train_version": version("visguard-train"),
        "config": config.model_dump(mode="json"),
        "records": len(records),
        "examples": result.num_examples,
        "labels": {lab: sum(r.label == lab for r in records) for lab in ("safe", "unsafe")},
        "num_parameters": result.num_parameters,
        "trainable_parameters": result.trainable_parameters,
        "global_step": result.global_step,
        "resumed_from": result.resumed_from,
        "world_size": world,
        "ranks": result.ranks,
        "train_seconds": round(result.train_seconds, 2),
        "final_loss": result.final_loss,
        "eval": result.eval,
    }
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if config.objective in ("guard", "mirage"):
        # The trained guard names its format, so Guard.from_pretrained(output) runs it the trained way.
        from visguard.plugins import MODEL_FORMAT_FILE

        for path in paths:  # kept when already written with the format's layout kwargs (after saving the model)
            if not (path.parent / MODEL_FORMAT_FILE).is_file():
                (path.parent / MODEL_FORMAT_FILE).write_text(json.dumps({"format": config.guard_format}) + "\n", encoding="utf-8")


def load_checkpoint_weights(model: Any, checkpoint: str | Path) -> None:
    """Load a full-model checkpoint written by ``save_pretrained`` into ``model``, all keys or none.

    ``save_pretrained`` writes the architecture's *checkpoint* key names (transformers reverts its
    weight renamings when saving, e.g. ``model.embed_tokens`` for ``model.language_model.embed_tokens``),
    so a plain ``load_state_dict`` of the file matches no key. The checkpoint is read back through
    ``from_pretrained``, which applies the same renamings as the first load, and copied in strictly.

    Raises:
        InputError: the checkpoint cannot be read, or its weights do not cover the model exactly.
    """
    import torch

    checkpoint = Path(checkpoint)
    dtype = next(model.parameters()).dtype
    try:
        loaded = type(model).from_pretrained(str(checkpoint), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"--resume: cannot read the weights of {checkpoint}: {_first_line(exc)}") from exc
    state = loaded.state_dict()
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(
            f"--resume: the weights in {checkpoint} do not match the model "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])
    del loaded, state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _trainer_class() -> type:
    """The Hugging Face ``Trainer`` with resume made exact and fail-closed.

    - full-model checkpoints are loaded with the model's own key names (:func:`load_checkpoint_weights`);
      the stock loader matches none of them on transformers 5 and silently keeps the base weights;
    - a checkpoint's pickled state (optimizer, scheduler, RNG, scaler) is loaded with
      ``weights_only`` (by transformers); a file that is refused becomes one ``InputError`` line
      naming the file instead of a traceback.
    """
    from transformers import Trainer

    class VisguardTrainer(Trainer):  # type: ignore[misc]
        rank_examples = 0  # examples and micro-batches this process trained on (visguard_train.json "ranks")
        rank_micro_batches = 0

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            self.rank_examples += len(inputs["input_ids"])
            self.rank_micro_batches += 1
            return super().training_step(model, inputs, num_items_in_batch)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            target = model if model is not None else self.model
            ckpt = Path(resume_from_checkpoint)
            plain = (ckpt / "model.safetensors").is_file() or (ckpt / "model.safetensors.index.json").is_file()
            if plain and not self.is_fsdp_enabled and not hasattr(target, "peft_config"):
                load_checkpoint_weights(target, ckpt)
                return
            with _refuse_unsafe(ckpt):
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            with _refuse_unsafe(checkpoint):
                super()._load_optimizer_and_scheduler(checkpoint)

        def _load_rng_state(self, checkpoint: str | None) -> None:
            with _refuse_unsafe(checkpoint):
                super()._load_rng_state(checkpoint)

        def _load_scaler(self, checkpoint: str | None) -> None:
            with _refuse_unsafe(checkpoint):
                super()._load_scaler(checkpoint)

    return VisguardTrainer


#: pickled files a Trainer checkpoint holds besides the weights (all loaded with ``weights_only``)
_PICKLED = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "pytorch_model.bin")


@contextlib.contextmanager
def _refuse_unsafe(checkpoint: str | Path | None) -> Iterator[None]:
    """Turn a refused or unreadable pickled checkpoint file into one ``InputError`` line naming it."""
    import pickle

    try:
        yield
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        folder = Path(checkpoint or ".")
        bad = [name for name in _PICKLED if (folder / name).is_file() and not _loads_safely(folder / name)]
        where = folder / bad[0] if bad else folder
        raise InputError(
            f"--resume: {where} was refused: it is not a plain tensor file (weights_only loading; "
            "a checkpoint file holding other objects is never unpickled)"
        ) from exc


def _loads_safely(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not loadable safely"
        return False
    return True


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class _JsonlLog(_callback_base()):  # type: ignore[misc]
    """Append every logged training step to ``train_log.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
