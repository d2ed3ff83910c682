"""Pytest fixtures for visguard and its plugins' test suites: tiny local checkpoints of real VLM
architectures (built once per machine, cached), one-thread torch, small images.

A suite's ``conftest.py`` takes them with ``from visguard_testing.fixtures import *``. Importing this
module also pins the test environment: offline Hugging Face, and the plugins a suite sees (the
built-in ones and this repository's own distributions, nothing else a machine happens to have
installed; a test that needs another plugin registers it itself with ``plugins.pm.register``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["VISGUARD_LOAD_PLUGINS"] = "visguard-testing,visguard-train,visguard-demo,visguard-nsfw,visguard-bench"

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = ["images", "internvl_path", "mis_item", "one_torch_thread", "qwen_path", "tiny_arch", "tiny_cache"]


@pytest.fixture(scope="session")
def tiny_cache() -> str | None:
    """Where tiny checkpoints are cached (None: $VISGUARD_CACHE or ~/.cache/visguard/tiny).

    Checkpoints are keyed by builder version and arguments, so a cache hit is always current.
    """
    return None


@pytest.fixture(scope="session", params=["qwen2_vl", "llava", "idefics3"])
def tiny_arch(request, tiny_cache) -> tuple[str, str]:
    """(arch, path) of a tiny random-weight checkpoint, for each supported architecture."""
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    return request.param, str(cached_tiny_checkpoint(request.param, cache_dir=tiny_cache))


@pytest.fixture(scope="session")
def qwen_path(tiny_cache) -> str:
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    return str(cached_tiny_checkpoint("qwen2_vl", cache_dir=tiny_cache))


@pytest.fixture(scope="session")
def internvl_path(tiny_cache) -> str:
    """A tiny HF-format InternVL checkpoint (``InternVLForConditionalGeneration``, real conversion-script template)."""
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    return str(cached_tiny_checkpoint("internvl", cache_dir=tiny_cache))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread, above all on a shared, busy CPU.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mis_item(tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """``(item, root)``: an unsafe item of a synthetic MIS-hard split (64 px images) and its test root."""
    from visguard_testing.synthetic import write_mis_test_layout

    root = write_mis_test_layout(tmp_path_factory.mktemp("mis"), {"hard": 4}, size=64)
    items = json.loads((root / "mis_hard.json").read_text())
    return next(it for it in items if it["label"] == "unsafe"), root


@pytest.fixture
def images() -> list[Image.Image]:
    """Three small distinct RGB images."""
    return [Image.new("RGB", (48, 40), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
