"""Test helpers for visguard (tiny random-weight VLM checkpoints, etc.).

Nothing here is imported by the runtime package; importing this subpackage is cheap
(torch and transformers are only imported when a checkpoint is actually built).
"""

from visguard.testing.checkpoints import (
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
