"""Tests for visguard_testing.checkpoints: tiny random-weight checkpoints of real VLMs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import pathlib

import pytest
from visguard_testing.checkpoints import (
    ARCHITECTURES,
    build_tiny_checkpoint,
    build_tiny_tokenizer,
    cached_tiny_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

# Per-arch expectations: placeholder string in the rendered prompt, image-token count
# per 64x64 image after processor expansion, and the end of the generation prompt.
EXPECT = {
    "qwen2_vl": {
        "placeholder": "<|vision_start|><|image_pad|><|vision_end|>",
        "image_token": "<|image_pad|>",
        "tokens_per_image": 4,
        "gen_suffix": "<|im_start|>assistant\n",
        "processor": "Qwen2VLProcessor",
        "model": "Qwen2VLForConditionalGeneration",
    },
    "llava": {
        "placeholder": "<image>",
        "image_token": "<image>",
        "tokens_per_image": 16,
        "gen_suffix": "ASSISTANT:",
        "processor": "LlavaProcessor",
        "model": "LlavaForConditionalGeneration",
    },
    "idefics3": {
        "placeholder": "<image>",
        "image_token": "<image>",
        "tokens_per_image": 4,
        "gen_suffix": "Assistant:",
        "processor": "Idefics3Processor",
        "model": "Idefics3ForConditionalGeneration",
    },
}

VERDICT_WORDS = (" safe", " unsafe", " Safe", " Unsafe")


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tiny_ckpts")


_LOADED: dict[str, tuple] = {}


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def loaded(arch: str, ckpt_root: pathlib.Path):
    """(path, processor, model) for ``arch``, built once per session via the cache."""
    if arch not in _LOADED:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = cached_tiny_checkpoint(arch, cache_dir=ckpt_root)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        _LOADED[arch] = (path, processor, model)
    return _LOADED[arch]


def _images(n: int, seed: int = 0, *, vary_size: bool = True) -> list:
    """``n`` random RGB images, 64 px high; widths 64, 72, 80, ... unless ``vary_size`` is False."""
    rng = np.random.default_rng(seed)
    widths = [64 + 8 * i if vary_size else 64 for i in range(n)]
    return [Image.fromarray(rng.integers(0, 256, (64, w, 3), dtype=np.uint8)) for w in widths]


def _conv(n_images: int, text: str = "Is this content safe? Verdict:") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _prompt(processor, n_images: int, text: str = "Is this content safe? Verdict:") -> str:
    return processor.apply_chat_template(_conv(n_images, text), add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------- API


def test_architectures_constant() -> None:
    assert ARCHITECTURES == ("qwen2_vl", "llava", "idefics3")


def test_unknown_arch_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="bogus_arch"):
        build_tiny_checkpoint("bogus_arch", tmp_path / "x")
    with pytest.raises(ValueError, match="bogus_arch"):
        cached_tiny_checkpoint("bogus_arch", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="bogus_arch"):
        build_tiny_tokenizer(arch="bogus_arch")
    assert not (tmp_path / "x").exists()


def test_bad_hidden_size_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_checkpoint("llava", tmp_path / "x", hidden_size=48)


def test_refuses_to_clobber_without_overwrite(tmp_path: pathlib.Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint("llava", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------------- loading


def test_files_and_classes(arch: str, loaded) -> None:
    path, processor, model = loaded
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (path / name).is_file(), name
    assert type(processor).__name__ == EXPECT[arch]["processor"]
    assert type(model).__name__ == EXPECT[arch]["model"]
    tok = processor.tokenizer
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.eos_token is not None
    text_cfg = model.config.get_text_config()
    assert text_cfg.vocab_size == len(tok)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    assert head_dim in (32, 64, 80, 96, 112, 128)
    if arch == "qwen2_vl":
        rope = getattr(text_cfg, "rope_parameters", None) or text_cfg.rope_scaling
        assert sum(rope["mrope_section"]) == head_dim // 2
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 2_000_000
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == (
        "Qwen2Tokenizer" if arch == "qwen2_vl" else "PreTrainedTokenizerFast"
    )
    manifest = json.loads((path / "visguard_tiny.json").read_text())
    assert manifest["arch"] == arch and manifest["num_parameters"] == n_params


def test_loads_without_missing_keys(arch: str, loaded) -> None:
    from transformers import AutoModelForImageTextToText

    path = loaded[0]
    _, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_llava_uses_hub_vision_key_layout(ckpt_root: pathlib.Path) -> None:
    from safetensors import safe_open

    path = cached_tiny_checkpoint("llava", cache_dir=ckpt_root)
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)


# -------------------------------------------------------------------- chat template


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_chat_template_image_placeholders(arch: str, loaded, n_images: int) -> None:
    _, processor, _ = loaded
    prompt = _prompt(processor, n_images)
    assert prompt.count(EXPECT[arch]["placeholder"]) == n_images
    assert prompt.endswith(EXPECT[arch]["gen_suffix"])
    assert "Is this content safe? Verdict:" in prompt
    # String content works too.
    plain = processor.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert "hello" in plain and plain.endswith(EXPECT[arch]["gen_suffix"])


@pytest.mark.parametrize("assistant_content", ["str", "parts"])
def test_chat_template_assistant_turn_for_training(arch: str, loaded, assistant_content: str) -> None:
    _, processor, _ = loaded
    tok = processor.tokenizer
    answer = "Verdict: unsafe\nCategory: Violent"
    content = answer if assistant_content == "str" else [{"type": "text", "text": answer}]
    msgs = _conv(2, "Check these images.") + [{"role": "assistant", "content": content}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    assert text.count(EXPECT[arch]["placeholder"]) == 2
    assert answer in text
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    decoded = tok.decode(ids)
    assert decoded.strip().startswith("Verdict: unsafe")
    assert ids[-1] == tok.eos_token_id  # assistant turn ends with the eos / end-of-turn token


# -------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("word", VERDICT_WORDS)
def test_verdict_words_are_single_tokens(arch: str, loaded, word: str) -> None:
    tok = loaded[1].tokenizer
    prefix = tok.encode("Verdict:", add_special_tokens=False)
    full = tok.encode("Verdict:" + word, add_special_tokens=False)
    assert len(full) == len(prefix) + 1 and full[: len(prefix)] == prefix
    assert tok.decode(full[-1:]) == word
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(full[-1])) == full[-1]


def test_tokenizer_vocab_and_common_words(arch: str, loaded) -> None:
    tok = loaded[1].tokenizer
    assert 2000 <= len(tok) <= 4200
    for word in ("Image", "Verdict", "Category", "Reasoning", "Violent", "Hate", "Privacy", "Erotic"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    text = "Category: Illegal Activity, Self-Harm or none.\nImage 2 of 3!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_build_tiny_tokenizer_saves(tmp_path: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tiny_tokenizer(tmp_path, arch="qwen2_vl")
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "Verdict: unsafe <|im_start|> 123"
    assert tok2.encode(text) == tok.encode(text)
    assert type(tok2).__name__ == "Qwen2Tokenizer"


# ----------------------------------------------------------------- model forward


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_processor_and_forward(arch: str, loaded, n_images: int) -> None:
    _, processor, model = loaded
    inputs = processor(
        text=[_prompt(processor, n_images)], images=[_images(n_images, vary_size=False)], return_tensors="pt"
    )
    image_token_id = processor.tokenizer.convert_tokens_to_ids(EXPECT[arch]["image_token"])
    assert int((inputs["input_ids"] == image_token_id).sum()) == n_images * EXPECT[arch]["tokens_per_image"]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()


def test_generate(arch: str, loaded) -> None:
    _, processor, model = loaded
    inputs = processor(text=[_prompt(processor, 2)], images=[_images(2)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    n_new = out.shape[1] - inputs["input_ids"].shape[1]
    assert out.shape[0] == 1 and 1 <= n_new <= 5
    assert isinstance(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0], str)


def _last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


@pytest.mark.parametrize("nesting", ["nested", "flat"])
def test_left_padded_batch_matches_single_rows(arch: str, loaded, nesting: str) -> None:
    _, processor, model = loaded
    processor.tokenizer.padding_side = "left"
    prompts = [
        _prompt(processor, 1, "Short one. Verdict:"),
        _prompt(processor, 2, "A longer second prompt here."),
    ]
    imgs = [_images(1, seed=1), _images(2, seed=2)]
    singles = [
        _last_logits(model, processor(text=[p], images=[im], return_tensors="pt"))[0]
        for p, im in zip(prompts, imgs, strict=True)
    ]
    batch_images = imgs if nesting == "nested" else imgs[0] + imgs[1]
    batch = processor(text=prompts, images=batch_images, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padded
    last = _last_logits(model, batch)
    for row in range(2):
        torch.testing.assert_close(last[row], singles[row], atol=1e-4, rtol=0)
    # Sanity: rows differ by far more than the tolerance (the comparison is meaningful).
    assert (singles[0] - singles[1]).abs().max() > 1e-2


def test_batch_with_zero_image_prompt(arch: str, loaded) -> None:
    _, processor, model = loaded
    processor.tokenizer.padding_side = "left"
    prompts = [_prompt(processor, 0, "No image in this prompt at all, just text."), _prompt(processor, 1)]
    imgs = _images(1, seed=3)
    single0 = _last_logits(model, processor(text=[prompts[0]], return_tensors="pt"))[0]
    single1 = _last_logits(model, processor(text=[prompts[1]], images=[imgs], return_tensors="pt"))[0]
    batch = processor(text=prompts, images=[[], imgs], padding=True, return_tensors="pt")
    last = _last_logits(model, batch)
    torch.testing.assert_close(last[0], single0, atol=1e-4, rtol=0)
    torch.testing.assert_close(last[1], single1, atol=1e-4, rtol=0)


# ------------------------------------------------------------- determinism, cache


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_deterministic_for_seed(arch: str, tmp_path: pathlib.Path) -> None:
    a = build_tiny_checkpoint(arch, tmp_path / "a", seed=7)
    b = build_tiny_checkpoint(arch, tmp_path / "b", seed=7)
    c = build_tiny_checkpoint(arch, tmp_path / "c", seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (c / name).read_bytes(), name


def test_build_does_not_disturb_global_rng(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint("idefics3", tmp_path / "x")
    assert torch.equal(torch.rand(3), expected)


def test_overwrite(tmp_path: pathlib.Path) -> None:
    p = build_tiny_checkpoint("llava", tmp_path / "x", seed=1)
    d1 = _digest(p)
    p2 = build_tiny_checkpoint("llava", tmp_path / "x", seed=2, overwrite=True)
    assert p2 == p and _digest(p2) != d1


def test_cached_checkpoint_reused(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISGUARD_CACHE", str(tmp_path / "envcache"))
    p1 = cached_tiny_checkpoint("llava", seed=3)
    assert p1.parent == tmp_path / "envcache"
    mtime = (p1 / "model.safetensors").stat().st_mtime_ns
    p2 = cached_tiny_checkpoint("llava", seed=3)
    assert p2 == p1 and (p2 / "model.safetensors").stat().st_mtime_ns == mtime
    p3 = cached_tiny_checkpoint("llava", seed=4)
    assert p3 != p1
    explicit = cached_tiny_checkpoint("llava", cache_dir=tmp_path / "explicit", seed=3)
    assert explicit.parent == tmp_path / "explicit" and _digest(explicit) == _digest(p1)
    assert p1.stat().st_mode & 0o777 == 0o755
    # No temp directories are left behind.
    assert sorted(x.name for x in (tmp_path / "envcache").iterdir()) == sorted([p1.name, p3.name])
    with pytest.raises(TypeError):
        cached_tiny_checkpoint("llava", cache_dir=tmp_path, overwrite=True)


def test_cached_checkpoint_lost_race_uses_winner(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A builder that finishes second keeps the first builder's directory."""
    import visguard_testing.checkpoints as ck

    winner = cached_tiny_checkpoint("idefics3", cache_dir=tmp_path)
    marker = winner / "winner.txt"
    marker.write_text("first")
    # Pretend the manifest check raced: the cache looks empty when we start building.
    real_is_file = pathlib.Path.is_file
    calls = {"n": 0}

    def fake_is_file(self: pathlib.Path) -> bool:
        if self == winner / "visguard_tiny.json" and calls["n"] == 0:
            calls["n"] += 1
            return False
        return real_is_file(self)

    monkeypatch.setattr(pathlib.Path, "is_file", fake_is_file)
    again = ck.cached_tiny_checkpoint("idefics3", cache_dir=tmp_path)
    assert again == winner and marker.read_text() == "first"
    assert [x.name for x in tmp_path.iterdir()] == [winner.name]


def test_module_import_does_not_import_torch() -> None:
    import subprocess
    import sys

    # Only what *this* module adds is checked: the parent package may import torch itself.
    code = (
        "import sys, json, visguard; before = {m for m in ('torch', 'transformers') if m in sys.modules}; "
        "import visguard_testing.checkpoints; "
        "after = {m for m in ('torch', 'transformers') if m in sys.modules}; "
        "print(json.dumps(sorted(after - before)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
