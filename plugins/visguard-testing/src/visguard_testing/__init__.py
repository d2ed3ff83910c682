"""Test and demo fixtures for visguard and its plugins: no weights or data are downloaded.

- :mod:`visguard_testing.checkpoints`: tiny random-weight checkpoints of real VLM architectures with
  locally trained tokenizers and the real processor classes and chat templates.
- :mod:`visguard_testing.synthetic`: deterministic synthetic two-image data (each image benign
  alone) in the MIS test/train layouts and visguard JSONL.
- :mod:`visguard_testing.faults`: the ``faulty`` guard backend, which fails on demand (raise, hang,
  MemoryError, garbage, NaN scores, failed loads) for fault-injection tests. This package is a
  visguard plugin (entry point ``testing``) that registers it.

A separate distribution (``plugins/visguard-testing``) so that production installs of visguard do
not carry them; the dev set-up and the demo install it. Importing this package is cheap: torch and
transformers are imported only when a checkpoint is built.
"""

from typing import Any

from visguard.hookspecs import hookimpl
from visguard_testing.checkpoints import (
    ARCHITECTURES,
    build_tiny_checkpoint,
    build_tiny_tokenizer,
    cached_tiny_checkpoint,
)

__all__ = [
    "ARCHITECTURES",
    "build_tiny_checkpoint",
    "build_tiny_tokenizer",
    "cached_tiny_checkpoint",
]


@hookimpl
def register_backends(register: Any) -> None:
    """The ``faulty`` test backend (see :mod:`visguard_testing.faults`)."""
    from visguard_testing.faults import faulty_backend

    register("faulty", faulty_backend)
