"""Issue #24 item 8 on the vLLM backend: a prompt's cache salt reaches vLLM's prefix cache.

vLLM 0.32 (``vllm/inputs/llm.py``: a prompt dict's ``cache_salt``) salts the hash of a prompt's
first KV block with it, so prompts of different salts share no block. Counted with
``Backend.diagnostics().reused_tokens`` (vLLM's ``RequestOutput.num_cached_tokens``).
"""

from __future__ import annotations

import pytest
from PIL import Image

from visguard import Guard
from visguard.engine.guard import cache_salt


@pytest.fixture(scope="module")
def vguard(qwen_path):
    guard = Guard.from_pretrained(qwen_path, backend="vllm", dtype="float32", max_images=1, max_model_len=2048,
                                  max_num_seqs=2, enforce_eager=True, block_size=32)
    yield guard
    guard.close()


def test_prompts_of_different_salts_share_no_cached_block(vguard):
    backend = vguard.backend
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    text = "A long question about this picture that two tenants both happen to ask, word for word."

    def reused(salt: str) -> int:
        before = backend.diagnostics().reused_tokens
        with cache_salt(salt):
            verdict = vguard.report_batch([vguard.request(image, text)], mode="fast")[0]
        assert verdict.label in ("safe", "unsafe"), verdict.error
        return backend.diagnostics().reused_tokens - before

    assert backend.diagnostics().caching
    reused("tenant-a")
    assert reused("tenant-a") > 0  # the same tenant: its whole-block prefix from the cache
    assert reused("tenant-b") == 0  # another tenant, the same prompt: no block shared
    assert reused("tenant-b") > 0
