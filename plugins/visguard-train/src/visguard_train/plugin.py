"""visguard plugin entry point: the ``train`` command, the ``full``/``lora`` trainers and the dataset loaders.

Loaded through the ``visguard`` entry-point group. Hooks only register names; torch, transformers
and peft are imported when a run starts.
"""

from __future__ import annotations

from typing import Any

from visguard.hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``visguard train`` (with its ``merge`` subcommand) to the root CLI group."""
    from visguard_train.cli import train

    cli.add_command(train)


@hookimpl
def register_trainers(register: Any) -> None:
    """Register the ``full`` and ``lora`` training methods."""
    from visguard_train.methods import FullFineTuning, LoraFineTuning

    register("full", FullFineTuning)
    register("lora", LoraFineTuning)


@hookimpl
def register_datasets(register: Any) -> None:
    """Register the ``mis-train``, ``mis-test`` and ``jsonl`` data layouts."""
    from visguard_train.data import JsonlLoader, MisTestLoader, MisTrainLoader

    register("mis-train", MisTrainLoader)
    register("mis-test", MisTestLoader)
    register("jsonl", JsonlLoader)
