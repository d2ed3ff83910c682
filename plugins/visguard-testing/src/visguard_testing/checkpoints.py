"""Tiny random-weight checkpoints of real Hugging Face VLM architectures.

The checkpoints built here are meant for tests and benchmarks: they use the *real*
transformers config / model / tokenizer / processor classes of each architecture,
so code paths (chat templates, image placeholder expansion, multi-image batching,
``generate``) are exercised exactly as with the public checkpoints, but the weights
are random and tiny so that everything runs in well under a second on a laptop CPU.
Nothing is downloaded: the byte-level BPE tokenizer is trained locally with the
``tokenizers`` library on a generated English-ish corpus.

Every directory produced by :func:`build_tiny_checkpoint` loads with::

    AutoProcessor.from_pretrained(path)
    AutoModelForImageTextToText.from_pretrained(path)

under ``HF_HUB_OFFLINE=1`` and without ``trust_remote_code``.

Architectures (all text decoders use ``head_dim = 32`` by default so that vLLM's CPU
attention backend accepts them):

``qwen2_vl``
    ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` (``Qwen2Tokenizer``,
    ``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor``). ChatML template with
    ``<|vision_start|><|image_pad|><|vision_end|>`` per image and the default system
    prompt. ``min_pixels = 56*56``, ``max_pixels = 112*112``: a 64x64 image becomes
    a 56x56 image -> 4x4 patches -> 4 ``<|image_pad|>`` tokens. eos ``<|im_end|>``,
    pad ``<|endoftext|>``, no BOS.
``llava``
    ``LlavaForConditionalGeneration`` (tiny CLIP vision tower, 56x56 input, patch 14)
    + ``LlavaProcessor`` (``PreTrainedTokenizerFast`` = ``TokenizersBackend`` in
    transformers 5 -- transformers forces this class for the ``llava`` model type
    anyway; ``CLIPImageProcessor``). LLaVA-1.5-hf template
    ``"USER: <image>\\n... ASSISTANT:"``. Each image expands to 16 ``<image>`` tokens.
    The tokenizer prepends ``<s>`` (like Llama-2), eos ``</s>``, pad ``<pad>``.
``idefics3``
    ``Idefics3ForConditionalGeneration`` (tiny SigLIP-style vision tower, 56x56, patch
    14, pixel-shuffle scale 2) + ``Idefics3Processor`` (``PreTrainedTokenizerFast``
    with a Llama-3 style pre-tokenizer, ``Idefics3ImageProcessor`` with
    ``do_image_splitting=False``). Template ``"<|begin_of_text|>User:<image>...
    <end_of_utterance>\\nAssistant:"``. Each image expands to
    ``<fake_token_around_image><global-img>`` + 4 x ``<image>`` +
    ``<fake_token_around_image>``. The BOS comes from the chat template (the tokenizer
    does *not* add one), eos ``<end_of_utterance>``, pad ``<|reserved_special_token_0|>``.

``internvl`` (in :data:`EXTRA_ARCHITECTURES`, not in :data:`ARCHITECTURES`)
    ``InternVLForConditionalGeneration`` in transformers' HF format (InternViT-style vision tower,
    56 px tiles, patch 14, pixel-shuffle ratio 0.5, + a Qwen2 text model, as InternVL2.5-1B/4B and
    InternVL3) + ``InternVLProcessor`` (``Qwen2Tokenizer`` with the tokens transformers' conversion
    script adds: ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<quad>`` ... and ``<video>``, named as
    ``start_image_token`` / ``end_image_token`` / ``context_image_token`` / ``video_token``;
    ``GotOcr2ImageProcessor`` with dynamic tiling, at most 4 tiles per image as in the MIS run, plus a
    thumbnail when an image takes more than one tile). Chat template: :data:`INTERNVL_CHAT_TEMPLATE`,
    verbatim from ``convert_internvl_weights_to_hf.py`` (no system turn, an image part is
    ``<IMG_CONTEXT>\\n``, no ``{% generation %}`` markers). A tile is 4 ``<IMG_CONTEXT>`` tokens
    inside ``<img>`` ... ``</img>``: a 64x64 image is one tile, a 128x64 image two tiles and a thumbnail.
    eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS.

Image-list nesting accepted by ``processor(text=[...], images=..., padding=True)``
for a batch of prompts with different numbers of images (verified by
``tests/test_tiny_checkpoints.py``):

* ``qwen2_vl``: a *flat* list of all images in prompt order
  (``[p0_img0, p1_img0, p1_img1]``); a nested per-prompt list
  (``[[p0_img0], [p1_img0, p1_img1]]``) also works.
* ``llava``: a *flat* list in prompt order; the nested per-prompt list also works.
* ``idefics3``: a *nested* per-prompt list (``[[p0_img0], [p1_img0, p1_img1]]``);
  a flat list also works (the processor splits it by counting ``<image>`` in each
  prompt). A prompt with zero images needs an empty inner list ``[]`` in the nested
  form.

In short: a nested per-prompt list ``list[list[PIL.Image]]`` works for all three
architectures and is the recommended form. For a single prompt, ``images=[imgs]``
(nested) or ``images=imgs`` (flat) both work.

Chat templates accept ``content`` given as a string or as a list of parts
(``{"type": "image"}`` / ``{"type": "text", "text": ...}``), any number of images
(including zero), ``add_generation_prompt=True``, and assistant messages (string or
list of text parts) for training. Assistant content (including its end-of-turn token)
is wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` works.

Every prompt produced with ``add_generation_prompt=True`` ends right after the
assistant marker (``"<|im_start|>assistant\\n"``, ``"ASSISTANT:"``,
``"Assistant:"``) and the tokenizers encode ``"Verdict: safe"``,
``"Verdict: unsafe"``, ``"Verdict: Safe"`` and ``"Verdict: Unsafe"`` with the verdict
word as a single token (``" safe"``, ``" unsafe"``, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import random
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT_VERSION",
    "EXTRA_ARCHITECTURES",
    "INTERNVL_CHAT_TEMPLATE",
    "build_tiny_checkpoint",
    "build_tiny_tokenizer",
    "cached_tiny_checkpoint",
    "with_added_words",
]

ARCHITECTURES: tuple[str, ...] = ("qwen2_vl", "llava", "idefics3")
#: Architectures built by the same functions but left out of :data:`ARCHITECTURES` (the set every
#: generic fixture test runs on): ``internvl`` carries InternVL's real HF-format chat template,
#: which has no ``{% generation %}`` markers for assistant masks.
EXTRA_ARCHITECTURES: tuple[str, ...] = ("internvl",)

#: Bump whenever the produced checkpoints change; it is part of the cache key used by
#: :func:`cached_tiny_checkpoint`.
CHECKPOINT_FORMAT_VERSION = "2"

#: Head dims accepted by vLLM's CPU attention backend.
_ALLOWED_HEAD_DIMS = (32, 64, 80, 96, 112, 128)

DEFAULT_VOCAB_SIZE = 3000

# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------

_COMMON_WORDS = """
the a an of to and in is it that this for on with as was are be by at from or not have
has had but what all were when we there can your which their said if do will each about
how up out them then she many some so these would other into more her two like him see
time could no make than first been its who now people my made over did down only way find
use may water long little very after words called just where most know get through back
much before go good new write our used me man too any day same right look think also
around another came come work three word must because does part even place well such here
take why things help put years different away again off went old number great tell men say
small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those
always looked show large often together asked house world going want school important until
form food keep children feet land side without boy once animals life enough took sometimes
four head above kind began almost live page got earth need far hand high year mother light
parts country father let night following picture being study second eyes soon times story
since white days paper hard near sentence better best across during today others however
sure means knew try told young sun ways thing whole hear example heard several change answer
room sea against top turned learn point city play toward five using usually red blue green
black yellow dark bright small tall short open closed inside outside left right front behind
""".split()

_DOMAIN_WORDS = """
image images photo photograph picture scene frame screenshot drawing painting meme poster
person people man woman child children group crowd face faces hand hands body clothing
weapon weapons knife knives gun guns rifle blood injury wound fight fighting attack attacks
violence violent drugs drug pills syringe powder money cash bank card cards credit theft
stolen robbery street car cars road building house room table bed kitchen window door
text caption sign signs document documents passport license address phone email number
numbers password account private personal information data leak identity hate hateful
symbol symbols slur slurs flag flags insult harassment nude nudity explicit sexual adult
erotic suggestive underwear harm harmful self cutting suicide scars razor illegal activity
crime criminal smuggling hacking fraud counterfeit privacy safe unsafe benign verdict
category categories reasoning policy policies guard guardrail assistant user system content
classify classification check checks label labels question answer describe description
response request prompt model output input safety risk risky allowed disallowed violation
violations rule rules reason reasons because contains shows depicts appears visible clearly
""".split()

_CATEGORIES = ("Illegal Activity", "Violent", "Hate", "Self-Harm", "Privacy", "Erotic")

_VERDICTS = (" safe", " unsafe", " Safe", " Unsafe")

_PUNCT_SUFFIX = (".", ".", ".", "?", "!", ",", ";", ":", "...")


def _sentence(rng: random.Random, words: list[str]) -> str:
    n = rng.randint(4, 14)
    toks = [rng.choice(words) for _ in range(n)]
    if rng.random() < 0.25:
        toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 2024)))
    if rng.random() < 0.1:
        i = rng.randrange(len(toks))
        toks[i] = f'"{toks[i]}"'
    if rng.random() < 0.1:
        i = rng.randrange(len(toks))
        toks[i] = f"({toks[i]})"
    toks[0] = toks[0].capitalize()
    return " ".join(toks) + rng.choice(_PUNCT_SUFFIX)


def _generate_corpus(seed: int, n_lines: int = 3000) -> list[str]:
    """Generate a deterministic English-ish training corpus for the BPE tokenizer."""
    rng = random.Random(seed)
    words = _COMMON_WORDS + _DOMAIN_WORDS
    lines: list[str] = []
    cats_lower = [c.lower() for c in _CATEGORIES]
    for i in range(n_lines):
        kind = i % 6
        if kind in (0, 1):
            lines.append(" ".join(_sentence(rng, words) for _ in range(rng.randint(1, 3))))
        elif kind == 2:
            # The guard's own output format; verdict words both cases.
            n_img = rng.randint(1, 3)
            block = []
            for j in range(1, n_img + 1):
                verdict = rng.choice(_VERDICTS)
                cat = rng.choice(_CATEGORIES) if "nsafe" in verdict else rng.choice(("none", "None"))
                block.append(f"Image {j}:{verdict}")
                block.append(f"Verdict:{verdict}")
                block.append(f"Category: {cat}")
                block.append(f"Reasoning: {_sentence(rng, words)}")
            lines.append("\n".join(block))
        elif kind == 3:
            verdict = rng.choice(_VERDICTS)
            cat = rng.choice(_CATEGORIES)
            lines.append(
                f"Is the image{verdict} or{rng.choice(_VERDICTS)}? Answer with the verdict and one "
                f"category ({', '.join(_CATEGORIES)}) or none. The content looks{verdict}. "
                f"It may be {cat} or {rng.choice(cats_lower)}. Verdict:{verdict}"
            )
        elif kind == 4:
            verdict = rng.choice(_VERDICTS).strip().lower()
            cat = rng.choice(_CATEGORIES + ("none",))
            lines.append(
                json.dumps({"verdict": verdict, "category": cat, "image": rng.randint(0, 9)})
                + f"\n- item {rng.randint(1, 99)}: {rng.choice(words)} = {rng.randint(0, 999)}"
                + f"; score {rng.random():.2f} (id #{rng.randint(100, 999)}) [{rng.choice(words)}] <{rng.choice(words)}>"
            )
        else:
            lines.append(
                f"USER: {_sentence(rng, words)}\nASSISTANT: Verdict:{rng.choice(_VERDICTS)}\n"
                f"User: {_sentence(rng, words)}\nAssistant: {_sentence(rng, words)}\n"
                f"system\nuser\nassistant\n{_sentence(rng, words)}\n\n\t{rng.choice(words)}"
            )
    return lines


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------

# Qwen2 pre-tokenization regex (digits are split one by one).
_QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Llama-3 pre-tokenization regex (digits grouped by up to three).
_LLAMA3_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_QWEN2_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Llama-2 style: <unk>, <s>, </s> get ids 0, 1, 2 (trained in as the first tokens).
_LLAVA_LEADING_SPECIALS = ("<unk>", "<s>", "</s>")
_LLAVA_SPECIALS = ("<image>", "<pad>")
# InternVL (HF format): the Qwen2-VL specials plus the ones transformers' conversion script adds
# (``write_tokenizer`` in convert_internvl_weights_to_hf.py), and ``<video>``, the video token it
# names in ``extra_special_tokens``.
_INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                      "<video>")
_INTERNVL_TOKEN_ROLES = (("start_image_token", "<img>"), ("end_image_token", "</img>"),
                         ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>"))
_IDEFICS3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
)


def _check_arch(arch: str) -> None:
    known = ARCHITECTURES + EXTRA_ARCHITECTURES
    if arch not in known:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(known)}")


def _train_raw_tokenizer(arch: str, seed: int, vocab_size: int) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with the arch's pre-tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    raw = Tokenizer(BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    if arch in ("qwen2_vl", "internvl"):
        raw.normalizer = normalizers.NFC()
        regex = _QWEN2_PRETOKENIZE_REGEX
    else:
        regex = _LLAMA3_PRETOKENIZE_REGEX
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    leading = list(_LLAVA_LEADING_SPECIALS) if arch == "llava" else []
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(_generate_corpus(seed), trainer=trainer)

    trailing = {"qwen2_vl": _QWEN2_SPECIALS, "llava": _LLAVA_SPECIALS, "idefics3": _IDEFICS3_SPECIALS,
                "internvl": _QWEN2_SPECIALS + _INTERNVL_SPECIALS}[arch]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in trailing])
    if arch == "llava":
        # Llama-2 behaviour: prepend <s> to every sequence.
        bos_id = raw.token_to_id("<s>")
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
    return raw


def _wrap_tokenizer(arch: str, raw: Any) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    common: dict[str, Any] = {"clean_up_tokenization_spaces": False, "model_max_length": 32768}
    if arch == "internvl":
        common["extra_special_tokens"] = dict(_INTERNVL_TOKEN_ROLES)
        common["model_max_length"] = 8192  # the conversion script's CONTEXT_LENGTH
    if arch in ("qwen2_vl", "internvl"):
        from transformers import Qwen2Tokenizer

        model = json.loads(raw.to_str())["model"]
        tok = Qwen2Tokenizer(
            vocab=raw.get_vocab(with_added_tokens=True),
            merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            add_prefix_space=False,
            errors="replace",
            split_special_tokens=False,
            **common,
        )
        extra = _INTERNVL_SPECIALS if arch == "internvl" else ()
        tok.add_special_tokens(
            {"additional_special_tokens": [t for t in _QWEN2_SPECIALS + extra if t != "<|endoftext|>"]}
        )
    elif arch == "llava":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
            add_eos_token=False,
            **common,
        )
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<|begin_of_text|>",
            eos_token="<end_of_utterance>",
            pad_token="<|reserved_special_token_0|>",
            **common,
        )
        tok.add_special_tokens({"additional_special_tokens": list(_IDEFICS3_SPECIALS[4:])})
    return tok


def build_tiny_tokenizer(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    arch: str = "qwen2_vl",
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> PreTrainedTokenizerBase:
    """Train a small byte-level BPE tokenizer locally and wrap it in the arch's tokenizer class.

    The tokenizer is trained with the ``tokenizers`` library on a generated English-ish
    corpus (nothing is downloaded), uses the architecture's pre-tokenizer (Qwen2 regex
    for ``qwen2_vl``, Llama-3 regex otherwise) and carries the architecture's real
    special tokens, appended after the learned vocabulary in their real order.

    Args:
        out_dir: If given, the tokenizer files are saved there with ``save_pretrained``.
        arch: One of :data:`ARCHITECTURES` or :data:`EXTRA_ARCHITECTURES`; selects special tokens and
            tokenizer class.
        seed: Seed of the corpus generator (training itself is deterministic).
        vocab_size: Target size of the learned BPE vocabulary; the architecture's special
            tokens are appended on top (LLaVA's ``<unk>``/``<s>``/``</s>`` count towards it,
            as they take ids 0-2 like in Llama-2). Training stops early when the corpus
            runs out of mergeable pairs (Qwen2's digit splitting gives ~2840 tokens).

    Returns:
        The transformers tokenizer (``Qwen2Tokenizer`` for ``qwen2_vl`` and ``internvl``,
        ``PreTrainedTokenizerFast`` otherwise). No chat template is attached.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    _check_arch(arch)
    tok = _wrap_tokenizer(arch, _train_raw_tokenizer(arch, seed, vocab_size))
    if out_dir is not None:
        tok.save_pretrained(os.fspath(out_dir))
        _portable_tokenizer_class(pathlib.Path(out_dir))
    return tok


def _portable_tokenizer_class(out: pathlib.Path) -> None:
    """Record ``PreTrainedTokenizerFast`` instead of transformers-5-only ``TokenizersBackend``.

    Both names resolve to the same class in transformers 5; the former is also what the
    public Idefics3 checkpoints declare and is understood by transformers 4.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Private alias kept for callers that prefer the underscore name.
_build_tokenizer = build_tiny_tokenizer

# --------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------

# Common prologue: collect a message's text in ``ns.text`` (string content or list of
# parts), rendering one placeholder per image part via ``IMAGE`` (substituted below).
_COLLECT = (
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "@@IMAGE@@"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "@@VIDEO@@"
    "{%- elif part['type'] == 'text' or 'text' in part -%}"
    "@@TEXT@@"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
)

# Qwen2-VL: the public template (ChatML, default system prompt, images inline in
# order), extended with assistant {% generation %} markers.
_QWEN2_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    + _COLLECT.replace(
        "@@IMAGE@@",
        "{%- set image_count.value = image_count.value + 1 -%}"
        "{%- if add_vision_id -%}{%- set ns.text = ns.text ~ 'Picture ' ~ image_count.value ~ ': ' -%}{%- endif -%}"
        "{%- set ns.text = ns.text ~ '<|vision_start|><|image_pad|><|vision_end|>' -%}",
    )
    .replace(
        "@@VIDEO@@",
        "{%- set ns.text = ns.text ~ '<|vision_start|><|video_pad|><|vision_end|>' -%}",
    )
    .replace("@@TEXT@@", "{%- set ns.text = ns.text ~ part['text'] -%}")
    + "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text ~ '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- ns.text ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# LLaVA-1.5-hf: "USER: <image>\n<text> ASSISTANT:"; all images of a message first,
# then its text parts, each followed by a space. Assistant turns end with </s>.
_LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{- message['role'].upper() ~ ': ' -}}{%- endif -%}"
    + _COLLECT.replace("@@IMAGE@@", "{{- '<image>\\n' -}}")
    .replace("@@VIDEO@@", "")
    .replace("@@TEXT@@", "{%- set ns.text = ns.text ~ part['text'] ~ ' ' -%}")
    + "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text | trim ~ '</s>' -}}{%- endgeneration -%}"
    "{%- elif message['content'] is string -%}"
    "{{- ns.text ~ ' ' -}}"
    "{%- else -%}"
    "{{- ns.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Idefics3: "<|begin_of_text|>User:<image>...<end_of_utterance>\nAssistant:"; images
# and text parts inline in order; ":" directly before a leading image, ": " otherwise.
_IDEFICS3_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{%- set first_is_image = message['content'] is not string and message['content'] | length > 0"
    " and message['content'][0]['type'] == 'image' -%}"
    "{{- message['role'] | capitalize ~ (':' if first_is_image else ': ') -}}"
    + _COLLECT.replace("@@IMAGE@@", "{%- set ns.text = ns.text ~ '<image>' -%}")
    .replace("@@VIDEO@@", "")
    .replace("@@TEXT@@", "{%- set ns.text = ns.text ~ part['text'] -%}")
    + "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text ~ '<end_of_utterance>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- ns.text ~ '<end_of_utterance>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

#: InternVL's HF-format chat template, verbatim: the ``chat_template`` constant of transformers'
#: ``src/transformers/models/internvl/convert_internvl_weights_to_hf.py`` (huggingface/transformers;
#: the version that writes ``model.``-prefixed keys and an ``InternVLVideoProcessor``), which the script
#: saves with every converted checkpoint (``InternVLProcessor(..., chat_template=chat_template)`` and
#: ``tokenizer.chat_template``). No system turn; a string content is written as is; an image part is
#: written as ``<IMG_CONTEXT>\n``, the token ``InternVLProcessor`` expands to
#: ``<img>`` + ``<IMG_CONTEXT>`` x (image_seq_length x tiles) + ``</img>``.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% if message['content'] is string %}"
            "{{ message['content'] }}"
        "{% else %}"
            "{% for content in message['content'] %}"
                "{% if content['type'] == 'image' %}"
                    "{{ '<IMG_CONTEXT>\n' }}"
                "{% elif content['type'] == 'video' %}"
                    "{{ '<video>\n' }}"
                "{% elif content['type'] == 'text' %}"
                    "{{ content['text'] }}"
                "{% endif %}"
            "{% endfor %}"
        "{% endif %}"
        "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
        "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_CHAT_TEMPLATES = {"qwen2_vl": _QWEN2_VL_TEMPLATE, "llava": _LLAVA_TEMPLATE, "idefics3": _IDEFICS3_TEMPLATE,
                   "internvl": INTERNVL_CHAT_TEMPLATE}

# --------------------------------------------------------------------------------------
# Model configs and processors
# --------------------------------------------------------------------------------------


def _text_dims(hidden_size: int) -> tuple[int, int, int]:
    """Return ``(num_heads, num_kv_heads, head_dim)`` with a vLLM-CPU-friendly head_dim."""
    for head_dim in _ALLOWED_HEAD_DIMS:
        if hidden_size % head_dim == 0:
            heads = hidden_size // head_dim
            kv = heads // 2 if heads % 2 == 0 else heads
            return heads, kv, head_dim
    raise ValueError(
        f"hidden_size={hidden_size} must be a multiple of one of {_ALLOWED_HEAD_DIMS} "
        "so that head_dim is supported by vLLM's CPU attention"
    )


def _decoder(vocab: int, hidden_size: int, num_layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """The text decoder's size, common to every architecture here (MLP 2x wide, untied output layer)."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": False,
    }


def _qwen2_vl_parts(tok: Any, hidden_size: int, num_layers: int, vocab: int, max_pixels: int | None) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    heads, kv, head_dim = _text_dims(hidden_size)
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    mrope_section = [t, h, half - t - h]  # [4, 6, 6] for head_dim 32 (real: [16, 24, 24])
    ids = {t_: tok.convert_tokens_to_ids(t_) for t_ in _QWEN2_SPECIALS}
    config = Qwen2VLConfig(
        text_config={
            **_decoder(vocab, hidden_size, num_layers, heads, kv),
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "use_sliding_window": False,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    pix = {"min_pixels": 56 * 56, "max_pixels": max_pixels or 112 * 112}
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=_CHAT_TEMPLATES["qwen2_vl"],
    )
    return config, processor


_LLAVA_IMAGE_SIZE = 56
_IDEFICS3_IMAGE_SIZE = 56


def _llava_parts(tok: Any, hidden_size: int, num_layers: int, vocab: int, max_pixels: int | None) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    heads, kv, _ = _text_dims(hidden_size)
    image_tokens = (_LLAVA_IMAGE_SIZE // 14) ** 2  # CLS dropped ("default" strategy)
    config = LlavaConfig(
        text_config={
            **_decoder(vocab, hidden_size, num_layers, heads, heads),
            "model_type": "llama",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "bos_token_id": tok.convert_tokens_to_ids("<s>"),
            "eos_token_id": tok.convert_tokens_to_ids("</s>"),
            "pad_token_id": tok.convert_tokens_to_ids("<pad>"),
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": _LLAVA_IMAGE_SIZE,
            "patch_size": 14,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
        },
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE},
        crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATES["llava"],
    )
    return config, processor


def _idefics3_parts(tok: Any, hidden_size: int, num_layers: int, vocab: int, max_pixels: int | None) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    heads, kv, _ = _text_dims(hidden_size)
    scale_factor = 2
    image_seq_len = (_IDEFICS3_IMAGE_SIZE // 14) ** 2 // scale_factor**2
    pad_id = tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    config = Idefics3Config(
        text_config={
            **_decoder(vocab, hidden_size, num_layers, heads, kv),
            "model_type": "llama",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "bos_token_id": tok.convert_tokens_to_ids("<|begin_of_text|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<end_of_utterance>"),
            "pad_token_id": pad_id,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": _IDEFICS3_IMAGE_SIZE,
            "patch_size": 14,
        },
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": _IDEFICS3_IMAGE_SIZE},
        max_image_size={"longest_edge": _IDEFICS3_IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=image_seq_len,
        chat_template=_CHAT_TEMPLATES["idefics3"],
    )
    return config, processor


_INTERNVL_IMAGE_SIZE = 56
#: Tiles per image: the MIS inference script runs InternVL2.5 with ``max_dynamic_patch=4``.
INTERNVL_MAX_PATCHES = 4


def _internvl_parts(tok: Any, hidden_size: int, num_layers: int, vocab: int, max_pixels: int | None) -> tuple[Any, Any]:
    """``InternVLForConditionalGeneration`` (InternViT-style tower + Qwen2 text, as InternVL2.5-1B/4B and
    InternVL3) with the processor settings of transformers' conversion script, scaled down: a
    ``GotOcr2ImageProcessor`` with 56 px tiles instead of 448 (ImageNet mean/std, RGB, rescale 1/255,
    dynamic tiling with a thumbnail), pixel-shuffle ratio 0.5, so a tile gives (56/14)^2 x 0.25 = 4
    ``<IMG_CONTEXT>`` tokens (256 for the real 448 px tiles)."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    heads, kv, _ = _text_dims(hidden_size)
    downsample = 0.5
    image_seq_length = int((_INTERNVL_IMAGE_SIZE // 14) ** 2 * downsample**2)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")}
    config = InternVLConfig(
        text_config={
            **_decoder(vocab, hidden_size, num_layers, heads, kv),
            "model_type": "qwen2",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "use_sliding_window": False,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [_INTERNVL_IMAGE_SIZE, _INTERNVL_IMAGE_SIZE],
            "patch_size": [14, 14],
            "use_absolute_position_embeddings": True,  # set by the conversion script
            "norm_type": "layer_norm",
        },
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length,
        downsample_ratio=downsample,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    tile = {"height": _INTERNVL_IMAGE_SIZE, "width": _INTERNVL_IMAGE_SIZE}
    image_processor = GotOcr2ImageProcessor(
        do_resize=True,
        size=tile,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
        crop_to_patches=True,
        min_patches=1,
        max_patches=INTERNVL_MAX_PATCHES,
    )
    video_processor = InternVLVideoProcessor(size=tile, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return config, processor


_PARTS = {"qwen2_vl": _qwen2_vl_parts, "llava": _llava_parts, "idefics3": _idefics3_parts, "internvl": _internvl_parts}

# --------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------


def build_tiny_checkpoint(
    arch: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int | None = None,
    max_pixels: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Build a tiny random-weight checkpoint of a real VLM architecture on local disk.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer files, the processor / image-processor configs and ``chat_template.jinja``
    into ``out_dir``. The result loads with ``AutoProcessor.from_pretrained(out_dir)``
    and ``AutoModelForImageTextToText.from_pretrained(out_dir)`` offline.

    Args:
        arch: One of :data:`ARCHITECTURES` (``"qwen2_vl"``, ``"llava"``, ``"idefics3"``) or
            :data:`EXTRA_ARCHITECTURES` (``"internvl"``).
        out_dir: Destination directory (created if needed).
        seed: Seed for the random weights; the same seed gives byte-identical weights.
            The tokenizer does not depend on it.
        hidden_size: Hidden size of the text decoder. Must be a multiple of a head dim
            supported by vLLM's CPU attention (32, 64, 80, 96, 112, 128); the number of
            heads is ``hidden_size // 32`` for multiples of 32.
        num_layers: Number of text decoder layers.
        vocab_size: Rows of the embedding and output layers (default: the tokenizer's size; a larger
            value pads them like real checkpoints do, e.g. 32000 for benchmarks where the output
            layer's cost matters). Must be at least the tokenizer's size.
        max_pixels: ``qwen2_vl`` only: the image processor's ``max_pixels`` (default 112*112; 224*224
            turns a 224 px image into 64 image tokens). Ignored by the other architectures.
        overwrite: If ``out_dir`` exists and is non-empty, replace it when True,
            otherwise raise ``FileExistsError``.

    Returns:
        The checkpoint directory as a :class:`pathlib.Path`.

    Raises:
        ValueError: If ``arch`` is unknown or ``hidden_size`` is unsupported.
        FileExistsError: If ``out_dir`` is a non-empty directory and ``overwrite`` is False.
    """
    _check_arch(arch)
    _text_dims(hidden_size)  # validate early
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    tok = build_tiny_tokenizer(arch=arch, seed=0)
    if vocab_size is not None and vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    config, processor = _PARTS[arch](tok, hidden_size, num_layers, vocab_size or len(tok), max_pixels)

    with _fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()

    text_cfg = config.get_text_config()
    eos_ids = [text_cfg.eos_token_id]
    if arch in ("qwen2_vl", "internvl"):
        eos_ids.append(tok.convert_tokens_to_ids("<|endoftext|>"))
    elif arch == "idefics3":
        eos_ids.append(tok.convert_tokens_to_ids("<|end_of_text|>"))
    model.generation_config = GenerationConfig(
        bos_token_id=text_cfg.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=text_cfg.pad_token_id,
        do_sample=False,
    )
    save_quietly(model, out)
    if arch == "llava":
        _use_hub_llava_vision_keys(out)
    processor.save_pretrained(out)
    _portable_tokenizer_class(out)
    _write_manifest(out, arch=arch, seed=seed, hidden_size=hidden_size, num_layers=num_layers, model=model)
    return out


def save_quietly(model: Any, out: pathlib.Path) -> None:
    """``model.save_pretrained(out)`` without transformers' progress bar."""
    from transformers.utils import logging as hf_logging

    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


def _use_hub_llava_vision_keys(out: pathlib.Path) -> None:
    """Rename LLaVA vision-tower weights to the public llava-hf layout.

    transformers 5 saves the CLIP tower as ``vision_tower.<module>`` (its CLIPVisionModel
    no longer nests a ``vision_model``), while the public ``llava-hf/*`` checkpoints --
    and loaders such as vLLM -- use ``vision_tower.vision_model.<module>``. transformers 5
    loads the renamed file with no missing/unexpected keys and identical weights
    (checked by the tests), so we store the hub layout.
    """
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    state = load_file(path)
    prefix, nested = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (nested + k[len(prefix) :] if k.startswith(prefix) and not k.startswith(nested) else k): v
        for k, v in state.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _write_manifest(out: pathlib.Path, *, model: Any, **info: Any) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {"builder": "visguard_testing.checkpoints", "version": CHECKPOINT_FORMAT_VERSION, **info}
    manifest["num_parameters"] = int(n_params)
    (out / "visguard_tiny.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _fork_rng():  # type: ignore[no-untyped-def]
    """Run a block with torch's global CPU RNG state restored afterwards."""
    import torch

    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return "none"


def _cache_key(arch: str, kw: dict[str, Any]) -> str:
    # The serialized format depends on the transformers / tokenizers versions too.
    deps = {name: _dist_version(name) for name in ("transformers", "tokenizers")}
    blob = json.dumps({"arch": arch, "kw": kw, "v": CHECKPOINT_FORMAT_VERSION, "deps": deps}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{arch}-v{CHECKPOINT_FORMAT_VERSION}-{digest}"


def cached_tiny_checkpoint(
    arch: str,
    cache_dir: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> pathlib.Path:
    """Return a tiny checkpoint for ``arch``, building it once and reusing it afterwards.

    The checkpoint lives in ``cache_dir or $VISGUARD_CACHE or ~/.cache/visguard/tiny``
    under a sub-folder keyed by ``arch``, the keyword arguments and
    :data:`CHECKPOINT_FORMAT_VERSION`. It is built in a temporary sibling directory and
    moved into place with :func:`os.replace`, so concurrent builders (e.g. pytest-xdist
    workers) are safe: the first one to finish wins and the others reuse its result.

    Args:
        arch: One of :data:`ARCHITECTURES` or :data:`EXTRA_ARCHITECTURES`.
        cache_dir: Root cache directory; see above for the default.
        **kw: Keyword arguments of :func:`build_tiny_checkpoint` (``seed``,
            ``hidden_size``, ``num_layers``, ``vocab_size``, ``max_pixels``); ``overwrite`` is
            not accepted.

    Returns:
        Path to the (complete) checkpoint directory.

    Raises:
        ValueError: If ``arch`` is unknown.
        TypeError: If an unsupported keyword argument is given.
    """
    _check_arch(arch)
    allowed = {"seed", "hidden_size", "num_layers", "vocab_size", "max_pixels"}
    bad = set(kw) - allowed
    if bad:
        raise TypeError(f"unsupported keyword argument(s) for cached_tiny_checkpoint: {sorted(bad)}")
    defaults = {"seed": 0, "hidden_size": 64, "num_layers": 2}
    params = {**defaults, **{k: v for k, v in kw.items() if v is not None}}  # None = default, same key as before
    return cached_build(_cache_key(arch, params), lambda tmp: build_tiny_checkpoint(arch, tmp, overwrite=True, **params),
                        cache_dir)


def cached_build(key: str, build: Any, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """``root/key`` built once by ``build(tmp_dir)`` (which writes ``visguard_tiny.json`` last) and reused.

    The root is ``cache_dir or $VISGUARD_CACHE or ~/.cache/visguard/tiny``. ``build`` runs in a
    temporary sibling directory that is moved into place with :func:`os.replace`, so concurrent
    builders are safe: the first one to finish wins and the others reuse its result.
    """
    root = pathlib.Path(
        cache_dir or os.environ.get("VISGUARD_CACHE") or pathlib.Path.home() / ".cache" / "visguard" / "tiny"
    ).expanduser()
    final = root / key
    if (final / "visguard_tiny.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; let other users (e.g. a server) read it
        try:
            os.replace(tmp, final)
        except OSError:
            # Another builder won the race (target exists and is non-empty): use theirs.
            if not (final / "visguard_tiny.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def with_added_words(
    checkpoint: str | os.PathLike[str], words: tuple[str, ...], output: str | os.PathLike[str]
) -> pathlib.Path:
    """Copy a tiny checkpoint with ``words`` added to its tokenizer as (non-special) added tokens.

    An added token is cut out of the text before pre-tokenization, so ``" Safe"`` then encodes as
    a space token followed by ``"Safe"``: the shape of a real tokenizer that splits a verdict
    spelling. The embeddings are resized (new rows random) so the model still loads and runs.

    Args:
        checkpoint: a directory from :func:`cached_tiny_checkpoint`.
        words: the words to add, e.g. ``("Safe", "Unsafe")``.
        output: the new checkpoint directory (created).

    Returns:
        ``output`` as a path.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = pathlib.Path(output)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    processor.tokenizer.add_tokens(list(words))
    model.resize_token_embeddings(len(processor.tokenizer))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
