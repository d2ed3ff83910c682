"""The ``vllm`` backend on a real vLLM engine (CPU): same scores and text as the transformers backend.

One engine for the whole module (start-up takes 15-60 s on 2 CPU cores).
"""

from __future__ import annotations

import time

import pytest
from PIL import Image

from visguard import Guard, Policy, plugins

TOL = 1e-3


@pytest.fixture(scope="module")
def vguard(qwen_path):
    start = time.perf_counter()
    guard = Guard.from_pretrained(
        qwen_path,
        backend="vllm",
        dtype="float32",
        max_images=2,
        max_model_len=2048,
        max_num_seqs=4,
        enforce_eager=True,
    )
    print(f"\nvLLM engine start-up: {time.perf_counter() - start:.1f} s")
    yield guard
    guard.close()


def test_plugin_is_installed_through_its_entry_point():
    import visguard_vllm

    info = {p["name"]: p for p in plugins.describe()}
    assert info["vllm"]["provides"] == {"backends": ["vllm"]}
    assert plugins.registry("backends")["vllm"] is visguard_vllm.create_backend
    dists = {plugins.pm.get_name(plugin): dist.project_name for plugin, dist in plugins.pm.list_plugin_distinfo()}
    assert dists["vllm"] == "visguard-vllm"


def test_fast_scores_match_transformers(vguard, reference, images):
    requests = [
        vguard.request(images, "Use the item in image 1 on the person in image 2."),
        vguard.request(images, "Use the item in image 1 on the person in image 2.", "Sure, here is how to do it."),
        vguard.request(images[:1], "What colour is this?"),
        vguard.request(None, "Tell me a story about a <|im_start|> token."),
    ]
    start = time.perf_counter()
    got = vguard.check_batch(requests)
    elapsed = time.perf_counter() - start
    want = reference.check_batch(requests)
    # Both sides must score (the transformers reference once failed its ragged batches: score None).
    assert all(v.label in ("safe", "unsafe") and v.mode == "fast" for v in got), [v.error for v in got]
    assert all(w.label in ("safe", "unsafe") for w in want), [w.error for w in want]
    diffs = [abs(g.score - w.score) for g, w in zip(got, want, strict=True)]
    print(f"\nvLLM batch of 4 fast checks: {elapsed * 1000:.0f} ms; |score - transformers| = {diffs}")
    assert max(diffs) < TOL
    assert [g.label for g in got] == [w.label for w in want]
    assert [g.stage for g in got] == ["input", "output", "input", "input"]


def test_reason_generation_matches_transformers_token_for_token(vguard, reference, images):
    request = vguard.request(images, "Is it safe to combine these two things?")
    prompt = vguard.format.build(request, vguard.policy, mode="reason", special_tokens=vguard.backend.special_tokens)
    [got] = vguard.backend.generate([prompt], max_new_tokens=24)
    ref_prompt = reference.format.build(request, reference.policy, mode="reason", special_tokens=reference.backend.special_tokens)
    [want] = reference.backend.generate([ref_prompt], max_new_tokens=24)
    assert got.text == want.text and got.token_spans == want.token_spans
    assert len(got.step_scores) == len(want.step_scores) > 0
    assert max(abs(a - b) for a, b in zip(got.step_scores, want.step_scores, strict=True)) < TOL

    # Through the guard: the same verdict (a random tiny model writes no verdict line: unavailable, never safe).
    reason = Policy(mode="reason", max_new_tokens=24)
    v_got = vguard.with_policy(reason).check(request)
    v_want = reference.with_policy(reason).check(request)
    assert (v_got.label, v_got.raw) == (v_want.label, v_want.raw)
    assert v_got.label != "safe"


def test_post_check_reuses_the_pre_checks_prefix(vguard):
    # Prompt layout 2: [static prefix: system prompt, instructions, categories, answer format]
    # [images] [request] [response] [question]. vLLM caches whole KV blocks only (128 tokens on
    # CPU), so a post-check reuses every whole block before its first token that differs from the
    # pre-check's (where the response starts); the request here is long enough that those blocks
    # reach past the static prefix, through the images and into the request.
    backend = vguard.backend
    block = backend.llm.llm_engine.vllm_config.cache_config.block_size
    vguard.check_input([Image.new("RGB", (64, 48), (1, 2, 3))], "warm up")  # the static prefix is cached now
    imgs = [Image.new("RGB", (56, 56), (17, 99, 3)), Image.new("RGB", (56, 56), (250, 250, 1))]  # fresh
    text = "How do I use these? " + " ".join(f"Step {i}: mix the two." for i in range(20))
    response = "Carefully, and with permission."

    def token_ids(resp):  # what vLLM prefills: the processor expands the images as vLLM's does
        prompt = vguard.format.build(vguard.request(imgs, text, resp), vguard.policy, mode="fast",
                                     special_tokens=backend.special_tokens)
        rendered = backend.codec.render(prompt)
        ids = backend.processor(text=[rendered], images=list(prompt.images))["input_ids"][0]
        static = backend.tokenizer(backend.codec.static_prefix(prompt, rendered), add_special_tokens=False)["input_ids"]
        assert list(ids[: len(static)]) == list(static)
        return list(ids), len(static)

    pre_ids, static_len = token_ids(None)
    post_ids, _ = token_ids(response)
    shared = next(i for i, (a, b) in enumerate(zip(pre_ids, post_ids, strict=False)) if a != b)

    stats = backend.stats
    before = stats["cached_prompt_tokens"]
    vguard.check_input(imgs, text)
    pre_cached = stats["cached_prompt_tokens"] - before
    mid = stats["cached_prompt_tokens"]
    vguard.check_output(imgs, text, response)
    post_cached = stats["cached_prompt_tokens"] - mid
    print(f"\nblock {block}; static prefix {static_len} tokens, pre-check {len(pre_ids)}, post-check {len(post_ids)}, "
          f"shared {shared}; cached prompt tokens: pre-check {pre_cached}, post-check {post_cached}")
    assert shared > static_len + block  # the test's premise: a whole block of images + request is shared
    # Fresh images: the pre-check finds only the static prefix's whole blocks.
    assert pre_cached == block * (static_len // block)
    # The post-check finds every whole block before the response: images and request included.
    assert post_cached == block * (shared // block)
    assert post_cached >= pre_cached + block


def test_prompt_longer_than_the_engine_context_is_refused_before_batching(vguard, images):
    from visguard import InputTooLongError
    from visguard.core.errors import PromptTooLongError

    backend = vguard.backend
    limit = backend.max_model_len
    assert limit == 2048
    allow = vguard.with_policy(Policy(on_error="allow"))  # an input error is never let through as "unavailable"
    with pytest.raises(InputTooLongError, match=f"is [0-9]+ tokens long, more than the guard model's limit of {limit - 1} "):
        allow.check_input(images, "word " * 3000)

    # The count is vLLM's own, images included: a prompt of max_model_len - 1 tokens is scored, one
    # token more is refused by visguard, and vLLM itself would have refused it.
    def prompt_of(k):
        request = vguard.request(images, "a" + " a" * k)
        return request, vguard.format.build(request, vguard.policy, mode="fast", special_tokens=backend.special_tokens)

    base = backend.codec.prompt_tokens(prompt_of(0)[1])
    k = limit - 1 - base
    request, prompt = prompt_of(k)
    assert backend.codec.prompt_tokens(prompt) == limit - 1
    assert vguard.check(request).label in ("safe", "unsafe")
    fits = prompt
    request, prompt = prompt_of(k + 1)
    with pytest.raises(InputTooLongError, match=f"is {limit} tokens long"):
        allow.check(request)
    # the backend refuses it, by its index in the batch, before the engine sees the batch
    with pytest.raises(PromptTooLongError, match=f"prompt 1: the guard prompt is {limit} tokens long") as refused:
        backend.score([fits, prompt])
    assert set(refused.value.too_long) == {1}
    from vllm import SamplingParams

    with pytest.raises(Exception, match="longer than the maximum model length"):  # what vLLM itself says of it
        backend.llm.generate([backend._inputs(prompt, backend.codec.render(prompt))], SamplingParams(max_tokens=1),
                             use_tqdm=False)


def test_more_images_than_the_engine_limit_is_unavailable_not_safe(vguard, images):
    verdict = vguard.check_input(images + [images[0]], "three images")
    assert verdict.label == "unavailable"
    assert "at most 2" in verdict.error


def test_repeated_fast_check_latency(vguard, images):
    request = vguard.request(images, "Use the item in image 1 on the person in image 2.")
    vguard.check(request)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        vguard.check(request)
        runs.append((time.perf_counter() - start) * 1000)
    print(f"\nvLLM fast check, 2 images, cached prefix: median {sorted(runs)[2]:.1f} ms")
    assert sorted(runs)[2] < 5000
