"""visguard-train: fine-tune guard models for visguard (the ``visguard train`` command).

Python API (the CLI is a thin layer over it)::

    from visguard_train import build_config, run_training
    result = run_training(build_config(flag_values={"data": "d.jsonl", "base": "ckpt", "output": "out"}))

Heavy libraries (torch, transformers, peft) are imported only when a run starts.
"""

from __future__ import annotations

from typing import Any

from visguard_train.config import PRESETS, TrainConfig, build_config, read_config_file
from visguard_train.data import DatasetError, DatasetLoader, TrainRecord, detect_format, load_records

__all__ = [
    "PRESETS",
    "DatasetError",
    "DatasetLoader",
    "TrainConfig",
    "TrainRecord",
    "TrainResult",
    "build_config",
    "detect_format",
    "evaluate_guard",
    "load_records",
    "merge_adapter",
    "read_config_file",
    "run_training",
]

_LAZY = {
    "TrainResult": "visguard_train.run",
    "run_training": "visguard_train.run",
    "evaluate_guard": "visguard_train.run",
    "merge_adapter": "visguard_train.methods",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'visguard_train' has no attribute {name!r}")
