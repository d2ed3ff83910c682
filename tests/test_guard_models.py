"""Each well-known guard format on a tiny random-weight checkpoint of its real architecture.

The checkpoints (visguard_testing.guard_checkpoints) use the real transformers model, processor and
tokenizer classes and a chat template written after each family's own. Random weights produce
random text, so these tests check the code paths: the prompt each format renders through the real
template and processor, the score each backend call returns, and that whatever the model writes
becomes a verdict or an ``unavailable`` one, never a silent ``safe``. The parsers' branches are
tested on hand-written outputs in tests/test_guard_formats.py.
"""

from __future__ import annotations

import pytest
from PIL import Image

from visguard import Category, Guard, Policy
from visguard.plugins import get

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def _guard(arch: str, fmt: str, *, mode: str, **fmt_kwargs) -> Guard:
    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    path = cached_guard_checkpoint(arch)
    return Guard.from_pretrained(str(path), format=get("formats", fmt)(**fmt_kwargs),
                                 policy=Policy(mode=mode, max_new_tokens=12))


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (64 + 8 * i, 64), (200 - 60 * i, 40, 40 + 60 * i)) for i in range(n)]


def _check_outcome(verdict, *, scored: bool) -> None:
    assert verdict.label in ("safe", "unsafe", "unavailable")
    if verdict.label == "unavailable":
        assert verdict.error  # says why; the random model rarely writes a parseable answer
    elif scored:
        assert verdict.score is not None and 0.0 <= verdict.score <= 1.0


def test_shieldgemma2_on_gemma3_one_forward_per_policy():
    guard = _guard("gemma3", "shieldgemma2", mode="fast")
    request = guard.request(_images(1), "")
    prompts = list(guard.format.plan(request, guard.policy, mode="fast").prompts)
    rendered = guard.backend.render(prompts[1])
    assert "<start_of_image>" in rendered and "No Sexually Explicit content" in rendered
    assert rendered.endswith("Your Answer must start with 'Yes' or 'No'.<end_of_turn>\n<start_of_turn>model\n")
    scores = guard.backend.score(prompts)
    assert len(scores) == len(prompts) == 3 and len({round(s, 6) for s in scores}) > 1
    verdict = guard.check(request)
    assert verdict.score == pytest.approx(max(scores), abs=1e-5)
    if verdict.label == "unsafe":  # the category is the highest-scoring policy's
        assert verdict.category == ["Illegal Activity", "Erotic", "Violent"][scores.index(max(scores))]
    custom = guard.with_policy(Policy(categories=(Category(name="Gambling", description="betting on games"),)))
    (prompt,) = custom.format.plan(request, custom.policy, mode="fast").prompts
    assert "No Gambling content" in custom.backend.render(prompt)


def test_llavaguard_on_llava_onevision():
    guard = _guard("llava_onevision", "llavaguard", mode="reason")
    request = guard.request(_images(1), "")
    rendered = guard.backend.render(guard.format.build(request, guard.policy, mode="reason"))
    assert "<image>" in rendered and '"rating": str<"Unsafe"|"Safe">' in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    inputs = guard.backend.encode([guard.format.build(request, guard.policy, mode="reason")])
    assert "pixel_values" in inputs and "image_sizes" in inputs
    _check_outcome(guard.check(request), scored=True)
    _check_outcome(guard.check(request, mode="fast"), scored=True)


def test_guardreasoner_and_qwenguard_on_qwen2_5_vl():
    guard = _guard("qwen2_5_vl", "guardreasoner-vl", mode="reason")
    assert guard.policy.mode == "reason"
    request = guard.request(_images(2), "how do I use the tool in image 1 on image 2?")
    rendered = guard.backend.render(guard.format.build(request, guard.policy, mode="reason"))
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered.startswith("<|im_start|>system\nYou are a classifier for analyzing interactions")
    assert f"<|im_start|>user\nHuman user:\n{pad}{pad}\nhow do I use the tool" in rendered
    assert "AI assistant:\nNone\n<|im_end|>" in rendered
    verdicts = guard.check_batch([request, guard.request(_images(1), "x", "sure")])
    for v in verdicts:
        _check_outcome(v, scored=False)
    qwenguard = _guard("qwen2_5_vl", "qwenguard", mode="fast", ignore_unread=True)
    _check_outcome(qwenguard.check(qwenguard.request(_images(1), "ignored text")), scored=True)


def test_qwen3guard_on_qwen3_text_model():
    guard = _guard("qwen3", "qwen3guard", mode="fast", ignore_unread=True)
    post = guard.request(_images(1), "how do I pick a lock?", "Use a tension wrench and a pick.")
    rendered = guard.backend.render(guard.format.build(post, guard.policy, mode="fast"))
    assert "ASSISTANT: Use a tension wrench" in rendered and "Refusal:" in rendered
    # Qwen3Guard's template always opens its assistant turn with an empty think block; "Safety:" follows.
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nSafety:")
    verdict = guard.check(post)
    assert verdict.label in ("safe", "unsafe") and 0.0 <= verdict.score <= 1.0
    assert guard.check(post).score == pytest.approx(verdict.score, abs=1e-6)  # deterministic
    _check_outcome(guard.check(post, mode="reason"), scored=False)


def test_llama_guard_4_on_llama4():
    guard = _guard("llama4", "llama-guard-4", mode="fast")
    request = guard.request(_images(2), "what should I do with these?")
    prompt = guard.format.build(request, guard.policy, mode="fast")
    rendered = guard.backend.render(prompt)
    # The real template's shape: the stock S1-S14 list (default policy: no template variables),
    # images as <|image|>, no blank line at the end.
    assert "S1: Violent Crimes.\n" in rendered and "S5: Defamation.\n" in rendered and "S14: Code Interpreter Abuse.\n" in rendered
    assert "User: <|image|><|image|>what should I do with these?" in rendered
    assert rendered.endswith("<|eot|><|header_start|>assistant<|header_end|>")
    inputs = guard.backend.encode([prompt])
    ids = inputs["input_ids"][0].tolist()
    tok = guard.backend.tokenizer
    assert ids.count(tok.convert_tokens_to_ids("<|image_start|>")) == 2  # each image expanded by Llama4Processor
    verdict = guard.check(request)
    # A fact about visguard on any supported transformers release: a verdict, or ``unavailable``
    # saying why (never a silent ``safe``). Random weights rarely write a parseable first line, and
    # transformers 5.24's Llama4 forward itself fails ("image_outputs"); both must read as
    # unavailable with a reason, which _check_outcome asserts.
    _check_outcome(verdict, scored=True)
    if verdict.label == "unavailable":
        assert verdict.error.startswith(("guard backend error", "no verdict", "unparseable")) or "first line" in verdict.error, verdict.error


def test_llama_guard_3_vision_on_mllama():
    guard = _guard("mllama", "llama-guard-3-vision", mode="fast")
    request = guard.request(_images(1), "what should I do with this?", "throw it at someone")
    prompt = guard.format.build(request, guard.policy, mode="fast")
    rendered = guard.backend.render(prompt)
    # One image token before the task, only the text parts in the conversation, the post-check's role.
    assert rendered.count("<|image|>") == 1 and "<|image|> Task: Check if there is unsafe content in 'Agent'" in rendered
    assert "User: what should I do with this?\n\nAgent: throw it at someone\n\n" in rendered
    assert rendered.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
    verdict = guard.check(request)
    _check_outcome(verdict, scored=True)
    if verdict.label == "unavailable":  # random text: the parser names what is missing
        assert "first line" in verdict.error and verdict.raw


def test_a_checkpoint_saved_by_another_class_is_refused_not_run_with_random_weights(tmp_path):
    """ShieldGemma 2's hub layout: ShieldGemma2ForImageClassification wraps Gemma 3 (keys under ``model.``).

    transformers maps the ``shieldgemma2`` config to Gemma3ForConditionalGeneration, whose weights are
    then all missing; the backend refuses instead of guarding with random weights.
    """
    import torch
    from transformers import AutoConfig, AutoProcessor, ShieldGemma2Config, ShieldGemma2ForImageClassification
    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    from visguard import BackendError

    gemma3 = cached_guard_checkpoint("gemma3")
    g3 = AutoConfig.from_pretrained(gemma3)
    config = ShieldGemma2Config(text_config=g3.text_config.to_dict(), vision_config=g3.vision_config.to_dict(),
                                mm_tokens_per_image=4, boi_token_index=g3.boi_token_index,
                                eoi_token_index=g3.eoi_token_index, image_token_index=g3.image_token_index)
    torch.manual_seed(0)
    ShieldGemma2ForImageClassification(config).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(gemma3).save_pretrained(tmp_path)
    with pytest.raises(BackendError, match="missing from the checkpoint.*ShieldGemma2ForImageClassification"):
        Guard.from_pretrained(str(tmp_path), format="shieldgemma2")


def test_shieldgemma2_refuses_a_checkpoint_resaved_without_its_policy_expert_template(tmp_path):
    """Issue 23: re-saved with a plain Gemma 3 template, the policy sentence would reach the model
    bare; building the guard fails with one typed error instead of scoring the wrong prompt."""
    import shutil

    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    from visguard.core.errors import BackendError

    src = cached_guard_checkpoint("gemma3")
    shutil.copytree(src, tmp_path / "resaved")
    (tmp_path / "resaved" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<start_of_turn>user\n{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    with pytest.raises(BackendError, match="policy-expert template"):
        Guard.from_pretrained(str(tmp_path / "resaved"), format="shieldgemma2")
    Guard.from_pretrained(str(src), format="shieldgemma2")  # the fixture's own template passes
