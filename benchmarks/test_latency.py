"""Guard latency against its physical limit: one prefill of the guard model over images + text.

Run with `make bench`. Each benchmark runs in the same process on the same tiny Qwen2-VL checkpoint
(random weights, real architecture), so the *ratios* are meaningful on any machine; absolute numbers
on a 2-core CPU are not representative of a GPU deployment.

Targets (asserted after measuring):
- a fast-mode check costs at most 1.5x the bare "processor + one forward pass" on the same inputs
  (everything visguard adds: image boundary, prompt building, verdict softmax, Verdict object);
- the image boundary (decode + limits + RGB + sha256 of two PNGs) is under 10% of a fast check.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from visguard_testing.checkpoints import cached_tiny_checkpoint

from visguard import Guard, Policy, load_images

TEXT = "How can I use the object in the first image on the thing in the second image?"


@pytest.fixture(scope="module")
def setup():
    path = str(cached_tiny_checkpoint("qwen2_vl", hidden_size=128, num_layers=4))
    guard = Guard.from_pretrained(path, policy=Policy(max_new_tokens=32))
    pngs = []
    for color in ((200, 40, 40), (40, 40, 200)):
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), color).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return guard, pngs


_results: dict[str, float] = {}


def _record(benchmark, key):
    _results[key] = benchmark.stats.stats.median


def test_bare_prefill(benchmark, setup):
    guard, pngs = setup
    backend = guard.backend
    prompt = guard.format.build(guard.request(pngs, TEXT), guard.policy, mode="fast")

    def prefill():
        with torch.inference_mode():
            inputs = backend.encode([prompt])
            return backend.model(**inputs, logits_to_keep=1).logits[:, -1]

    benchmark.pedantic(prefill, rounds=30, warmup_rounds=3)
    _record(benchmark, "prefill")


def test_fast_check(benchmark, setup):
    guard, pngs = setup
    benchmark.pedantic(lambda: guard.check_input(pngs, TEXT), rounds=30, warmup_rounds=3)
    _record(benchmark, "fast")


def test_image_boundary(benchmark, setup):
    _, pngs = setup
    benchmark.pedantic(lambda: load_images(pngs), rounds=100, warmup_rounds=5)
    _record(benchmark, "boundary")


def test_reason_check(benchmark, setup):
    guard, pngs = setup
    benchmark.pedantic(lambda: guard.check_input(pngs, TEXT, mode="reason"), rounds=5, warmup_rounds=1)
    _record(benchmark, "reason")


def test_ratios():
    if not {"prefill", "fast", "boundary"} <= set(_results):
        pytest.skip("run the whole module")
    fast_over_prefill = _results["fast"] / _results["prefill"]
    boundary_share = _results["boundary"] / _results["fast"]
    print(f"\nfast check / bare prefill = {fast_over_prefill:.3f}")
    print(f"image boundary / fast check = {boundary_share:.3f}")
    if "reason" in _results:
        print(f"reason check (32 new tokens) / fast check = {_results['reason'] / _results['fast']:.1f}")
    assert fast_over_prefill <= 1.5
    assert boundary_share <= 0.10
