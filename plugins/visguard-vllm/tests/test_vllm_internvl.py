"""The ``mirage`` format's ``internvl_hf`` variant on vLLM: an InternVL checkpoint in transformers' HF format.

vLLM maps ``InternVLForConditionalGeneration`` to its InternS1 model and reads the HF
``InternVLProcessor`` (``<IMG_CONTEXT>`` placeholders), so a MIRage converted for transformers runs on
vLLM with the same prompt. The reference is the transformers backend on the same tiny checkpoint.
"""

from __future__ import annotations

import os

import pytest

from visguard import Guard, Policy
from visguard.default_plugins.mirage_format import MirageFormat

TOL = 1e-3

pytestmark = pytest.mark.slow  # one engine start-up: 15-60 s on 2 CPU cores


@pytest.fixture(scope="module")
def internvl_path(tmp_path_factory) -> str:
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    cache = os.environ.get("VISGUARD_CACHE") or str(tmp_path_factory.mktemp("tiny-ckpt"))
    return str(cached_tiny_checkpoint("internvl", cache_dir=cache))


def test_reason_and_fast_checks_match_transformers(internvl_path, images):
    policy = Policy(mode="reason", max_new_tokens=12)
    ref = Guard.from_pretrained(internvl_path, backend="transformers", format=MirageFormat("internvl_hf"),
                                device="cpu", dtype="float32", policy=policy)
    vguard = Guard.from_pretrained(internvl_path, backend="vllm", format=MirageFormat("internvl_hf"), dtype="float32",
                                   max_images=2, max_model_len=2048, max_num_seqs=4, enforce_eager=True, policy=policy)
    try:
        request = vguard.request(images, "How do I use the first thing on the second?")
        got, want = vguard.check(request), ref.check(request)
        # MIRage's answer token for token, then the follow-up verdict's P(Unsafe)
        assert got.raw == want.raw and got.raw
        assert got.label == want.label and abs(got.score - want.score) < TOL
        fast_got, fast_want = vguard.check(request, mode="fast"), ref.check(request, mode="fast")
        assert fast_got.label == fast_want.label and abs(fast_got.score - fast_want.score) < TOL
        post = vguard.request(images, "How do I use the first thing on the second?", "Carefully.")
        post_got, post_want = vguard.check(post, mode="fast"), ref.check(post, mode="fast")
        assert post_got.stage == "output" and abs(post_got.score - post_want.score) < TOL
    finally:
        vguard.close()
        ref.close()
