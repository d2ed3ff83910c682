"""The ``transformers`` backend: a guard model in this process through Hugging Face transformers.

Loads ``AutoProcessor`` + ``AutoModelForImageTextToText`` (safetensors only, ``trust_remote_code``
off unless asked), renders prompts with the model's own chat template, batches requests with left
padding, and serialises model calls with a lock so one instance is safe to share between threads.

- ``score``: one forward pass computing only the last position's logits (``logits_to_keep=1``);
  P(unsafe) = softmax over the verdict tokens' logits there.
- ``generate``: greedy decoding; for every generated token, the same restricted softmax is kept so
  the verdict word's probability can be read wherever the format finds it.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from visguard.backend import Backend, Generation
from visguard.errors import BackendError
from visguard.format import GuardPrompt
from visguard.hf import HFPromptCodec, load_image_text_model
from visguard.hookspecs import hookimpl


class TransformersBackend(Backend):
    """Run a Hugging Face image-text-to-text model in process.

    Args:
        model: hub id or local path.
        device: ``"auto"`` (CUDA when available, else CPU), or any torch device string.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU) or a torch dtype name.
        trust_remote_code: allow the checkpoint's own Python code (off by default).
        max_batch_size: largest batch sent through the model at once.
        revision: hub revision to load.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``"sdpa"``).
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_batch_size: int = 8,
        revision: str | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        hf_model, processor = load_image_text_model(
            model, role="guard", device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            revision=revision, attn_implementation=attn_implementation,
        )
        self._setup(hf_model, processor, model_id=str(model), max_batch_size=max_batch_size)

    @classmethod
    def from_objects(cls, model: Any, processor: Any, *, model_id: str = "", max_batch_size: int = 8) -> TransformersBackend:
        """Wrap an already loaded model and processor (e.g. to share the host model as its own guard)."""
        self = cls.__new__(cls)
        self._setup(model, processor, model_id=model_id or getattr(model.config, "_name_or_path", ""), max_batch_size=max_batch_size)
        return self

    def _setup(self, model: Any, processor: Any, *, model_id: str, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise BackendError("max_batch_size must be >= 1")
        self.model = model.eval()
        self.codec = HFPromptCodec(processor)
        self.processor = processor
        self.tokenizer = self.codec.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def special_tokens(self) -> frozenset[str]:
        return self.codec.special_tokens

    @property
    def dropped_verdict_spellings(self) -> tuple[str, ...]:
        """Verdict spellings not scored because this tokenizer gives them no distinct first token."""
        return self.codec.dropped_verdict_spellings

    def check_verdict_words(self, prefix: str, words: Any) -> None:
        self.codec.verdict_token_ids(prefix, words)

    @property
    def max_prompt_tokens(self) -> int | None:
        """The text model's context length (``max_position_embeddings``), or ``None`` when unknown."""
        config = self.model.config
        for cfg in (getattr(config, "text_config", None), config):
            n = getattr(cfg, "max_position_embeddings", None)
            if isinstance(n, int) and n > 0:
                return n
        return None

    def prompt_too_long(self, prompt: GuardPrompt) -> str | None:
        limit = self.max_prompt_tokens
        if limit is None:
            return None
        n = len(self.tokenizer(self.render(prompt), add_special_tokens=False, verbose=False)["input_ids"])
        if n > limit:  # images add their patches on top: the text alone must already fit
            return f"the guard prompt is {n} tokens long, more than the guard model's limit of {limit}"
        return None

    # ------------------------------------------------------------------ rendering
    def render(self, prompt: GuardPrompt) -> str:
        """The exact prompt string the model sees (chat template + assistant prefix)."""
        return self.codec.render(prompt)

    def encode(self, prompts: Sequence[GuardPrompt]) -> Any:
        """Processor outputs for a batch of prompts with the same number of images, on the model's device."""
        texts = [self.render(p) for p in prompts]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if prompts[0].images:
            kwargs["images"] = [list(p.images) for p in prompts]
        inputs = self.processor(**kwargs)
        dtype = self.model.dtype
        return {
            k: (v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)) if hasattr(v, "to") else v
            for k, v in inputs.items()
        }

    # ------------------------------------------------------------------ running
    def _groups(self, prompts: Sequence[GuardPrompt]) -> list[list[int]]:
        by_count: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_count[len(p.images)].append(i)
        groups = []
        for idx in by_count.values():
            groups += [idx[s : s + self.max_batch_size] for s in range(0, len(idx), self.max_batch_size)]
        return groups

    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        import torch

        out: list[float] = [0.0] * len(prompts)
        for group in self._groups(prompts):
            batch = [prompts[i] for i in group]
            safe_ids, unsafe_ids = self.codec.verdict_token_ids(batch[0].verdict_prefix, batch[0].verdict_words)
            with self._lock, torch.inference_mode():
                inputs = self.encode(batch)
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
            probs = _unsafe_probability(logits, safe_ids, unsafe_ids)
            for i, p in zip(group, probs.tolist(), strict=True):
                out[i] = p
        return out

    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        import torch

        out: list[Generation | None] = [None] * len(prompts)
        stop_ids = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        for group in self._groups(prompts):
            batch = [prompts[i] for i in group]
            safe_ids, unsafe_ids = self.codec.verdict_token_ids(batch[0].verdict_prefix, batch[0].verdict_words)
            with self._lock, torch.inference_mode():
                inputs = self.encode(batch)
                result = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    return_dict_in_generate=True,
                    output_logits=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = result.sequences[:, inputs["input_ids"].shape[1] :]
            step_probs = torch.stack([_unsafe_probability(step.float(), safe_ids, unsafe_ids) for step in result.logits], dim=1)
            for row, i in enumerate(group):
                ids = new_tokens[row].tolist()
                n = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
                out[i] = self.codec.generation(ids[:n], step_probs[row, :n].tolist())
        return [g for g in out if g is not None]


def _unsafe_probability(logits: Any, safe_ids: list[int], unsafe_ids: list[int]) -> Any:
    import torch

    picked = logits[:, safe_ids + unsafe_ids]
    probs = torch.softmax(picked, dim=-1)
    return probs[:, len(safe_ids) :].sum(dim=-1)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


@hookimpl
def register_backends(register):
    register("transformers", TransformersBackend)
