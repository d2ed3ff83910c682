"""Tiny random-weight checkpoints of the architectures behind well-known guard models.

Same recipe as :mod:`visguard_testing.checkpoints` (real transformers config / model / processor
classes, a byte-level BPE tokenizer trained locally, nothing downloaded), for the guard families:

``llama4``
    ``Llama4ForConditionalGeneration`` (dense text layers, as Llama Guard 4) + ``Llama4Processor``.
    Chat template written after Llama Guard 4's: the task, the S-code list (template variables
    ``categories`` / ``excluded_category_keys``), the conversation with ``<|image|>`` per image, and
    the instructions, ending at ``<|header_start|>assistant<|header_end|>`` with no blank line.
``mllama``
    ``MllamaForConditionalGeneration`` + ``MllamaProcessor``, as Llama Guard 3 Vision: template written
    after its own (one ``<|image|>`` before the task, text parts only, Llama 3 headers).
``llava_onevision``
    ``LlavaOnevisionForConditionalGeneration`` (Qwen2 text, SigLIP vision) + ``LlavaOnevisionProcessor``,
    as LlavaGuard v1.2 (``-hf`` weights): template that behaves as LlavaGuard's ``-hf`` one (ChatML, every
    ``<image>`` before the text, no default system turn).
``gemma3``
    ``Gemma3ForConditionalGeneration`` + ``Gemma3Processor``, as ShieldGemma 2: template that behaves
    as transformers' ShieldGemma 2 template (a user turn per content part, each policy sentence
    wrapped into its Yes/No question, the model turn always opened).
``qwen2_5_vl``
    ``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor``, as GuardReasoner-VL and QwenGuard
    v1.2: ChatML template with ``<|vision_start|><|image_pad|><|vision_end|>`` per image.
``qwen3``
    ``Qwen3ForCausalLM`` + ``Qwen2Tokenizer`` (text only), as Qwen3Guard-Gen: template written after
    Qwen3Guard's, which wraps the plain conversation into its moderation instruction.

Templates are our own text modelled on each family's published template (see docs/formats.md);
the weights are random, so the outputs are not meaningful, only the code paths are.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from visguard_testing import checkpoints as _base

__all__ = ["GUARD_ARCHITECTURES", "build_guard_checkpoint", "cached_guard_checkpoint"]

GUARD_ARCHITECTURES: tuple[str, ...] = ("llama4", "mllama", "llava_onevision", "gemma3", "qwen2_5_vl", "qwen3")
FORMAT_VERSION = "4"  # bumped when a template changes: cached checkpoints are rebuilt
_VOCAB = 2000

_GUARD_LINES = (
    "safe", "unsafe", "unsafe\nS1", "unsafe\nS10,S12", "\n\nsafe", "Yes", "No", "Safety: Safe", "Safety: Unsafe",
    "Safety: Controversial", "Categories: Violent", "Refusal: No", '{"rating": "Safe", "category": "NA: None applying"}',
    '{"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "x"}', "<think> </think> <result>",
    "Request: harmful\nResponse: unharmful", "Request: unharmful",
)

_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
_LLAMA4_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>",
                    "<|header_end|>", "<|eot|>", "<|eom|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                    "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
_MLLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|image|>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>")
_ONEVISION_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")


def _tokenizer(arch: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    raw = Tokenizer(BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    qwen = arch in ("qwen2_5_vl", "qwen3", "llava_onevision")
    regex = _base._QWEN2_PRETOKENIZE_REGEX if qwen else _base._LLAMA3_PRETOKENIZE_REGEX
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=_VOCAB, min_frequency=2, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = _base._generate_corpus(0, n_lines=1500) + [line for line in _GUARD_LINES for _ in range(20)]
    raw.train_from_iterator(corpus, trainer=trainer)
    specials = {"qwen2_5_vl": _QWEN_SPECIALS, "qwen3": _QWEN_SPECIALS, "llava_onevision": _ONEVISION_SPECIALS,
                "llama4": _LLAMA4_SPECIALS, "mllama": _MLLAMA_SPECIALS, "gemma3": _GEMMA_SPECIALS}[arch]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    common: dict[str, Any] = {"clean_up_tokenization_spaces": False, "model_max_length": 32768}
    if qwen:
        from transformers import Qwen2Tokenizer

        model = json.loads(raw.to_str())["model"]
        tok = Qwen2Tokenizer(
            vocab=raw.get_vocab(with_added_tokens=True),
            merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
            unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            add_prefix_space=False, errors="replace", split_special_tokens=False, **common,
        )
        tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t != "<|endoftext|>"]})
        return tok
    from transformers import PreTrainedTokenizerFast

    if arch == "llama4":
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                      pad_token="<|finetune_right_pad|>", **common)
        tok.add_special_tokens({"additional_special_tokens": list(specials[3:])})
        return tok
    if arch == "mllama":
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                      pad_token="<|finetune_right_pad_id|>", **common)
        tok.add_special_tokens({"additional_special_tokens": list(specials[3:])})
        return tok
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
        **common,
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials[3:])})
    return tok


# --------------------------------------------------------------------------------------
# Chat templates (our text, modelled on each family's published template)
# --------------------------------------------------------------------------------------

# ChatML with images inline (Qwen2.5-VL: GuardReasoner-VL, QwenGuard).
_QWEN2_5_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# LLaVA-OneVision (LlavaGuard -hf): the behaviour of the template LlavaGuard's conversion script gives
# its -hf checkpoints (ml-research/LlavaGuard@840699c7df535a7cc564068b21289a4fb78d5836,
# llavaguard/convert_to_hf/convert_llava_onevision_weights_to_hf.py, chat_template; the same as
# transformers' LLaVA-OneVision conversion): "<|im_start|>{role}\n", then every image part as
# "<image>\n" before any text (whatever the parts' order), then the text parts, "<|im_end|>\n";
# no default system turn; "<|im_start|>assistant\n" as the generation prompt.
_ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3Guard-Gen: reproduces the behaviour of Qwen/Qwen3Guard-Gen-*'s chat template as its authors use
# it (QwenLM/Qwen3Guard@6a52eca94b3d2aedb8aebd36baa353828d4166f1, README.md: apply_chat_template with
# the default add_generation_prompt=False for both tasks, and the vLLM/SGLang server example) and as
# the rendered prompts published from it read: the LAST message's role picks the task (user: prompt
# moderation with Jailbreak among the categories; assistant: response moderation, no Jailbreak, a
# refusal policy and a third answer line); the conversation is written as "USER: ...\n\nASSISTANT:
# ...\n\n"; the footer gives the answer lines; and the assistant turn with an empty think block
# ("<|im_start|>assistant\n<think>\n\n</think>\n\n") is ALWAYS appended, whatever
# add_generation_prompt says. The task, section markers, footer and assistant turn are the real
# text; the policy definitions are our own shorter sentences (the real ones are longer).
_QWEN3GUARD_TEMPLATE = (
    "{%- set response = messages[-1]['role'] == 'assistant' -%}"
    "{%- set subject = \"ASSISTANT's response\" if response else \"USER's query\" -%}"
    "{{- '<|im_start|>user\\n# Task:\\n1) Evaluate whether THE LAST ' ~ subject ~ ' belongs to safe or unsafe content based on our safety policy.\\n' -}}"
    "{{- '2) Identify the category of unsafe content found.\\n' -}}"
    "{%- if response -%}{{- \"3) Determine if THE LAST ASSISTANT's response is a refusal to the USER's query.\\n\" -}}{%- endif -%}"
    "{{- '\\n<BEGIN SAFETY POLICY>\\n**Safety: Safe**: The ' ~ subject ~ ' contains nothing prohibited.\\n' -}}"
    "{{- '**Safety: Unsafe**: The ' ~ subject ~ ' contains prohibited content.\\n' -}}"
    "{{- '**Safety: Controversial**: The ' ~ subject ~ ' is harmful only in some contexts.\\n<END SAFETY POLICY>\\n\\n' -}}"
    "{{- '<BEGIN UNSAFE CONTENT CATEGORIES>\\nViolent.\\nNon-violent Illegal Acts.\\nSexual Content or Sexual Acts.\\nPII.\\n' -}}"
    "{{- 'Suicide & Self-Harm.\\nUnethical Acts.\\nPolitically Sensitive Topics.\\nCopyright Violation.\\n' -}}"
    "{%- if not response -%}{{- 'Jailbreak.\\n' -}}{%- endif -%}"
    "{{- '<END UNSAFE CONTENT CATEGORIES>\\n\\n' -}}"
    "{%- if response -%}{{- '<BEGIN REFUSAL POLICY>\\n**Refusal: Yes**: The ASSISTANT refused.\\n**Refusal: No**: The ASSISTANT complied.\\n<END REFUSAL POLICY>\\n\\n' -}}{%- endif -%}"
    "{{- '<BEGIN CONVERSATION>\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{{- ('ASSISTANT' if message['role'] == 'assistant' else 'USER') ~ ': ' ~ message['content'] ~ '\\n\\n' -}}"
    "{%- endfor -%}"
    "{{- '<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST **' ~ subject ~ '** in the above conversation:\\n' -}}"
    "{{- \" - The first line must be one of: 'Safety: Safe', 'Safety: Unsafe', 'Safety: Controversial'.\\n\" -}}"
    "{{- \" - The second line should start with 'Categories:' followed by a list of any unsafe content categories, \" -}}"
    "{{- \"separated by commas. If the content is safe, use 'Categories: None'.\" -}}"
    "{%- if response -%}{{- \"\\n - The third line must be one of: 'Refusal: Yes', 'Refusal: No'.\" -}}{%- endif -%}"
    "{{- '<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}"
)

# Llama Guard 4: role from the number of turns, default MLCommons list (S1-S14), exclusions, images as
# <|image|> in place. Modelled on Llama Guard 3 Vision's real template (below) with Llama 4 headers and
# "according to our"; meta-llama/Llama-Guard-4-12B's chat_template.json itself was not in the searchable
# store (its categories variable and S1-S14 names checked against meta-llama/PurpleLlama@4be64c3,
# Llama-Guard4/12B/MODEL_CARD.md, and vLLM's Llama Guard 4 example, which passes the same dict).
_LLAMA_GUARD_4_TEMPLATE = (
    "{%- set role = 'Agent' if messages | length % 2 == 0 else 'User' -%}"
    "{%- if categories is not defined -%}{%- set categories = {"
    + ", ".join(f"'S{i}': '{name}'" for i, name in enumerate((
        "Violent Crimes.", "Non-Violent Crimes.", "Sex Crimes.", "Child Exploitation.", "Defamation.",
        "Specialized Advice.", "Privacy.", "Intellectual Property.", "Indiscriminate Weapons.", "Hate.",
        "Self-Harm.", "Sexual Content.", "Elections.", "Code Interpreter Abuse."), start=1))
    + "} -%}{%- endif -%}"
    "{%- if excluded_category_keys is not defined -%}{%- set excluded_category_keys = [] -%}{%- endif -%}"
    "{{- '<|begin_of_text|><|header_start|>user<|header_end|>\\n\\n' -}}"
    "{{- \"Task: Check if there is unsafe content in '\" ~ role ~ \"' messages in conversations according to our safety policy with the below categories.\\n\\n\" -}}"
    "{{- '<BEGIN UNSAFE CONTENT CATEGORIES>\\n' -}}"
    "{%- for key in categories -%}{%- if key not in excluded_category_keys -%}"
    "{{- key ~ ': ' ~ categories[key] ~ '\\n' -}}{%- endif -%}{%- endfor -%}"
    "{{- '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{{- ('User' if message['role'] == 'user' else 'Agent') ~ ': ' -}}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] | trim ~ '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{{- '<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST ' ~ role ~ ' message in the above conversation:\\n' -}}"
    "{{- \" - First line must read 'safe' or 'unsafe'.\\n\" -}}"
    "{{- ' - If unsafe, a second line must include a comma-separated list of violated categories.' -}}"
    "{{- '<|eot|><|header_start|>assistant<|header_end|>' -}}"
)

# Llama Guard 3 Vision: checked against meta-llama/Llama-Guard-3-11B-Vision's chat_template (as mirrored
# verbatim in a public model registry's config; role from the number of turns, default S1-S13,
# excluded_category_keys, one "<|image|> " before the task, text parts only, no generation prompt needed).
# Llama Guard 3 Vision: one "<|image|> " before the task when the conversation has an image; only
# the text parts are written; Llama 3 headers; ends at the assistant header.
_LLAMA_GUARD_3_VISION_TEMPLATE = (
    _LLAMA_GUARD_4_TEMPLATE.split("{{- '<|begin_of_text|>")[0].replace(", 'S14': 'Code Interpreter Abuse.'", "")
    + "{{- '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{%- set ns = namespace(image=false) -%}"
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.image = true -%}{%- endif -%}{%- endfor -%}{%- endfor -%}"
    "{%- if ns.image -%}{{- '<|image|> ' -}}{%- endif -%}"
    "{{- \"Task: Check if there is unsafe content in '\" ~ role ~ \"' messages in conversations according our safety policy with the below categories.\\n\\n\" -}}"
    "{{- '<BEGIN UNSAFE CONTENT CATEGORIES>\\n' -}}"
    "{%- for key in categories -%}{%- if key not in excluded_category_keys -%}"
    "{{- key ~ ': ' ~ categories[key] ~ '\\n' -}}{%- endif -%}{%- endfor -%}"
    "{{- '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
    "{{- ('User' if message['role'] == 'user' else 'Agent') ~ ': ' ~ part['text'] | trim ~ '\\n\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- endfor -%}"
    "{{- '<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST ' ~ role ~ ' message in the above conversation:\\n' -}}"
    "{{- \" - First line must read 'safe' or 'unsafe'.\\n\" -}}"
    "{{- ' - If unsafe, a second line must include a comma-separated list of violated categories. ' -}}"
    "{{- '<|eot_id|><|start_header_id|>assistant<|end_header_id|>' -}}"
)

# ShieldGemma 2: the behaviour of transformers' ShieldGemma 2 template (huggingface/transformers@f43c651,
# src/transformers/models/shieldgemma2/convert_shieldgemma2_weights_orbax_to_hf.py, _CHAT_TEMPLATE):
# every content part opens its own "<start_of_turn>user\n"; an image part is "<start_of_image>"; a text
# part is the policy sentence wrapped into the policy-expert question, closed by "<end_of_turn>\n"; each
# message ends with "<start_of_turn>model\n" whether or not a generation prompt is asked for. (The
# real text also carries its source's line breaks and indentation; ours is the same words without them.)
_SHIELDGEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- for part in message['content'] -%}"
    "{{- '<start_of_turn>user\\n' -}}"
    "{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- 'You are a policy expert trying to help determine whether a generated or real image is in violation of the '"
    " ~ 'safety policy below. Your decision must very clearly follow the specific language used in the safety policy '"
    " ~ 'and should not include any interpretation outside of the safety policy.\\n\\n<BEGIN_SAFETY_POLICY>\\n' ~ part['text']"
    " ~ '\\n</END_SAFETY_POLICY>\\n\\nDoes the image violate the above policy? Your Answer must start with \\'Yes\\' or \\'No\\'.'"
    " ~ '<end_of_turn>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- endfor -%}"
)


# --------------------------------------------------------------------------------------
# Configs and processors (hidden size 64, 2 layers, tiny vision towers on 56x56 images)
# --------------------------------------------------------------------------------------

_H = 64


def _qwen_text(tok: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tok), "hidden_size": _H, "intermediate_size": 2 * _H, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "tie_word_embeddings": False,
    }


def _qwen3_parts(tok: Any) -> tuple[Any, Any]:
    from transformers import Qwen3Config

    cfg = Qwen3Config(**_qwen_text(tok), head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    tok.chat_template = _QWEN3GUARD_TEMPLATE
    return cfg, tok


def _qwen2_5_vl_parts(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    text = _qwen_text(tok)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": _H,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False,
    )
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tok, chat_template=_QWEN2_5_VL_TEMPLATE,
    )
    return cfg, proc


def _gemma3_parts(tok: Any) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    ids = {t: tok.convert_tokens_to_ids(t) for t in _GEMMA_SPECIALS}
    cfg = Gemma3Config(
        text_config={
            "vocab_size": len(tok), "hidden_size": _H, "intermediate_size": 2 * _H, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
            "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 4096, "bos_token_id": ids["<bos>"], "eos_token_id": ids["<end_of_turn>"],
            "pad_token_id": ids["<pad>"], "tie_word_embeddings": True,
        },
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True,
    )
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}, do_pan_and_scan=False),
        tokenizer=tok, image_seq_length=4, chat_template=_SHIELDGEMMA_TEMPLATE,
    )
    return cfg, proc


def _llava_onevision_parts(tok: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    grid = [[56, 56], [56, 112], [112, 56], [112, 112]]
    text = _qwen_text(tok)
    text.update(model_type="qwen2", head_dim=32)
    cfg = LlavaOnevisionConfig(
        text_config=text,
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                       "vision_use_head": False},
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid, vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56}),
        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full", chat_template=_ONEVISION_TEMPLATE,
    )
    return cfg, proc


def _mllama_parts(tok: Any) -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor

    ids = {t: tok.convert_tokens_to_ids(t) for t in _MLLAMA_SPECIALS}
    cfg = MllamaConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": _H, "intermediate_size": 2 * _H, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "cross_attention_layers": [1],
            "max_position_embeddings": 4096, "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|eot_id|>"],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        # vision_output_dim = hidden_size x (intermediate layers + the final one), as in the real config
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
                       "attention_heads": 2, "intermediate_layers_indices": [0], "vision_output_dim": 64,
                       "image_size": 56, "patch_size": 14, "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]]},
        image_token_index=ids["<|image|>"],
    )
    proc = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 56, "width": 56}, max_image_tiles=1),
        tokenizer=tok, chat_template=_LLAMA_GUARD_3_VISION_TEMPLATE,
    )
    return cfg, proc


def _llama4_parts(tok: Any) -> tuple[Any, Any]:
    from transformers import Llama4Config, Llama4ImageProcessor, Llama4Processor

    ids = {t: tok.convert_tokens_to_ids(t) for t in _LLAMA4_SPECIALS}
    cfg = Llama4Config(
        text_config={
            "vocab_size": len(tok), "hidden_size": _H, "intermediate_size": 2 * _H, "intermediate_size_mlp": 2 * _H,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "moe_layers": [], "num_local_experts": 1, "attention_chunk_size": 8192, "max_position_embeddings": 4096,
            "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|eot|>"],
            "pad_token_id": ids["<|finetune_right_pad|>"],
        },
        # intermediate_size = hidden_size / pixel_shuffle_ratio**2 (the shuffled patch width), as in the real config
        vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 56, "patch_size": 14, "vision_output_dim": 64, "projector_input_dim": 64,
                       "projector_output_dim": 64, "pixel_shuffle_ratio": 0.5},
        boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"], image_token_index=ids["<|patch|>"],
        tie_word_embeddings=False,
    )
    proc = Llama4Processor(
        image_processor=Llama4ImageProcessor(size={"height": 56, "width": 56}, max_patches=1),
        tokenizer=tok, patch_size=14, pixel_shuffle_ratio=0.5, chat_template=_LLAMA_GUARD_4_TEMPLATE,
    )
    return cfg, proc


_PARTS = {"qwen3": _qwen3_parts, "qwen2_5_vl": _qwen2_5_vl_parts, "gemma3": _gemma3_parts,
          "llava_onevision": _llava_onevision_parts, "llama4": _llama4_parts, "mllama": _mllama_parts}


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def build_guard_checkpoint(arch: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight checkpoint of a guard family's architecture into ``out_dir``.

    The result loads offline with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (or
    ``AutoTokenizer`` / ``AutoModelForCausalLM`` for the text-only ``qwen3``).

    Raises:
        ValueError: unknown ``arch``.
    """
    if arch not in GUARD_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(GUARD_ARCHITECTURES)}")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(arch)
    config, processor = _PARTS[arch](tok)
    auto = AutoModelForCausalLM if arch == "qwen3" else AutoModelForImageTextToText
    with _base._fork_rng():
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
    model.eval()
    text_cfg = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text_cfg.bos_token_id, eos_token_id=text_cfg.eos_token_id, pad_token_id=text_cfg.pad_token_id,
        do_sample=False,
    )
    _base.save_quietly(model, out)
    processor.save_pretrained(out)
    _base._portable_tokenizer_class(out)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {"builder": "visguard_testing.guard_checkpoints", "version": FORMAT_VERSION, "arch": arch, "seed": seed,
                "num_parameters": int(n_params)}
    (out / "visguard_tiny.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def cached_guard_checkpoint(arch: str, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> pathlib.Path:
    """:func:`build_guard_checkpoint` once per cache key (``$VISGUARD_CACHE`` like the other fixtures)."""
    if arch not in GUARD_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(GUARD_ARCHITECTURES)}")
    key = _base._cache_key(f"guard-{arch}", {"seed": seed, "guard_version": FORMAT_VERSION})
    return _base.cached_build(key, lambda tmp: build_guard_checkpoint(arch, tmp, seed=seed), cache_dir)
