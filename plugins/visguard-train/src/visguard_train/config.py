"""Training configuration: one validated object built from defaults, a preset, a config file and flags.

Precedence, lowest first: field defaults < ``preset`` < config file (YAML or JSON) < command-line
flags. Config-file keys are the field names below (``batch_size`` or ``batch-size`` both work).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visguard.core.errors import InputError

Objective = Literal["guard", "response", "mirage"]
GuardMode = Literal["fast", "reason"]

#: The paper's full-parameter SFT hyper-parameters (arXiv 2501.18533, "Training in the paper").
#: The paper does not publish its batch size, so the presets leave it alone.
PRESETS: dict[str, dict[str, Any]] = {
    "mirage-qwen2vl": {"trainer": "full", "lr": 2e-6, "epochs": 3.0, "warmup_ratio": 0.03},
    "mirage-internvl": {"trainer": "full", "lr": 5e-6, "epochs": 2.0, "warmup_ratio": 0.03},
}


class TrainConfig(BaseModel):
    """Everything one ``visguard train`` run needs.

    Attributes:
        data: a JSON/JSONL file or a dataset root directory.
        base: the model to start from (hub id or local path).
        output: where checkpoints (``<output>/checkpoints``) and the final model go.
        data_format: dataset loader name (``mis-train``, ``mis-test``, ``jsonl`` ...); ``None`` detects it.
        trainer: training method (``full`` or ``lora``).
        objective: ``guard`` (train the guard format's verdict), ``response`` (MIRage SFT: train the
            safety chain-of-thought answer) or ``mirage`` (a MIRage-style guard: the ``response``
            examples plus, for labelled records, the ``mirage`` format's follow-up verdict after the
            record's own answer and its fast verdict question, so the model runs as a guard through
            the ``mirage`` format).
        guard_modes: guard prompts to train; ``reason`` is used only for records that carry reasoning.
        guard_format: the guard format whose prompts and targets are trained (a
            :class:`~visguard_train.trainable.TrainableFormat`, checked before anything is loaded);
            default ``mirage`` for the ``mirage`` objective, else ``visguard``.
        preset: name of a hyper-parameter preset (see :data:`PRESETS`).
        epochs / lr / batch_size: optimisation; ``batch_size`` is the *global* batch per optimiser
            step, whatever the number of processes.
        per_device_batch_size: micro-batch per process (default: as large as the global batch allows);
            gradient accumulation makes up the rest.
        max_steps: stop after this many optimiser steps (overrides ``epochs`` when set).
        warmup_ratio / weight_decay / lr_scheduler: optimiser schedule.
        max_grad_norm: clip the gradient's global norm to this before each step (0: no clipping).
        loss_average: ``example`` (default): every example weighs the same (its mean token loss),
            whatever its target's length, so the one-pass verdict of a fast example weighs as much as
            a whole reason example; ``token``: every target token of the batch weighs the same (the
            Hugging Face ``Trainer``'s own average: a reason example of ~200 target tokens then
            outweighs ~17 fast verdicts, and whether the fast verdict is learnt depends on the
            seed; docs/training.md, "The MIS-layout recipe of issue 26").
        distill: train the fast verdict examples on a teacher guard's reason-mode verdicts
            (:mod:`visguard_train.distill`): a guard directory or hub id, or ``self`` (the ``base``
            model, itself a reasoning guard); the other examples keep the records' own labels.
        save_steps / save_total_limit: periodic checkpoints (under ``<output>/checkpoints``).
        logging_steps: how often the loss is logged (to the progress bar and ``train_log.jsonl``).
        seed: seed of initialisation-independent randomness (data order, dropout).
        gradient_checkpointing / bf16: memory and speed switches (bf16 needs a GPU that supports it).
        freeze_vision: full trainer: keep the vision tower's weights fixed.
        lora_r / lora_alpha / lora_dropout / lora_target: LoRA settings; ``lora_target`` is a regular
            expression over module names (default chosen per architecture).
        merge: LoRA trainer: also write a merged plain checkpoint to ``output`` (adapter kept in
            ``<output>/adapter``).
        max_length: truncate targets so that an example is at most this many tokens (prompts are never cut).
        limit: use only the first N records (quick trials).
        eval_data: held-out data scored in fast mode after training (guard objective).
        device: ``auto`` (CUDA when available) or ``cpu``.
        deepspeed: a DeepSpeed JSON config file (passed to the Hugging Face Trainer).
        fsdp / fsdp_config: FSDP options of the Hugging Face Trainer (e.g. ``"full_shard auto_wrap"``).
        resume: continue from the last complete checkpoint in ``<output>/checkpoints``.
        overwrite: delete earlier checkpoints in ``output`` and start over.
        num_workers: data-loader worker processes.
        cpu_threads: torch threads per process on the CPU (default: torch's choice). 1 is fastest
            on a busy machine and under ``torchrun`` on CPUs.
    """

    model_config = ConfigDict(extra="forbid")

    data: str | None = None
    base: str | None = None
    output: str | None = None
    data_format: str | None = None
    trainer: str = "full"
    objective: Objective = "guard"
    guard_modes: tuple[GuardMode, ...] = ("fast", "reason")
    guard_format: str | None = None
    preset: str | None = None
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=8, ge=1)
    per_device_batch_size: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    loss_average: Literal["token", "example"] = "example"
    distill: str | None = None
    lr_scheduler: str = "cosine"
    save_steps: int = Field(default=500, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    logging_steps: int = Field(default=10, ge=1)
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False
    freeze_vision: bool = False
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target: str | None = None
    merge: bool = False
    max_length: int | None = Field(default=None, ge=16)
    limit: int | None = Field(default=None, ge=1)
    eval_data: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deepspeed: str | None = None
    fsdp: str | None = None
    fsdp_config: str | None = None
    resume: bool = False
    overwrite: bool = False
    num_workers: int = Field(default=0, ge=0)
    cpu_threads: int | None = Field(default=None, ge=1)

    @field_validator("guard_modes", mode="before")
    @classmethod
    def _split_modes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if not self.guard_modes:
            raise ValueError("guard_modes must name at least one of fast, reason")
        if self.merge and self.trainer != "lora":
            raise ValueError("merge applies to the lora trainer only")
        if self.guard_format is None:
            self.guard_format = "mirage" if self.objective == "mirage" else "visguard"
        if self.distill is not None and (self.objective == "response" or "fast" not in self.guard_modes):
            raise ValueError("distill teaches the fast verdict: it needs --objective guard or mirage and fast in guard_modes")
        return self

    def require_paths(self) -> None:
        """Check that ``data``, ``base`` and ``output`` are set.

        Raises:
            InputError: one of them is missing (the message names the flag).
        """
        missing = [f"--{n}" for n in ("data", "base", "output") if not getattr(self, n)]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (give it as a flag or in the --config file)")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict with ``snake_case`` keys.

    Raises:
        InputError: the file is missing, unreadable or not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot parse config file {p}: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InputError(f"config file {p} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def build_config(
    file_values: Mapping[str, Any] | None = None, flag_values: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Merge defaults, preset, config-file values and flag values into a :class:`TrainConfig`.

    Args:
        file_values: values read from a config file (see :func:`read_config_file`).
        flag_values: values given explicitly on the command line (only those: unset flags must
            not appear, or they would hide the file's values).

    Raises:
        InputError: an unknown option or an invalid value (the message names it).
    """
    file_values = dict(file_values or {})
    flag_values = dict(flag_values or {})
    preset = flag_values.get("preset") or file_values.get("preset")
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        merged.update(PRESETS[preset])
    merged.update(file_values)
    merged.update(flag_values)
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise InputError(f"invalid training configuration: {problems}") from None
