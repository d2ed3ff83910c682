"""Fixtures of the vLLM plugin's tests (run in .venv-vllm by `make test`): a tiny Qwen2-VL checkpoint
and the transformers backend on it as the reference the vLLM paths must match."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def qwen_path(tmp_path_factory) -> str:
    """A tiny random-weight Qwen2-VL checkpoint (text head_dim 32, which vLLM's CPU attention accepts)."""
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    cache = os.environ.get("VISGUARD_CACHE") or str(tmp_path_factory.mktemp("tiny-ckpt"))
    return str(cached_tiny_checkpoint("qwen2_vl", cache_dir=cache))


@pytest.fixture(scope="session")
def reference(qwen_path):
    """The transformers guard on the same checkpoint, float32 on CPU."""
    from visguard import Guard

    guard = Guard.from_pretrained(qwen_path, backend="transformers", device="cpu", dtype="float32")
    yield guard
    guard.close()


@pytest.fixture
def images() -> list[Image.Image]:
    """Two distinct images of different sizes (a pre/post pair shares them)."""
    a = Image.new("RGB", (64, 48), (200, 30, 30))
    b = Image.new("RGB", (40, 72), (30, 60, 200))
    for x in range(0, 40, 4):  # some structure, so the vision tower sees more than a flat colour
        b.putpixel((x, x), (255, 255, 0))
    return [a, b]
