"""Test and demo fixtures for visguard and its plugins: no weights or data are downloaded.

- :mod:`visguard_testing.checkpoints`: tiny random-weight checkpoints of real VLM architectures with
  locally trained tokenizers and the real processor classes and chat templates.
- :mod:`visguard_testing.synthetic`: deterministic synthetic two-image data (each image benign
  alone) in the MIS test/train layouts and visguard JSONL.

A separate distribution (``plugins/visguard-testing``) so that production installs of visguard do
not carry them; the dev set-up and the demo install it. Importing this package is cheap: torch and
transformers are imported only when a checkpoint is built.
"""

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
