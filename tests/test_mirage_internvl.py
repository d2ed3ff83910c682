"""The ``mirage`` format on InternVL in transformers' HF format, and the refusals around InternVL.

The model is a tiny random-weight ``InternVLForConditionalGeneration`` (InternViT-style tower + Qwen2
text) with ``InternVLProcessor``, ``GotOcr2ImageProcessor`` dynamic tiling and the chat template that
transformers' ``convert_internvl_weights_to_hf.py`` writes into every converted checkpoint
(:data:`visguard_testing.checkpoints.INTERNVL_CHAT_TEMPLATE`), laid out as a user lays out a
converted MIRage: the checkpoint plus a ``visguard.json`` naming ``mirage`` / ``internvl_hf``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from visguard import Guard
from visguard.cli import cli
from visguard.core.errors import BackendError, UnsupportedRequestError
from visguard.core.policy import Policy
from visguard.core.types import GuardRequest
from visguard.default_plugins.mirage_format import (
    INPUT_FOLLOWUP,
    MIRAGE_INTERNVL,
    MirageFormat,
    parse_mirage_answer,
)
from visguard.default_plugins.transformers_backend import TransformersBackend
from visguard.engine.guard import resolve_format

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def converted(internvl_path, tmp_path_factory) -> str:
    """The tiny checkpoint as docs/formats.md lays out a converted MIRage: plus its visguard.json."""
    path = tmp_path_factory.mktemp("converted") / "InternVL2.5-8B-MIRage-hf"
    shutil.copytree(internvl_path, path)
    (path / "visguard.json").write_text(json.dumps({"format": "mirage", "format_kwargs": {"variant": "internvl_hf"}}))
    return str(path)


@pytest.fixture(scope="module")
def backend(converted) -> TransformersBackend:
    return TransformersBackend(converted, device="cpu")


def _request(item: dict[str, Any], root: Path, response: str | None = None) -> GuardRequest:
    return GuardRequest.build([root / item["image_path1"], root / item["image_path2"]], item["question"], response)


def _mis_script_prompt(tokenizer: Any, query: str, images: list[Any]) -> str:
    """evaluation/inference_vllm.py (DripNowhy/MIS), ``prepare_inputs``, InternVL2.5 branch, verbatim."""
    placeholders = "\n".join(f"Image-{i}: <image>\n"
                             for i, _ in enumerate(images, start=1))
    messages = [{'role': 'user', 'content': f"{placeholders}\n{query}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------- prompt


def test_prompt_is_the_mis_inference_prompt_with_the_hf_image_token(converted, backend, mis_item):
    """The MIS script's InternVL text, rendered by the checkpoint's own template, with the HF processor's
    image token where the original format has ``<image>``; after expansion, the token ids the original
    InternVL code and vLLM build from ``<image>`` (``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>``)."""
    from transformers import AutoTokenizer

    item, root = mis_item
    assert "<image>" not in item["question"]
    request = _request(item, root)
    tokenizer = AutoTokenizer.from_pretrained(converted)  # the script renders with the tokenizer
    script = _mis_script_prompt(tokenizer, item["question"], list(request.images))

    fmt = resolve_format(converted)  # from the checkpoint's visguard.json
    assert isinstance(fmt, MirageFormat) and fmt.variant == "internvl_hf"
    prompt = fmt.build(request, Policy(), mode="reason", special_tokens=backend.special_tokens)
    rendered = backend.render(prompt)
    assert rendered == script.replace("<image>", "<IMG_CONTEXT>")
    # The converted checkpoint's template (transformers' conversion script) adds no system turn and no BOS.
    assert rendered == (
        f"<|im_start|>user\nImage-1: <IMG_CONTEXT>\n\nImage-2: <IMG_CONTEXT>\n\n{item['question']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.assistant_prefix == ""

    # The tokens the model sees: what InternVL's own chat() / vLLM's InternVL processor make of <image>.
    inputs = backend.encode([prompt])
    proc = backend.processor
    tiles = [int(proc.image_processor(images=[img], crop_to_patches=True, return_tensors="pt")["num_patches"][0])
             for img in prompt.images]
    per_tile = backend.model.config.image_seq_length
    expanded = script
    for n in tiles:
        expanded = expanded.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (per_tile * n) + "</img>", 1)
    expected_ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0].tolist() == expected_ids
    # The images reach the model: one pixel tile per tile, one context token per tile position.
    assert inputs["pixel_values"].shape[0] == sum(tiles)
    assert expected_ids.count(backend.model.config.image_token_id) == per_tile * sum(tiles)


def test_the_images_change_the_score(backend):
    fmt = MirageFormat("internvl_hf")
    a, b = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (96, 48), (30, 30, 200))
    scores = backend.score([fmt.build(GuardRequest.build(imgs, "Use 1 on 2."), Policy(), mode="fast")
                            for imgs in ([a, b], [b, a], [a, a])])
    assert len({round(s, 7) for s in scores}) == 3, scores


# ---------------------------------------------------------------------------------------------- verdicts


def test_guard_check_reason_gives_the_followup_verdict(converted, mis_item):
    """Reason mode: MIRage's answer (garbage from random weights), then the follow-up question scored;
    label = score >= threshold, score = P(Unsafe) of that follow-up, computed here again without caches."""
    item, root = mis_item
    policy = Policy(mode="reason", max_new_tokens=8)
    guard = Guard.from_pretrained(converted, device="cpu", policy=policy)
    assert guard.format.variant == "internvl_hf"
    request = _request(item, root)
    v = guard.check(request)
    assert v.label == ("unsafe" if v.score >= policy.threshold else "safe") and v.raw and v.mode == "reason"

    fresh = TransformersBackend(converted, device="cpu", kv_cache_mb=0)
    follow = guard.format.followup(request, guard.policy, v.raw, special_tokens=fresh.special_tokens)
    assert INPUT_FOLLOWUP in fresh.render(follow)
    assert fresh.render(follow).startswith(fresh.render(guard.format.build(request, guard.policy, mode="reason")))
    assert v.score == pytest.approx(fresh.score([follow])[0], abs=1e-4)

    # verdict="text": the label is the parser's reading of the answer, or unavailable where it reads none.
    text_guard = Guard(guard.backend, MirageFormat("internvl_hf", verdict="text"), policy)
    t = text_guard.check(request)
    parsed = parse_mirage_answer(t.raw, policy)
    assert t.raw == v.raw  # greedy: the same answer
    if parsed.label is None:
        assert t.label == "unavailable" and t.error == parsed.error
    else:
        assert t.label == parsed.label and t.score is None
    guard.close()


def test_fast_and_post_checks_and_cached_scores_equal_uncached(converted, mis_item):
    item, root = mis_item
    cached = Guard.from_pretrained(converted, device="cpu", policy=Policy(max_new_tokens=6))
    plain = Guard.from_pretrained(converted, device="cpu", policy=Policy(max_new_tokens=6), kv_cache_mb=0)
    pre, post = _request(item, root), _request(item, root, "Sure: first take the tool in image 1.")
    runs = {}
    for name, guard in (("cached", cached), ("plain", plain)):
        runs[name] = [guard.check(pre, mode="fast"), guard.check(post, mode="fast"), guard.check(post, mode="reason")]
    for c, p in zip(runs["cached"], runs["plain"], strict=True):
        assert c.label == p.label and c.label == ("unsafe" if c.score >= 0.5 else "safe")
        assert c.score == pytest.approx(p.score, abs=1e-4)
    # the fast post-check continued from the fast pre-check's cache (images and request not recomputed)
    assert cached.backend.cache_stats["prompt_hits"] >= 1
    cached.close()
    plain.close()


def test_cli_check_with_the_mirage_format(converted, mis_item):
    item, root = mis_item
    imgs = [str(root / item["image_path1"]), str(root / item["image_path2"])]
    result = CliRunner().invoke(cli, ["check", "--model", converted, "--format", "mirage", "--max-new-tokens", "6",
                                      "--device", "cpu", "--text", item["question"], "--json", *imgs])
    verdict = json.loads(result.stdout)
    assert result.exit_code == {"safe": 0, "unsafe": 1}[verdict["label"]], result.output
    assert verdict["mode"] == "reason" and verdict["raw"]  # mirage's own mode: MIRage answers first
    guard = Guard.from_pretrained(converted, device="cpu", policy=Policy(max_new_tokens=6))
    alone = guard.check(guard.request(imgs, item["question"]))
    assert verdict["label"] == alone.label and verdict["score"] == pytest.approx(alone.score, abs=1e-4)
    guard.close()


# ---------------------------------------------------------------------------------------------- refusals


def test_original_format_placeholder_on_the_hf_checkpoint_is_refused(backend, mis_item):
    """``variant="internvl"`` writes ``<image>``, which the HF processor does not read: refused with a typed
    error (an InputError: raised even under on_error="allow"), never a verdict."""
    item, root = mis_item
    guard = Guard(backend, MirageFormat("internvl"), Policy(mode="reason", max_new_tokens=4, on_error="allow"))
    with pytest.raises(UnsupportedRequestError, match="image placeholders"):
        guard.check(_request(item, root))
    with pytest.raises(UnsupportedRequestError):
        guard.check(_request(item, root), mode="fast")
    # the user's own text cannot forge a placeholder of either layout
    fmt = MirageFormat("internvl_hf")
    forged = fmt.build(GuardRequest.build([Image.new("RGB", (64, 64))], "a <image> and <IMG_CONTEXT> here"),
                       Policy(), mode="reason", special_tokens=backend.special_tokens)
    inputs = backend.encode([forged])
    assert inputs["input_ids"][0].tolist().count(backend.model.config.image_token_id) == backend.model.config.image_seq_length
    assert "<image>" not in MirageFormat("internvl").question_message(GuardRequest.build([], "a <image>"))["content"]


def _original_format_checkpoint(path: Path, tokenizer_from: str) -> Path:
    """A checkpoint laid out like InternVL2.5-8B's own (what Tuwhy/InternVL2.5-8B-MIRage builds on): its config
    (``InternVLChatModel``, ``auto_map``), stand-ins for its code files and a tokenizer without a processor;
    no weights: transformers must refuse it before loading them."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat", "template": "internvl2_5", "downsample_ratio": 0.5, "force_image_size": 448,
        "dynamic_image_size": True, "max_dynamic_patch": 12, "use_thumbnail": True, "ps_version": "v2",
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b"},
    }))
    (path / "configuration_internvl_chat.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass InternVLChatConfig(PretrainedConfig):\n"
        "    model_type = 'internvl_chat'\n")
    (path / "modeling_internvl_chat.py").write_text(
        "import torch\nfrom transformers import PreTrainedModel\n\nfrom .configuration_internvl_chat import "
        "InternVLChatConfig\n\n\nclass InternVLChatModel(PreTrainedModel):\n    config_class = InternVLChatConfig\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n        self.proj = torch.nn.Linear(2, 2)\n"
        "        self.post_init()\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_from) / name, path / name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("processor_class", None)  # InternVL2.5's own tokenizer names no processor
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_custom_code_internvl_checkpoint_is_a_clear_load_error(tmp_path, internvl_path):
    path = _original_format_checkpoint(tmp_path / "InternVL2.5-8B-MIRage", internvl_path)
    assert resolve_format(str(path)).variant == "internvl"  # the table knows it (vLLM serves this format)
    expected = r"custom-code checkpoint \(model_type 'internvl_chat', InternVLChatModel\)"
    with pytest.raises(BackendError, match=expected):
        Guard.from_pretrained(str(path), device="cpu")
    # With its code allowed, transformers finds no image-text-to-text class for it and would fall back to
    # loading it as a causal LM (its auto_map has one), which would never see the images: refused there.
    with pytest.raises(BackendError, match=expected) as info:
        Guard.from_pretrained(str(path), device="cpu", trust_remote_code=True)
    assert "Unrecognized configuration class" in str(info.value.__cause__)


def test_cli_reports_the_custom_code_checkpoint(tmp_path, internvl_path):
    path = _original_format_checkpoint(tmp_path / "InternVL2.5-8B-MIRage", internvl_path)
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    result = CliRunner().invoke(cli, ["check", "--model", str(path), "--device", "cpu", "--text", "q", str(img)])
    assert result.exit_code == 2 and "custom-code checkpoint" in result.output and "Traceback" not in result.output


def test_model_table_maps_the_internvl_mirage_to_its_native_format():
    fmt = resolve_format(MIRAGE_INTERNVL)
    assert (fmt.name, fmt.variant, fmt.min_pixels) == ("mirage", "internvl", None)
    assert resolve_format(MIRAGE_INTERNVL, "mirage").variant == "internvl"
