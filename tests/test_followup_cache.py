"""Reason mode's follow-up verdict continues from its generation's own key/value cache.

A format such as ``mirage`` lets the guard write its answer, then scores a verdict question asked
after that answer. The transformers backend keeps each generated row's cache (prompt + the tokens fed
back) in its prefix store, so the follow-up forward computes only what follows the answer, and the
scores equal those computed with every cache off.
"""

from __future__ import annotations

import pytest
from PIL import Image

from visguard import Guard, Policy
from visguard.default_plugins.mirage_format import MirageFormat
from visguard.default_plugins.transformers_backend import TransformersBackend

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 200, 30))]
#: prompts of three lengths: a batch of them is ragged (left-padded generation, right-padded follow-ups)
TEXTS = ["How do I use this on that?", "hi", "What is in the pictures, and what do they show together?"]
MAX_NEW = 12
QWEN2_TOKENIZERS = ("qwen2_vl", "internvl")


def _guard(arch: str, path: str, *, kv_cache_mb: float = 256, clean: bool = True, fmt: MirageFormat | None = None) -> Guard:
    backend = TransformersBackend(path, device="cpu", kv_cache_mb=kv_cache_mb)
    if clean:
        _write_clean_answers(arch, backend)
    fmt = fmt or MirageFormat("internvl_hf" if arch == "internvl" else "qwen2_vl")
    return Guard(backend, fmt, Policy(mode="reason", max_new_tokens=MAX_NEW))


def _write_clean_answers(arch: str, backend: TransformersBackend) -> None:
    """Let the random-weight model write only tokens whose answer text re-tokenises to the same ids in
    the follow-up prompt (a trained guard writes words; random weights write byte pieces and
    whitespace that the follow-up's chat template and ``strip()`` turn into other ids): single
    digits under the Qwen2 pre-tokenizer (every digit is its own piece; the answer follows
    ``assistant\\n``), whole words with their leading space under the Llama-3 one (LLaVA's and
    Idefics3's templates put a space before the answer), and the template's own end of turn. Through
    the checkpoint's own generation config (``suppress_tokens``, ``min_new_tokens``), as a real
    checkpoint would set it."""
    tok = backend.tokenizer
    vocab = tok.get_vocab()
    if arch in QWEN2_TOKENIZERS:
        good = sorted(i for t, i in vocab.items() if len(t) == 1 and t.isascii() and t.isdigit())
    else:
        words = sorted(i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha())
        good = [i for i in words if tok.decode([i]).strip() and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]][:40]
    config = backend.model.generation_config
    vocab_size = backend.model.config.get_text_config().vocab_size
    # the one stop token is the end of turn the chat template writes after an answer
    config.suppress_tokens = [i for i in range(vocab_size) if i not in {*good, tok.eos_token_id}]
    config.min_new_tokens = 3  # (Idefics3's random weights end every answer at once otherwise)


def _ids(backend: TransformersBackend, prompt) -> list[int]:
    out = backend.processor(text=[backend.render(prompt)], images=[list(prompt.images)], return_tensors="pt")
    return out["input_ids"][0].tolist()


def _expected(guard: Guard, requests: list, *, exact: bool = True) -> list[dict[str, int]]:
    """Per request: generation prompt tokens, answer tokens, follow-up prompt tokens (``exact``: the
    follow-up checked to extend the generation prompt and the answer's own ids)."""
    backend, fmt = guard.backend, guard.format
    specials = backend.special_tokens
    prompts = [fmt.build(r, guard.policy, mode="reason", special_tokens=specials) for r in requests]
    out = []
    for request, prompt, gen in zip(requests, prompts, backend.generate(prompts, max_new_tokens=MAX_NEW), strict=True):
        followup = fmt.followup(request, guard.policy, gen.text, special_tokens=specials)
        head, full = _ids(backend, prompt), _ids(backend, followup)
        answer = backend.tokenizer(gen.text, add_special_tokens=False)["input_ids"]
        n = len(gen.token_spans)
        # the follow-up is a token-exact extension of the generated sequence
        assert full[: len(head)] == head
        assert not exact or (len(answer) == n and full[len(head) : len(head) + n] == answer)
        out.append({"prompt": len(head), "answer": n, "followup": len(full), "stopped": n < MAX_NEW})
    return out


def _delta(guard: Guard, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in guard.backend.cache_stats.items()}


def _assert_followups_continue_from_generation(arch: str, path: str) -> None:
    plain = _guard(arch, path, kv_cache_mb=0)
    requests = [plain.request(IMAGES, t) for t in TEXTS]
    expected_one = [plain.check(r).score for r in requests]
    expected_batch = [v.score for v in plain.check_batch(requests)]
    sizes = _expected(plain, requests)
    assert any(s["answer"] >= 2 for s in sizes)  # the guard wrote answers to continue from

    cached = _guard(arch, path)
    for request, size, want in zip(requests, sizes, expected_one, strict=True):
        before = dict(cached.backend.cache_stats)
        verdict = cached.check(request)
        delta = _delta(cached, before)
        assert verdict.score == pytest.approx(want, abs=1e-4)
        assert delta["generations_kept"] == 1 and delta["prompt_hits"] == 1
        assert delta["computed_tokens"] == _followup_tokens_computed([size])
        assert delta["reused_tokens"] == size["followup"] - delta["computed_tokens"]

    batch = _guard(arch, path)  # fresh store: the batch continues from its own batched generation
    before = dict(batch.backend.cache_stats)
    got = [v.score for v in batch.check_batch(requests)]
    delta = _delta(batch, before)
    assert got == pytest.approx(expected_batch, abs=1e-4)
    assert delta["generations_kept"] == 3 and delta["prompt_hits"] == 3
    assert delta["computed_tokens"] == _followup_tokens_computed(sizes)
    assert delta["reused_tokens"] == sum(s["followup"] for s in sizes) - delta["computed_tokens"]
    if arch == "idefics3":  # rows that stopped early while the batch went on are covered
        assert len({s["stopped"] for s in sizes}) == 2


def _followup_tokens_computed(sizes: list[dict]) -> int:
    """Tokens a batch of follow-ups computes after the generation batch they follow: what follows each
    answer, less what generation fed back after it. Generation feeds back every token but the last
    one of the batch: a row that stopped while the batch went on fed its end-of-turn token (the
    template's next token), a row that ran to the token limit did not feed its last answer token."""
    steps = max(s["answer"] + s["stopped"] for s in sizes)
    return sum(s["followup"] - s["prompt"] - min(s["answer"] + s["stopped"], steps - 1) for s in sizes)


def test_followup_continues_from_generation_cache(tiny_arch):
    _assert_followups_continue_from_generation(*tiny_arch)


def test_followup_continues_from_generation_cache_on_hf_internvl(internvl_path):
    _assert_followups_continue_from_generation("internvl", internvl_path)


class _RewordedMirage(MirageFormat):
    """A follow-up that does not quote the guard's answer token for token."""

    def followup(self, request, policy, generated, *, special_tokens=()):
        return super().followup(request, policy, "My answer was: " + generated, special_tokens=special_tokens)


def test_followup_that_is_no_token_exact_extension_is_scored_whole_after_the_prompt(qwen_path):
    plain = _guard("qwen2_vl", qwen_path, kv_cache_mb=0, fmt=_RewordedMirage())
    cached = _guard("qwen2_vl", qwen_path, fmt=_RewordedMirage())
    request = plain.request(IMAGES, TEXTS[0])
    size = _expected(cached, [request], exact=False)[0]
    assert size["answer"] >= 2
    before = dict(cached.backend.cache_stats)
    assert cached.check(request).score == pytest.approx(plain.check(request).score, abs=1e-4)
    delta = _delta(cached, before)
    # reuse stops where the tokens part: the generation prompt is reused, the answer and question computed
    assert delta["reused_tokens"] == size["prompt"]
    assert delta["computed_tokens"] == size["followup"] - size["prompt"]


def test_unconstrained_random_answers_are_scored_exactly(qwen_path):
    """Random weights write byte pieces and whitespace that re-tokenise otherwise: reuse covers only the
    common prefix, and the scores are the uncached ones."""
    plain = _guard("qwen2_vl", qwen_path, kv_cache_mb=0, clean=False)
    cached = _guard("qwen2_vl", qwen_path, clean=False)
    requests = [plain.request(IMAGES, t) for t in TEXTS]
    assert [cached.check(r).score for r in requests] == pytest.approx([plain.check(r).score for r in requests], abs=1e-4)
    assert cached.backend.cache_stats["generations_kept"] == 3


def test_generation_caches_respect_the_store_bound(qwen_path):
    """A store with room for two of the three generation caches of a batch evicts the oldest; the batch
    of follow-ups, one row without a cached prefix, shares no row cache and is still scored exactly."""
    plain = _guard("qwen2_vl", qwen_path, kv_cache_mb=0)
    small = _guard("qwen2_vl", qwen_path, kv_cache_mb=0.06)  # 120 tokens of this model's keys and values (512 bytes each)
    pairs = [IMAGES, IMAGES[::-1], [IMAGES[0], Image.new("RGB", (64, 64), (30, 30, 200))]]  # no shared prefix with images
    requests = [plain.request(images, t) for images, t in zip(pairs, TEXTS, strict=True)]
    assert [v.score for v in small.check_batch(requests)] == pytest.approx([v.score for v in plain.check_batch(requests)], abs=1e-4)
    store, stats = small.backend.kv_cache, small.backend.cache_stats
    assert stats["generations_kept"] == 3 and stats["prompt_hits"] == 0  # the first row's cache was evicted
    assert 0 < store.nbytes <= store.max_bytes
