"""Hugging Face prompt codec shared by the backends that run HF checkpoints (transformers, vLLM).

One place renders a :class:`~visguard.format.GuardPrompt` with the checkpoint's own chat template,
finds the verdict spellings' token ids, lists the tokenizer's control strings, and maps generated
token ids back to text spans, so every such backend builds identical inputs and reads outputs
identically.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from visguard.backend import Generation
from visguard.errors import BackendError
from visguard.format import GuardPrompt

_PROCESSOR_TOKEN_ATTRS = ("image_token", "boi_token", "eoi_token", "video_token", "fake_image_token")


class HFPromptCodec:
    """Render prompts and read tokens for one HF processor (or bare tokenizer).

    Args:
        processor: an ``AutoProcessor`` result (or a tokenizer for text-only models).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._verdict_ids: dict[tuple, tuple[list[int], list[int]]] = {}
        specials = set(self.tokenizer.all_special_tokens)
        specials.update(t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special)
        for attr in _PROCESSOR_TOKEN_ATTRS:
            token = getattr(processor, attr, None)
            if isinstance(token, str):
                specials.add(token)
        #: strings the tokenizer reads as control tokens (neutralised in untrusted text)
        self.special_tokens = frozenset(specials)

    def render(self, prompt: GuardPrompt) -> str:
        """The exact prompt string the model sees (chat template + assistant prefix)."""
        text = self.processor.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=False, **dict(prompt.template_kwargs))
        return text + prompt.assistant_prefix

    def verdict_token_ids(self, prefix: str, words: Mapping[str, tuple[str, ...]]) -> tuple[list[int], list[int]]:
        """First token id of each verdict spelling as it follows ``prefix`` (safe ids, unsafe ids).

        Raises:
            BackendError: the spellings do not map to distinct first tokens.
        """
        key = (prefix, tuple((k, tuple(v)) for k, v in sorted(words.items())))
        if key not in self._verdict_ids:
            enc = self.tokenizer.encode
            head = enc(prefix, add_special_tokens=False) if prefix else []
            ids: dict[str, list[int]] = defaultdict(list)
            for label in ("safe", "unsafe"):
                for word in words.get(label, ()):
                    full = enc(prefix + word, add_special_tokens=False)
                    if full[: len(head)] == head and len(full) > len(head):
                        tid = full[len(head)]
                    else:
                        tid = enc(word, add_special_tokens=False)[0]
                    if tid not in ids[label]:
                        ids[label].append(tid)
            clash = set(ids["safe"]) & set(ids["unsafe"])
            if not ids["safe"] or not ids["unsafe"] or clash:
                raise BackendError(f"verdict words do not map to distinct first tokens with this tokenizer: {dict(ids)}")
            self._verdict_ids[key] = (ids["safe"], ids["unsafe"])
        return self._verdict_ids[key]

    def generation(self, ids: list[int], probs: list[float | None]) -> Generation:
        """A :class:`Generation` for generated token ``ids`` with per-token verdict probabilities."""
        decode = self.tokenizer.decode
        spans, prev = [], ""
        for k in range(len(ids)):
            cur = decode(ids[: k + 1], skip_special_tokens=True)
            spans.append((len(prev), len(cur)))
            prev = cur
        return Generation(text=prev, token_spans=tuple(spans), step_scores=tuple(probs))


def load_image_text_model(
    model: str,
    *,
    role: str = "guard",
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` of an image-text-to-text checkpoint, safetensors only.

    Args:
        model: hub id or local path.
        role: ``"guard"`` or ``"host"``, for error messages.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU) or a torch dtype name.
        trust_remote_code: allow the checkpoint's own code (off by default).
        revision: hub revision.
        attn_implementation: e.g. ``"sdpa"``.

    Raises:
        BackendError: unknown dtype, or the checkpoint cannot be loaded.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise BackendError(f"unknown dtype {dtype!r}")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        processor = AutoProcessor.from_pretrained(model, **kwargs)
        hf_model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, use_safetensors=True, **kwargs, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise BackendError(f"cannot load {role} model {model!r} with transformers: {exc}") from exc
    return hf_model.to(device), processor
