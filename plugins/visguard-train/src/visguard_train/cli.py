"""The ``visguard train`` command (added to the ``visguard`` CLI through ``register_commands``)."""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from visguard_train.config import PRESETS, build_config, read_config_file

_EPILOG = """\b
Examples:
  visguard train --data mis_train.json --base Qwen/Qwen2-VL-2B-Instruct --output runs/guard
  visguard train --data data/ --base ./base --output runs/g --trainer lora --merge
  visguard train --config train.yaml --lr 1e-5          (flags override the file)
  torchrun --nproc_per_node 8 -m visguard_train --config train.yaml   (same run, 8 processes)
  visguard train merge runs/g --output runs/g-merged   (LoRA adapter -> plain checkpoint)
"""


def _presets_help() -> str:
    return "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in PRESETS.items()
    )


@click.group(
    "train",
    invoke_without_command=True,
    no_args_is_help=True,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.option("--data", type=click.Path(exists=True), help="Training data: a JSON/JSONL file or a dataset root.")
@click.option("--base", help="Model to fine-tune: hub id or local path (image-text-to-text).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output directory (model, checkpoints, logs).")
@click.option("--format", "data_format", help="Data layout: mis-train, mis-test or jsonl (default: detected).")
@click.option("--trainer", help="Training method: full (default) or lora.")
@click.option("--objective", type=click.Choice(["guard", "response", "mirage"]),
              help="guard (default): learn the guard format's verdict, in the exact inference prompt. "
                   "response: learn the safety chain-of-thought answer (MIRage SFT). "
                   "mirage: response plus the mirage format's verdict steps (a MIRage-style guard).")
@click.option("--guard-modes", help="Guard prompts to train, comma-separated (default fast,reason; "
                                    "reason only for records with reasoning).")
@click.option("--guard-format", help="Guard format plugin whose prompts/targets are trained "
                                     "(default mirage for --objective mirage, else visguard).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help=f"Paper hyper-parameters. {_presets_help()}.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Training epochs (default 1).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (default 2e-5).")
@click.option("--batch-size", type=click.IntRange(1), help="Global batch per optimiser step, over all processes (default 8).")
@click.option("--per-device-batch-size", type=click.IntRange(1),
              help="Micro-batch per process; gradient accumulation makes up the global batch.")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after N optimiser steps (overrides --epochs).")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), help="Warm-up share of the steps (default 0.03).")
@click.option("--weight-decay", type=click.FloatRange(0), help="AdamW weight decay (default 0).")
@click.option("--max-grad-norm", type=click.FloatRange(0),
              help="Clip the gradient's global norm to this before each step; 0: no clipping (default 1.0).")
@click.option("--loss-average", type=click.Choice(["token", "example"]),
              help="example (default): every example weighs the same, so a fast verdict weighs as much as a "
                   "whole reason example; token: every target token weighs the same (a long reason target "
                   "then outweighs many fast verdicts).")
@click.option("--distill", metavar="self|TEACHER",
              help="Train the fast verdict on a teacher guard's reason-mode verdicts (TEACHER: a guard directory "
                   "or hub id; self: --base, itself a reasoning guard); the other examples keep the data's labels. "
                   "The verdicts go to OUTPUT/distill_labels.jsonl.")
@click.option("--lr-scheduler", help="Learning-rate schedule: cosine (default), linear, constant ...")
@click.option("--save-steps", type=click.IntRange(1), help="Write a checkpoint every N steps (default 500).")
@click.option("--save-total-limit", type=click.IntRange(1), help="Keep at most N checkpoints (default 2).")
@click.option("--logging-steps", type=click.IntRange(1), help="Log the loss every N steps (default 10).")
@click.option("--seed", type=int, help="Seed for data order, dropout and adapter init (default 0).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward pass (less memory, slower).")
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 mixed precision (GPU only).")
@click.option("--freeze-vision/--no-freeze-vision", default=None, help="full trainer: keep the vision tower fixed.")
@click.option("--lora-r", type=click.IntRange(1), help="LoRA rank (default 16).")
@click.option("--lora-alpha", type=click.IntRange(1), help="LoRA alpha (default 32).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), help="LoRA dropout (default 0.05).")
@click.option("--lora-target", help="Regex of module names to adapt (default: the language model's projections).")
@click.option("--merge/--no-merge", default=None,
              help="lora: also write a merged plain checkpoint to --output (adapter in OUTPUT/adapter).")
@click.option("--max-length", type=click.IntRange(16), help="Cut targets so examples fit N tokens.")
@click.option("--limit", type=click.IntRange(1), help="Use only the first N records.")
@click.option("--eval-data", type=click.Path(exists=True), help="Held-out data: report fast-mode accuracy after training.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto (default): CUDA when available.")
@click.option("--deepspeed", type=click.Path(exists=True, dir_okay=False), help="DeepSpeed JSON config.")
@click.option("--fsdp", help='FSDP mode for the HF Trainer, e.g. "full_shard auto_wrap".')
@click.option("--fsdp-config", type=click.Path(exists=True, dir_okay=False), help="FSDP JSON config file.")
@click.option("--num-workers", type=click.IntRange(0), help="Data-loader worker processes (default 0).")
@click.option("--cpu-threads", type=click.IntRange(1), help="torch threads per process on the CPU (1 is best on a busy machine).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML/JSON file with any of these options (snake_case or dashed keys); flags override it.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the last complete checkpoint in OUTPUT.")
@click.option("--overwrite", is_flag=True, default=None, help="Discard earlier checkpoints in OUTPUT and start over.")
@click.pass_context
def train(ctx: click.Context, config_file: str | None, **options: Any) -> None:
    """Fine-tune a guard model on MIS-format data (full or LoRA), on one process or many.

    The guard objective trains the exact prompt visguard uses at inference (fast mode: the verdict
    first; reason mode: perception and reasoning first, for records that carry reasoning), so the
    result loads with `Guard.from_pretrained(OUTPUT)` / `visguard check --model OUTPUT`.
    """
    if ctx.invoked_subcommand is not None:
        return
    explicit = {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    file_values = read_config_file(config_file) if config_file else {}
    config = build_config(file_values, explicit)
    config.require_paths()

    from visguard_train.run import run_training

    result = run_training(config)
    _end_process_group()
    if int(_env("RANK", "0")) != 0:
        return
    click.echo(
        f"visguard train: {result.global_step} steps, {result.num_examples} examples, "
        f"{result.trainable_parameters:,}/{result.num_parameters:,} parameters trained, "
        f"{result.train_seconds:.1f} s" + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
    )
    if config.trainer == "lora" and not config.merge:
        click.echo(f"LoRA adapter saved to {result.output}; merge it with: visguard train merge {result.output} -o DIR")
    else:
        click.echo(f"Model saved to {result.output}; use it with: visguard check --model {result.output} IMAGES -t TEXT")


@train.command("merge")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Where the merged checkpoint goes.")
@click.option("--base", help="Base model (default: the one recorded in the adapter).")
def merge(adapter: str, output: str, base: str | None) -> None:
    """Merge a LoRA ADAPTER directory into its base model, writing a plain checkpoint to --output."""
    from visguard_train.methods import merge_adapter

    path = merge_adapter(adapter, output, base=base)
    click.echo(f"Merged checkpoint saved to {path}")


def _end_process_group() -> None:
    """Tear down a launcher's process group before this process exits (every rank, after training).

    Left to interpreter shutdown, gloo's worker threads were once still joinable when the group was
    destroyed, and a rank aborted ("terminate called without an active exception", SIGABRT) after
    the model had been saved, failing the launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _env(name: str, default: str) -> str:
    import os

    return os.environ.get(name, default)
