"""The ``transformers`` backend: a guard model in this process through Hugging Face transformers.

Loads ``AutoProcessor`` + ``AutoModelForImageTextToText`` (safetensors only, ``trust_remote_code``
off unless asked), renders prompts with the model's own chat template, batches requests with left
padding, and serialises model calls with a lock so one instance is safe to share between threads.

- ``score``: one forward pass computing only the last position's logits (``logits_to_keep=1``);
  P(unsafe) = softmax over the verdict tokens' logits there. With the KV cache on (default), the
  forward covers only what is new: a prompt's static prefix (``GuardPrompt.static_parts``: the
  format's instructions and the policy's categories) is computed once per (model, format, policy)
  and shared by every check and batch; a prompt that extends an earlier scored prompt with the
  same images (a post-check after its pre-check, a stream's re-check after the previous one)
  continues from that prompt's cache (:class:`~visguard.integrations.hf.KVCacheStore`, LRU, bounded in bytes).
  In a batch whose every row has its own cached prefix holding its images (follow-ups after a batched
  generation, post-checks after their pre-checks), each row continues from its own.
  In an explained check (``Policy(explain=True)``, inside :meth:`prompts_sharing_prefixes`) the
  subsets begin like one another: the prompts no other one begins like run first (the request,
  ``[image 2, text]``, ``[text]`` for two images), then the rest continue from their caches, found by
  image prefix (``[image 1, text]`` from the request's ``[static, image 1, ...]``), computing only their
  tails and encoding none of their pixels (where their images hold at least ``reuse_min_tokens``
  tokens; tiny images run as one batch).
  Verdicts are the same as without the cache (tests compare the scores on four architectures).
- ``generate``: greedy decoding; for every generated token, the same restricted softmax is kept so
  the verdict word's probability can be read wherever the format finds it. With the KV cache on,
  the prefill continues from each row's longest cached prefix (the static prefix, or a stored prompt
  with the same images: a fast pre-check's, an earlier generation's) and computes only the rest;
  each row's final cache (its prompt and the generated tokens fed back, left padding removed) goes
  into the same store, so a reason-mode follow-up verdict prompt (generation prompt + answer +
  question, e.g. ``mirage``) computes only what follows the answer. Reuse is token-exact: where the
  follow-up's own tokenisation of the answer parts from the generated ids, it continues from there.
- Each batch is rendered and encoded once (a request's images preprocessed once: the image
  processor's outputs for the same images are kept, a few batches' worth, for its post-check or
  follow-up); a prompt whose encoding (images expanded) is longer than
  the model's ``max_position_embeddings`` is refused with
  :class:`~visguard.core.errors.PromptTooLongError` (its index and why) before the model runs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from visguard.core.errors import BackendError, PromptTooLongError
from visguard.engine.backend import Backend, BackendDiagnostics, Generation
from visguard.engine.format import GuardPrompt
from visguard.hookspecs import hookimpl
from visguard.integrations.hf import HFPromptCodec, KVCacheStore, load_image_text_model, too_long_reason


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
        kv_cache_mb: memory for reusable key/value caches of scored prompts and of generations
            (static prefixes are kept apart and always); 0 turns prefix, pre -> post and
            generation -> follow-up reuse off. Always off for models
            with sliding-window attention layers (Gemma 3), whose caches keep only the window.

    One forward runs at a time, under the backend's lock (the model's own state, e.g. Qwen2-VL's
    ``rope_deltas``, and the processor's tokenizer are not safe to share between threads). A
    forward cannot be interrupted: a hung one keeps the lock until it returns, so no later check
    on this backend can run meanwhile. ``serial = True`` tells the guard so: after the first
    abandoned (timed-out) batch, later checks fail at once as ``unavailable`` ("guard backend
    stalled") instead of each waiting out its own time limit; once the forward returns, checks are
    served again (``tests/test_security_round2.py::test_12_*``).
    """

    name = "transformers"
    #: an explained check's subsets continue from one another's caches only when that keeps at least
    #: this many image tokens from being computed again (fewer: the extra forward costs more than it
    #: saves; the demo guard's 56 px images, 4 tokens each, once kept 96 and ran 2.8x slower than one
    #: phase). 64, a 224 px Qwen2-VL image: on the bench model (CPU) 2 images of 224 px keep 66 and
    #: time as one phase or better, 448 px (258 kept) 1.6x against 2.5x (docs/latency.md)
    reuse_min_tokens = 64
    #: one call at a time (see above): a stalled call blocks every later one
    serial = True

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
        kv_cache_mb: float = 256,
    ) -> None:
        hf_model, processor = load_image_text_model(
            model, role="guard", device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            revision=revision, attn_implementation=attn_implementation,
        )
        self._setup(hf_model, processor, model_id=str(model), max_batch_size=max_batch_size, kv_cache_mb=kv_cache_mb)

    @classmethod
    def from_objects(
        cls, model: Any, processor: Any, *, model_id: str = "", max_batch_size: int = 8, kv_cache_mb: float = 256
    ) -> TransformersBackend:
        """Wrap an already loaded model and processor (e.g. to share the host model as its own guard)."""
        self = cls.__new__(cls)
        self._setup(model, processor, model_id=model_id or getattr(model.config, "_name_or_path", ""),
                    max_batch_size=max_batch_size, kv_cache_mb=kv_cache_mb)
        return self

    def _setup(self, model: Any, processor: Any, *, model_id: str, max_batch_size: int, kv_cache_mb: float) -> None:
        if max_batch_size < 1:
            raise BackendError("max_batch_size must be >= 1")
        if kv_cache_mb < 0:
            raise BackendError("kv_cache_mb must be >= 0")
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
        #: reusable caches of scored prompts (``None``: caching off)
        self.kv_cache: KVCacheStore | None = KVCacheStore(max_bytes=int(kv_cache_mb * (1 << 20))) if kv_cache_mb > 0 else None
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if "sliding_attention" in (getattr(text_config, "layer_types", None) or ()):
            # A sliding-window layer's cache keeps only its last window of keys (Gemma 3): a stored prefix
            # longer than the window cannot be continued, so these models run without prefix reuse.
            self.kv_cache = None
        # static prefixes by (cache salt, prefix text): tenants with different salts share nothing
        self._static: dict[tuple[str, str], tuple[Any, list[tuple[Any, Any]]] | None] = {}
        # per static prefix: whether encoding only what follows it gives the whole text's encoding
        self._static_split_ok: dict[tuple[str, str], bool] = {}
        #: tokens taken from caches / computed by scoring forwards, prompts served from each kind of cache,
        #: generated rows whose caches the store kept for their follow-ups, and prompt tokens taken from
        #: caches / computed by generations' prefills (all counted only with the KV cache on)
        self.cache_stats = {"reused_tokens": 0, "computed_tokens": 0, "static_hits": 0, "prompt_hits": 0,
                            "generations_kept": 0, "generation_reused_tokens": 0, "generation_computed_tokens": 0}
        forward = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        cfg = self.model.config
        image_token = getattr(cfg, "image_token_id", None)
        self._image_token = getattr(cfg, "image_token_index", None) if image_token is None else image_token
        self._rope_index = getattr(getattr(self.model, "model", None), "get_rope_index", None)

    def clear_cache(self) -> None:
        """Drop everything this backend keeps between calls: the static prefixes' caches, the per-prompt
        prefix store, the images' kept preprocessing outputs and the per-prefix answers of the one-time
        comparison of the prefix-split encoding. The next check computes as the first one did."""
        with self._lock:
            self._static.clear()
            self._static_split_ok.clear()
            if self.kv_cache is not None:
                self.kv_cache.clear()
            pixels = getattr(self.processor, "image_processor", None)
            if isinstance(pixels, _PixelCache):
                pixels.clear()

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

    # ------------------------------------------------------------------ rendering
    def render(self, prompt: GuardPrompt) -> str:
        """The exact prompt string the model sees (chat template + assistant prefix)."""
        return self.codec.render(prompt)

    def encode(self, prompts: Sequence[GuardPrompt]) -> Any:
        """Processor outputs for a batch of prompts with the same number of images, on the model's device."""
        return self._to_device(self._processor_inputs(prompts, [self.render(p) for p in prompts]))

    def _processor_inputs(self, prompts: Sequence[GuardPrompt], texts: list[str], padding_side: str | None = None,
                          **text_kwargs: Any) -> dict[str, Any]:
        """The processor's outputs (on the CPU) for rendered ``texts`` of prompts with the same number of images."""
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True, **text_kwargs}
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        if not prompts[0].images:
            return dict(self.processor(**kwargs))
        kwargs["images"] = [list(p.images) for p in prompts]
        pixels = self._pixel_cache()
        if pixels is None:
            return dict(self.processor(**kwargs))
        with pixels.keyed(tuple(self._image_key(p) for p in prompts)):
            return dict(self.processor(**kwargs))

    def _after_static_inputs(self, batch: list[GuardPrompt], texts: list[str]) -> dict[str, Any] | None:
        """Right-padded processor outputs of ``texts`` whose cached static prefix is not tokenized again:
        the processor encodes what follows it, and the prefix's ids (kept with its cache) go first.

        Only where that is the same encoding: the text after the prefix starts with a special token
        (the tokenizer splits there whatever the neighbours), and, the first time per prefix, both
        encodings are made and compared (a tokenizer where they differ keeps encoding whole texts).
        ``None``: encode the whole texts.
        """
        import torch

        if self.kv_cache is None or len({p.cache_salt for p in batch}) != 1:
            return None
        prefix = self.codec.static_prefix(batch[0], texts[0])
        entry = self._static.get((batch[0].cache_salt, prefix)) if prefix else None
        if prefix is None or entry is None or not all(t.startswith(prefix) for t in texts):
            return None
        rests = [t[len(prefix) :] for t in texts]
        specials = self.codec.special_tokens
        if not all(any(r.startswith(s) for s in specials) for r in rests):
            return None
        checked = self._static_split_ok
        key = (batch[0].cache_salt, prefix)
        if checked.get(key) is False:
            return None
        out = self._processor_inputs(batch, rests, "right", add_special_tokens=False)
        rows, n = len(batch), len(entry[0])
        merged: dict[str, Any] = {}
        for name, value in out.items():
            if name == "input_ids":
                merged[name] = torch.cat([entry[0].to(value.dtype).expand(rows, n), value], dim=1)
            elif name == "attention_mask":
                merged[name] = torch.cat([value.new_ones((rows, n)), value], dim=1)
            elif hasattr(value, "shape") and tuple(value.shape) == tuple(out["input_ids"].shape):
                if name not in ("mm_token_type_ids", "token_type_ids"):
                    checked[key] = False  # a per-token output this code does not know how to extend
                    return None
                merged[name] = torch.cat([value.new_zeros((rows, n)), value], dim=1)
            else:
                merged[name] = value
        if key not in checked:
            whole = self._processor_inputs(batch, texts, "right")
            checked[key] = set(whole) == set(merged) and all(
                torch.equal(whole[k], merged[k]) for k in whole if hasattr(whole[k], "shape"))
            return whole
        return merged

    def _pixel_cache(self) -> _PixelCache | None:
        """The processor's image processor, wrapped (once) to serve the same images' outputs again
        (``None``: the processor has none, or reuse is off: no KV cache store). Checks of one request
        (a pre-check and its post-check, a generation and its follow-up) then preprocess its images once."""
        inner = getattr(self.processor, "image_processor", None)
        if inner is None or self.kv_cache is None:
            return None
        if not isinstance(inner, _PixelCache):
            inner = _PixelCache(inner)
            self.processor.image_processor = inner
        return inner

    def _prepare(self, prompts: Sequence[GuardPrompt], padding_side: str | None = None
                 ) -> list[tuple[list[int], list[str], dict[str, Any]]]:
        """Render and encode ``prompts`` once, group by group: ``[(indices, texts, processor outputs)]``.

        Each prompt's length is read from its own encoding (images expanded, as the model sees
        it), so nothing is rendered or tokenized again to check it. Caller holds the lock.

        Raises:
            PromptTooLongError: prompts longer than the model's context, before any model call.
        """
        limit = self.max_prompt_tokens
        prepared, too_long = [], {}
        for group in self._groups(prompts):
            batch = [prompts[i] for i in group]
            texts = [self.render(p) for p in batch]
            inputs = self._after_static_inputs(batch, texts) if padding_side == "right" else None
            if inputs is None:
                inputs = self._processor_inputs(batch, texts, padding_side)
            if limit is not None:
                mask = inputs.get("attention_mask")
                lengths = mask.sum(dim=1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(batch)
                too_long.update({i: too_long_reason(int(n), limit) for i, n in zip(group, lengths, strict=True) if n > limit})
            prepared.append((group, texts, inputs))
        if too_long:
            raise PromptTooLongError(too_long)
        return prepared

    # ------------------------------------------------------------------ running
    @property
    def _related(self) -> threading.local:
        """Per-thread state of :meth:`prompts_sharing_prefixes` (made on first use)."""
        local = self.__dict__.get("_related_local")
        return local if local is not None else self.__dict__.setdefault("_related_local", threading.local())

    @contextlib.contextmanager
    def prompts_sharing_prefixes(self) -> Iterator[None]:
        """This thread's :meth:`score` calls order their prompts by shared prefixes (:meth:`_phases`)."""
        before = getattr(self._related, "on", False)
        self._related.on = True
        try:
            yield
        finally:
            self._related.on = before

    def _phases(self, prompts: Sequence[GuardPrompt]) -> list[list[int]]:
        """Prompt indices in the order :meth:`score` runs them: ``[roots]`` or ``[roots, children]``.

        A prompt is a child when a root begins like it: the same chat parts (salt, template
        variables, roles, texts, images by content key) up to past the prompt's last image and past
        its static prefix, e.g. an explained check's ``[instructions, image 1, text]`` and ``[instructions,
        image 1]`` after the request ``[instructions, image 1, image 2, text]``. Roots are taken
        longest first; children run after every root, so each finds its root's cache in the prefix
        store (:meth:`KVCacheStore.lookup` by image prefix) and computes only its tail, its images'
        pixels not encoded again. Which tokens are reused is decided there, token-exact; this order
        only makes the reuse possible. No child, or children whose images hold fewer tokens than
        :attr:`reuse_min_tokens` (tiny images: the extra forward would cost more than it saves):
        one phase, the order of ``prompts``.
        """
        if len(prompts) < 2:
            return [list(range(len(prompts)))]
        signatures = [self._parts_signature(p) for p in prompts]
        roots: list[int] = []
        children: list[int] = []
        for j in sorted(range(len(prompts)), key=lambda i: (-len(signatures[i][0]), i)):
            items, need = signatures[j]
            if any(_shared_items(signatures[i][0], items, need) >= need for i in roots):
                children.append(j)
            else:
                roots.append(j)
        # Worth it only where the children's images outweigh a forward's own cost: the phases take a
        # forward more, and a child's own tail is computed either way (a small guard's tiny images:
        # one phase, as without the reuse). Not bounded by the request's own size: 2 images of 448 px
        # keep one image (258 tokens, less than the request) and time 1.6x a plain check against 2.5x.
        kept = sum(self._image_tokens(prompts[j]) for j in children)
        if not children or kept < self.reuse_min_tokens:
            return [list(range(len(prompts)))]
        return [sorted(roots), sorted(children)]

    def _image_tokens(self, prompt: GuardPrompt) -> int:
        """The tokens ``prompt``'s images expand to (the processor's own count; no tokenization)."""
        return self.codec._image_tokens(prompt) + len(prompt.images) if prompt.images else 0

    def _parts_signature(self, prompt: GuardPrompt) -> tuple[list[Any], int]:
        """A prompt's chat parts in order (what its rendering begins with, part by part) and how many
        of them another prompt must share for this one to continue from it: past its last image
        and past its static parts."""
        keys = self._image_key(prompt)[1:]
        items: list[Any] = [("salt", prompt.cache_salt, repr(sorted(prompt.template_kwargs.items())))]
        need, image = len(items) + 1 + prompt.static_parts + 1, 0  # salt, first role, static parts, one more
        for message in prompt.messages:
            items.append(("role", message.get("role")))
            content = message.get("content")
            for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                if part.get("type") == "image" and image < len(keys):
                    items.append(("image", keys[image]))
                    image += 1
                    need = max(need, len(items))
                else:
                    items.append(("part", repr(sorted(part.items()))))
        return items, need

    def _groups(self, prompts: Sequence[GuardPrompt]) -> list[list[int]]:
        """Batches of prompt indices, each of prompts with one number of images (what every
        processor accepts); :meth:`score`'s children (every image in a cached prefix, no pixels
        encoded) only apart by whether they have images (the processors this backend's caching
        serves take per-prompt image lists of different lengths)."""
        by_count: dict[int, list[int]] = defaultdict(list)
        mixed = getattr(self._related, "children", False)
        for i, p in enumerate(prompts):
            by_count[min(len(p.images), 1) if mixed else len(p.images)].append(i)
        groups = []
        for idx in by_count.values():
            groups += [idx[s : s + self.max_batch_size] for s in range(0, len(idx), self.max_batch_size)]
        return groups

    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        """See :meth:`Backend.score`. With the KV cache on, inside :meth:`prompts_sharing_prefixes`,
        prompts that begin like another prompt of the call (:meth:`_phases`: an explained check's
        subsets) run after it, continuing from its cache."""
        import torch

        out: list[float] = [0.0] * len(prompts)
        related = self.kv_cache is not None and getattr(self._related, "on", False)
        phases = self._phases(prompts) if related else [list(range(len(prompts)))]
        prepared: list[tuple[list[int], list[str], dict[str, Any]]] = []
        children: set[int] = set()  # the batches of prepared that continue from their roots
        too_long: dict[int, str] = {}
        with self._lock:  # the processor's tokenizer is not safe to share between threads
            for k, phase in enumerate(phases):  # every phase encoded (and its lengths checked) before any model call
                self._related.children = k > 0  # (see _groups)
                try:
                    encoded = self._prepare([prompts[i] for i in phase],
                                            padding_side="right" if self.kv_cache is not None else None)
                except PromptTooLongError as exc:
                    too_long.update({phase[i]: why for i, why in exc.too_long.items()})
                    continue
                finally:
                    self._related.children = False
                prepared += [([phase[i] for i in group], texts, inputs) for group, texts, inputs in encoded]
                children.update(len(prepared) - 1 - j for j in range(len(encoded)) if k > 0)
        if too_long:
            raise PromptTooLongError(too_long)
        for g, (group, texts, inputs) in enumerate(prepared):
            batch = [prompts[i] for i in group]
            safe_ids, unsafe_ids = self.codec.verdict_token_ids(batch[0].verdict_prefix, batch[0].verdict_words)
            with self._lock, torch.inference_mode():
                if self.kv_cache is not None:
                    self._related.children = g in children  # (see _cached_logits)
                    try:
                        logits = self._cached_logits(batch, texts, inputs)
                    finally:
                        self._related.children = False
                else:
                    logits = self.model(**self._to_device(inputs), logits_to_keep=1).logits[:, -1, :].float()
            probs = _unsafe_probability(logits, safe_ids, unsafe_ids)
            for i, p in zip(group, probs.tolist(), strict=True):
                out[i] = p
        return out

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self, prompt: GuardPrompt | None = None) -> BackendDiagnostics:
        """Cache counters (``cache_stats``), the store's size and bound, and ``prompt``'s token counts.

        ``prompt_tokens`` is what the processor makes of the rendered prompt and its images;
        ``static_prefix_tokens`` is the part a check continues from the static-prefix cache (0 with
        caching off, or when the chat template does not keep the static parts first). Tokenizes
        only: no forward, and no cache is computed or read.
        """
        stats = dict(self.cache_stats)
        store = self.kv_cache
        total = static = None
        if prompt is not None:
            with self._lock:  # the processor's tokenizer is not safe to share between threads
                text = self.render(prompt)
                ids = self._processor_inputs([prompt], [text])["input_ids"][0]  # (a checked prompt's pixels are kept)
                prefix = self.codec.static_prefix(prompt, text) if store is not None else None
                entry = self._static.get((prompt.cache_salt, prefix)) if prefix else None
                if entry is not None:
                    prefix_ids = entry[0].tolist()  # tokenized when it was cached
                else:
                    prefix_ids = self.tokenizer(prefix)["input_ids"] if prefix else []
            total, static = int(ids.shape[0]), 0
            n = len(prefix_ids)
            if 0 < n < total and ids[:n].tolist() == list(prefix_ids):  # as score() checks before reusing it
                static = n
        return BackendDiagnostics(
            caching=store is not None,
            cache_limit_bytes=store.max_bytes if store is not None else 0,
            cache_bytes=store.nbytes if store is not None else 0,
            reused_tokens=stats["reused_tokens"], computed_tokens=stats["computed_tokens"],
            static_hits=stats["static_hits"], prompt_hits=stats["prompt_hits"],
            generations_kept=stats["generations_kept"],
            generation_reused_tokens=stats["generation_reused_tokens"],
            generation_computed_tokens=stats["generation_computed_tokens"],
            prompt_tokens=total, static_prefix_tokens=static,
        )

    def forward_floor(self, prompt: GuardPrompt, *, static_prefix: bool = True) -> float:
        """P(unsafe) of ``prompt`` from the least work a fast check can do: its physical floor.

        The processor, then one forward over the prompt's own tokens after its cached static prefix
        (computed on first use, as :meth:`score` does), the last position's logits only. Unlike
        :meth:`score` it reads and keeps no per-prompt cache, counts nothing in ``cache_stats``
        and never batches, so its time is the model's own. ``static_prefix=False``: one forward over
        the whole prompt, no cache at all. The score equals :meth:`score`'s (within float error);
        latency benchmarks measure fast checks against this call's time.
        """
        import torch

        safe_ids, unsafe_ids = self.codec.verdict_token_ids(prompt.verdict_prefix, prompt.verdict_words)
        with self._lock, torch.inference_mode():
            text = self.render(prompt)
            static = self._static_entry(prompt, text) if static_prefix else None
            kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
            if prompt.images:
                kwargs["images"] = [list(prompt.images)]
            inputs = dict(self.processor(**kwargs))
            ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
            start, layers = 0, None
            if static is not None:
                n = len(static[0])
                if n < ids.shape[1] and bool((ids[0, :n] == static[0]).all()):
                    start, layers = n, static[1]
            if layers is not None:
                positions = self._position_ids(ids, mask, inputs)
                for key in ("mm_token_type_ids", "token_type_ids"):
                    if key in inputs and inputs[key].shape == ids.shape:
                        inputs[key] = inputs[key][:, start:]
                inputs = self._to_device(inputs)
                if positions is not None:
                    inputs["position_ids"] = positions[..., start:].to(self.device)
                inputs[self._cache_kwarg] = _dynamic_cache(layers, 1)
                inputs["cache_position"] = torch.arange(start, ids.shape[1], device=self.device)
            else:
                inputs = self._to_device(inputs)
            out = self.model(input_ids=ids[:, start:].to(self.device), attention_mask=mask.to(self.device),
                             logits_to_keep=1, **inputs)
            logits = out.logits[:, -1, :].float()
        return float(_unsafe_probability(logits, safe_ids, unsafe_ids)[0])

    # ------------------------------------------------------------------ prefix caching
    def _cached_logits(self, batch: list[GuardPrompt], texts: list[str], inputs: dict[str, Any]) -> Any:
        """Last-position logits of ``batch`` (rendered ``texts``, right-padded processor ``inputs``),
        computing only what no cache holds (caller holds the lock)."""
        import torch

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        rows, width = ids.shape
        lengths = mask.sum(dim=1)
        shortest = int(lengths.min())
        keys = [self._image_key(p) for p in batch]
        image_pos = (ids[0] == self._image_token).nonzero() if self._image_token is not None else ids[:0, None]
        first_image = int(image_pos[0, 0]) if len(image_pos) else width
        last_image = int(image_pos[-1, 0]) if len(image_pos) else -1

        start, layers, kind = 0, None, None
        # one salt's static prefix serves only rows of that salt
        static = self._static_entry(batch[0], texts[0]) if len({p.cache_salt for p in batch}) == 1 else None
        if static is not None:
            static_ids, static_layers = static
            n = len(static_ids)
            if n < shortest and n <= first_image and bool((ids[:, :n] == static_ids).all()):
                start, layers, kind = n, static_layers, "static_hits"
        # score's children: an entry of other images (their root's) serves as far as its images agree
        by_image = self._image_token if getattr(self._related, "children", False) else None
        if rows == 1:
            hit = self._prefix_store().lookup(ids[0], keys[0], limit=shortest - 1, image_token=by_image)
            # a hit holding all of the prompt's images (no pixels encoded) or none of them
            if hit is not None and hit[0] > start and (hit[0] > last_image or hit[0] <= first_image):
                start, layers, kind = hit[0], hit[1], "prompt_hits"
        else:
            # Each row's own cached prefix (a batch of follow-ups after a batch of generations, of
            # post-checks after their pre-checks): used when every row has one longer than the shared
            # prefix and holding all of its images, so no pixels are encoded and the rows may differ.
            hits = [self._prefix_store().lookup(ids[row, : int(lengths[row])], keys[row], limit=int(lengths[row]) - 1,
                                                image_token=by_image)
                    for row in range(rows)]
            lasts = [self._last_image(ids[row], bool(batch[row].images)) for row in range(rows)]
            if all(hit is not None and last is not None and hit[0] > max(last, start)
                   for hit, last in zip(hits, lasts, strict=True)):
                self.cache_stats["prompt_hits"] += rows
                return self._row_cached_logits(ids, lengths, inputs, keys, [hit for hit in hits if hit is not None])
        if first_image < start <= last_image:  # never split the images between cache and forward
            start, layers, kind = 0, None, None
        if kind is not None:
            self.cache_stats[kind] += 1

        model_inputs: dict[str, Any] = {}
        for key, value in inputs.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if start > last_image >= 0 and key not in ("mm_token_type_ids", "token_type_ids"):
                continue  # every image is in the cache: no pixels to encode again
            model_inputs[key] = value
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in model_inputs and model_inputs[key].shape == ids.shape:
                model_inputs[key] = model_inputs[key][:, start:]
        position_ids = self._position_ids(ids, mask, inputs)  # on the CPU, from the processor's tensors
        model_inputs = self._to_device(model_inputs)
        if position_ids is not None:
            model_inputs["position_ids"] = position_ids[..., start:].to(self.device)
        if layers is not None:
            model_inputs[self._cache_kwarg] = _dynamic_cache(layers, rows)
        # Right padding: each row's verdict position is its own last token. A 1-D logits_to_keep (the
        # distinct last positions, kept for every row) means the same in every transformers 5.x; a
        # 2-D per-row tensor is a gather in 5.24 but an index in 5.19 (vLLM 0.32's pin): wrong shape.
        keep, pick = _keep_last(lengths - start, self.device)
        out = self.model(
            input_ids=ids[:, start:].to(self.device),
            attention_mask=mask.to(self.device),
            cache_position=torch.arange(start, width, device=self.device),
            use_cache=True,
            logits_to_keep=keep,
            **model_inputs,
        )
        self.cache_stats["reused_tokens"] += start * rows
        self.cache_stats["computed_tokens"] += int(lengths.sum()) - start * rows
        cache = _output_cache(out)
        if cache is not None:
            tensors = _cache_tensors(cache)
            for row in range(rows):
                self._keep(ids[row, : int(lengths[row])], keys[row], tensors, row, 0, int(lengths[row]), copy=rows > 1)
        return _picked_logits(out.logits, pick)

    def _row_cached_logits(self, ids: Any, lengths: Any, inputs: dict[str, Any], keys: list[tuple],
                           hits: list[tuple[int, list[tuple[Any, Any]]]]) -> Any:
        """Last-position logits of a batch whose every row continues its own cached prefix (images included).

        The rows' caches are left-padded to the longest and their new tokens right-padded after them;
        the attention mask hides both paddings and positions are given per row (a row's first new token
        sits at its own cached length), so each row is computed as if alone.
        """
        import torch

        rows = ids.shape[0]
        starts = [hit[0] for hit in hits]
        cached = max(starts)
        new = [int(lengths[row]) - starts[row] for row in range(rows)]
        span = max(new)
        # per row, the prompt positions its new tokens take (padding slots repeat the row's last token)
        index = torch.stack([(starts[row] + torch.arange(span)).clamp(max=int(lengths[row]) - 1) for row in range(rows)])
        new_mask = (torch.arange(span)[None] < torch.tensor(new)[:, None]).long()
        cache_mask = (torch.arange(cached)[None] >= torch.tensor([cached - s for s in starts])[:, None]).long()
        layers = []
        for layer in range(len(hits[0][1])):
            k0, v0 = hits[0][1][layer]
            k = k0.new_zeros((rows, k0.shape[1], cached, k0.shape[3]))
            v = v0.new_zeros((rows, v0.shape[1], cached, v0.shape[3]))
            for row, (n, row_layers) in enumerate(hits):
                k[row, :, cached - n :] = row_layers[layer][0][0]
                v[row, :, cached - n :] = row_layers[layer][1][0]
            layers.append((k, v))
        model_inputs: dict[str, Any] = {}
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs and inputs[key].shape == ids.shape:
                model_inputs[key] = inputs[key].gather(1, index)
        positions = self._position_ids(ids, inputs["attention_mask"], inputs)
        if positions is None:
            positions = index  # text positions: a token's index in its own row
        else:
            positions = positions.gather(-1, index[None].expand(positions.shape[0], -1, -1))
        model_inputs = self._to_device(model_inputs)
        keep, pick = _keep_last(torch.tensor(new), self.device)
        out = self.model(
            input_ids=ids.gather(1, index).to(self.device),
            attention_mask=torch.cat([cache_mask, new_mask], dim=1).to(self.device),
            position_ids=positions.to(self.device),
            cache_position=torch.arange(cached, cached + span, device=self.device),
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kwarg: _dynamic_cache(layers, rows)},
            **model_inputs,
        )
        self.cache_stats["reused_tokens"] += sum(starts)
        self.cache_stats["computed_tokens"] += sum(new)
        cache = _output_cache(out)
        if cache is not None:
            tensors = _cache_tensors(cache)
            for row in range(rows):
                pad = cached - starts[row]
                self._keep(ids[row, : int(lengths[row])], keys[row], tensors, row, pad, pad + int(lengths[row]), copy=True)
        return _picked_logits(out.logits, pick)

    def _prefix_store(self) -> KVCacheStore:
        """The prefix store; only the caching paths (taken when ``kv_cache`` is set) ask for it."""
        if self.kv_cache is None:
            raise RuntimeError("prefix caching is off: no KV cache store")
        return self.kv_cache

    def _keep(self, ids: Any, key: tuple, tensors: list[tuple[Any, Any]], row: int, begin: int, end: int,
              *, copy: bool) -> bool:
        """Store ``row``'s cache slots ``begin:end`` (the tokens ``ids``) in the prefix store.

        ``copy``: clone the slices, so the store never keeps a whole batch's tensors alive through a
        view (its byte bound counts what it holds).
        """
        kept = [(k[row : row + 1, :, begin:end], v[row : row + 1, :, begin:end]) for k, v in tensors]
        if copy:
            kept = [(k.clone(), v.clone()) for k, v in kept]
        return self._prefix_store().put(ids, key, kept)

    def _last_image(self, row_ids: Any, has_images: bool) -> int | None:
        """Index of the row's last image token (-1 without images; ``None`` when unknown)."""
        if not has_images:
            return -1
        if self._image_token is None:
            return None
        pos = (row_ids == self._image_token).nonzero()
        return int(pos[-1, 0]) if len(pos) else None

    def _to_device(self, tensors: dict[str, Any]) -> dict[str, Any]:
        dtype = self.model.dtype
        return {
            k: (v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)) if hasattr(v, "to") else v
            for k, v in tensors.items()
        }

    def _static_entry(self, prompt: GuardPrompt, rendered: str) -> tuple[Any, list[tuple[Any, Any]]] | None:
        """Token ids and key/value cache of the prompt's static prefix, computed once per prefix text."""
        import torch

        text = self.codec.static_prefix(prompt, rendered)
        if text is None:
            return None
        key = (prompt.cache_salt, text)
        if key not in self._static:
            if len(self._static) >= 16:  # a handful of policies per model; drop the oldest beyond that
                self._static.pop(next(iter(self._static)))
            ids = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
            if len(ids) == 0:
                self._static[key] = None
                return None
            out = self.model(input_ids=ids[None].to(self.device), use_cache=True, logits_to_keep=1)
            cache = _output_cache(out)
            self._static[key] = (ids, _cache_tensors(cache))
        return self._static[key]

    def _position_ids(self, ids: Any, mask: Any, inputs: dict[str, Any]) -> Any:
        """Explicit positions for models whose own depend on state (Qwen2-VL's mrope and ``rope_deltas``).

        Qwen2-VL keeps the ``rope_deltas`` of its last image forward on the module and applies them
        whenever a cache is passed without positions: after a cached prefix that would shift the
        positions of a text-only prompt. Other models derive positions from ``cache_position``.
        """
        import torch

        if self._rope_index is None:
            return None
        grid = inputs.get("image_grid_thw")
        if grid is None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions[None].expand(3, -1, -1)
        extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
        positions, _ = self._rope_index(ids, image_grid_thw=grid, attention_mask=mask, **extra)
        return positions.to(torch.long)

    @staticmethod
    def _image_key(prompt: GuardPrompt) -> tuple:
        """The prefix-store key of a prompt's cached entries: its cache salt (requests of different
        salts never share an entry), then per image its content hash and the size and mode of the
        pixels the model sees. The content hash is of the encoded bytes, but the pixels also depend
        on how the boundary shaped them (``ImageLimits.max_aspect_ratio`` pads to a size that
        depends on it; a format may resize): the size tells two shapings of one image apart."""
        shaped = [repr((img.mode, img.size)) for img in prompt.images]
        if prompt.image_keys and len(prompt.image_keys) == len(prompt.images):
            images = tuple(f"{key}:{shape}" for key, shape in zip(prompt.image_keys, shaped, strict=True))
        else:
            images = tuple(hashlib.sha256(img.tobytes() + shape.encode()).hexdigest()
                           for img, shape in zip(prompt.images, shaped, strict=True))
        return (prompt.cache_salt, *images)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        import torch

        out: list[Generation | None] = [None] * len(prompts)
        stop_ids = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        with self._lock:
            prepared = self._prepare(prompts)
        for group, texts, cpu_inputs in prepared:
            batch = [prompts[i] for i in group]
            safe_ids, unsafe_ids = self.codec.verdict_token_ids(batch[0].verdict_prefix, batch[0].verdict_words)
            with self._lock, torch.inference_mode():
                if self.kv_cache is not None:
                    inputs, ids, mask = self._generation_inputs(batch, texts, cpu_inputs)
                else:
                    inputs, ids, mask = self._to_device(cpu_inputs), cpu_inputs["input_ids"], cpu_inputs["attention_mask"]
                result = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    return_dict_in_generate=True,
                    output_logits=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                new_tokens = result.sequences[:, ids.shape[1] :]
                stops = [next((k for k, t in enumerate(row) if t in stop_ids), len(row)) for row in new_tokens.tolist()]
                if self.kv_cache is not None:
                    self._keep_generation(batch, ids, mask, new_tokens, stops, result)
            step_probs = torch.stack([_unsafe_probability(step.float(), safe_ids, unsafe_ids) for step in result.logits], dim=1)
            for row, i in enumerate(group):
                n = stops[row]
                out[i] = self.codec.generation(new_tokens[row, :n].tolist(), step_probs[row, :n].tolist())
        return [g for g in out if g is not None]

    def _generation_inputs(self, batch: list[GuardPrompt], texts: list[str], inputs: dict[str, Any]
                           ) -> tuple[dict[str, Any], Any, Any]:
        """``model.generate`` inputs (on the device) that continue from each row's longest cached prefix,
        and the input ids and attention mask they lay out (on the CPU). Caller holds the lock.

        A row continues from its own entry in the prefix store (a pre-check's or fast check's prompt with
        the same images) or from the static prefix, whichever is longer. The rows' cached parts are
        left-padded to the longest and handed to ``generate`` as its cache; their uncached parts are
        left-padded after them, so every row generates at the last position and ``generate`` feeds only
        the uncached part (it slices ``input_ids`` past the cache's length). Padding sits inside the row,
        masked; positions count only unmasked tokens, as in a plain left-padded batch (Qwen2-VL's mrope
        positions are given explicitly, computed over the whole row). Either every row's images are in
        its cached part (no pixels are passed: nothing is encoded again) or none is (the pixels are
        passed whole); a prefix that would split a row's images is cut before them.
        """
        import torch
        from transformers import DynamicCache

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        rows, width = ids.shape
        lengths = [int(n) for n in mask.sum(dim=1)]
        own = [ids[row, width - lengths[row] :] for row in range(rows)]  # each row's tokens, padding removed
        spans = [self._image_span(own[row], bool(batch[row].images)) for row in range(rows)]
        static = self._static_entry(batch[0], texts[0]) if len({p.cache_salt for p in batch}) == 1 else None
        store = self._prefix_store()
        covered: list[tuple[int, Any] | None] = []  # a cached prefix holding all of the row's images
        before: list[tuple[int, Any]] = []  # the longest cached prefix before the row's first image
        for row in range(rows):
            first, last = spans[row]
            hit = store.lookup(own[row], self._image_key(batch[row]), limit=lengths[row] - 1)
            covered.append(hit if hit is not None and last is not None and hit[0] > last else None)
            best: tuple[int, Any] = (0, None)
            if static is not None:
                n = len(static[0])
                if n < lengths[row] and n <= first and bool((own[row][:n] == static[0]).all()):
                    best = (n, static[1])
            if hit is not None and min(hit[0], first) > best[0]:
                n = min(hit[0], first)
                best = (n, [(k[:, :, :n], v[:, :, :n]) for k, v in hit[1]])
            before.append(best)
        # no pixels at all when every row with images has them cached; rows without images take their longest prefix
        skip_pixels = any(p.images for p in batch) and all(
            covered[row] is not None or not batch[row].images for row in range(rows))
        chosen: list[tuple[int, Any]] = []  # per row: (cached tokens, their layers or None)
        for row in range(rows):
            hit = covered[row]
            chosen.append(hit if skip_pixels and hit is not None and hit[0] >= before[row][0] else before[row])
        starts = [n for n, _ in chosen]
        self.cache_stats["generation_reused_tokens"] += sum(starts)
        self.cache_stats["generation_computed_tokens"] += sum(lengths) - sum(starts)
        cached = max(starts)
        if cached == 0:
            return self._to_device(inputs), ids, mask

        span = max(n - s for n, s in zip(lengths, starts, strict=True))

        def relayout(tensor: Any, fill: int) -> Any:
            """``tensor``'s rows in the new layout: cached part right-aligned at ``cached``, then the rest."""
            laid = tensor.new_full((rows, cached + span), fill)
            for row in range(rows):
                n, s = lengths[row], starts[row]
                part = tensor[row, width - n :]
                laid[row, cached - s : cached] = part[:s]
                laid[row, cached + span - (n - s) :] = part[s:]
            return laid

        pad_id = self.tokenizer.pad_token_id
        laid_ids = relayout(ids, int(pad_id) if pad_id is not None else 0)
        laid_mask = relayout(torch.ones_like(mask), 0)
        model_inputs: dict[str, Any] = {}
        for key, value in inputs.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if key in ("mm_token_type_ids", "token_type_ids") and value.shape == ids.shape:
                model_inputs[key] = relayout(value, 0)
            elif not skip_pixels:
                model_inputs[key] = value
        positions = self._position_ids(laid_ids, laid_mask, {**inputs, **model_inputs})
        model_inputs = self._to_device(model_inputs)
        if positions is not None:
            model_inputs["position_ids"] = positions.to(self.device)
        template: list[tuple[Any, Any]] = next(row_layers for _, row_layers in chosen if row_layers is not None)
        layers = []
        for layer, (k0, v0) in enumerate(template):
            k = k0.new_zeros((rows, k0.shape[1], cached, k0.shape[3]))
            v = v0.new_zeros((rows, v0.shape[1], cached, v0.shape[3]))
            for row, (n, row_layers) in enumerate(chosen):
                if n:
                    k[row, :, cached - n :] = row_layers[layer][0][0]
                    v[row, :, cached - n :] = row_layers[layer][1][0]
            layers.append((k, v))
        model_inputs[self._cache_kwarg] = DynamicCache(layers)
        model_inputs["input_ids"] = laid_ids.to(self.device)
        model_inputs["attention_mask"] = laid_mask.to(self.device)
        return model_inputs, laid_ids, laid_mask

    def _image_span(self, row_ids: Any, has_images: bool) -> tuple[int, int | None]:
        """``(first, last)`` index of a row's image tokens: ``(len, -1)`` without images, ``(0, None)`` when
        the image token is unknown or absent (no cached prefix may then hold any part of the row)."""
        if not has_images:
            return len(row_ids), -1
        if self._image_token is None:
            return 0, None
        pos = (row_ids == self._image_token).nonzero()
        return (int(pos[0, 0]), int(pos[-1, 0])) if len(pos) else (0, None)

    def _keep_generation(self, batch: list[GuardPrompt], ids: Any, mask: Any, new_tokens: Any, stops: list[int],
                         result: Any) -> None:
        """Store each row's generation cache (its prompt and the tokens fed back), unpadded, in the prefix store.

        ``ids`` / ``mask``: the prompt layout ``generate`` ran (padding anywhere in a row, masked).
        A format's follow-up prompt (the generation prompt, the answer, a verdict question) then
        continues from it: :meth:`score` finds the longest cached prefix of the follow-up's own
        tokens, so where re-tokenising the answer gives other ids than the generated ones, reuse
        stops there and the rest is computed (exact either way). The last generated token is never
        fed back, so it is not in the cache; a row's end-of-turn token is when the batch went on.
        """
        import torch

        cache = _output_cache(result)
        if cache is None:
            return
        tensors = _cache_tensors(cache)
        if not tensors:
            return
        ids, mask = ids.cpu(), mask.cpu()
        width = ids.shape[1]
        fed = new_tokens.shape[1] - 1  # generated tokens whose keys and values were computed
        if fed < 0 or any(k.shape[2] != width + fed for k, _ in tensors):
            return  # not a cache of every token fed (a static or windowed cache): nothing exact to keep
        for row, prompt in enumerate(batch):
            n = min(stops[row] + 1, fed)
            slots = torch.cat([mask[row].nonzero()[:, 0], torch.arange(width, width + n)])
            row_ids = torch.cat([ids[row][slots[: len(slots) - n]], new_tokens[row, :n].cpu()])
            index = slots.to(tensors[0][0].device)
            kept = [(k[row : row + 1].index_select(2, index), v[row : row + 1].index_select(2, index)) for k, v in tensors]
            self.cache_stats["generations_kept"] += self._prefix_store().put(row_ids, self._image_key(prompt), kept,
                                                                            insertions=False)


def _shared_items(a: list[Any], b: list[Any], limit: int) -> int:
    """How many leading items ``a`` and ``b`` share, counting at most ``limit``."""
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n


class _PixelCache:
    """A processor's image processor that remembers its last outputs by the images' prefix-store keys.

    Inside :meth:`keyed` (this thread only: a processor may be shared with a host model in another
    thread) a call for images preprocessed recently returns a copy of the same outputs (processors
    pop entries from them, e.g. Idefics3's ``rows``) instead of preprocessing again; outside it, and
    for anything not kept, every call goes to the wrapped processor. Attributes are the wrapped
    processor's, read and set (a setting changed, e.g. ``do_resize``, drops every kept output).
    Bounded by entries (``max_entries``): a request's pre-check and post-check, or a
    generation and its follow-up, come close together.
    """

    _own = frozenset({"inner", "max_entries", "_entries", "_local", "_guard", "hits", "misses"})

    def __init__(self, inner: Any, max_entries: int = 8) -> None:
        self.inner = inner
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._local = threading.local()
        self._guard = threading.Lock()
        #: calls served from the kept outputs / passed to the wrapped processor
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
            return
        setattr(self.inner, name, value)
        with self._guard:
            self._entries.clear()

    def clear(self) -> None:
        """Forget every kept output (the counters stay)."""
        with self._guard:
            self._entries.clear()

    @contextlib.contextmanager
    def keyed(self, images_key: tuple) -> Iterator[None]:
        self._local.key = images_key
        try:
            yield
        finally:
            self._local.key = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        images_key = getattr(self._local, "key", None)
        if images_key is None:
            return self.inner(*args, **kwargs)
        key = (images_key, repr(sorted(kwargs.items())))
        with self._guard:
            kept = self._entries.get(key)
            if kept is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return copy.copy(kept)
        out = self.inner(*args, **kwargs)
        with self._guard:
            self.misses += 1
            self._entries[key] = copy.copy(out)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return out


def _output_cache(out: Any) -> Any:
    """The key/value cache a forward or ``generate`` returned (``cache`` or ``past_key_values``), or ``None``."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer ``(keys, values)`` of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def _dynamic_cache(layers: list[tuple[Any, Any]], rows: int) -> Any:
    """A fresh ``DynamicCache`` holding ``layers`` for ``rows`` rows (the stored tensors are never written)."""
    from transformers import DynamicCache

    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in layers])


def _keep_last(new_lengths: Any, device: Any) -> tuple[Any, Any]:
    """``(logits_to_keep, pick)`` for right-padded rows with ``new_lengths`` tokens in the forward.

    ``pick`` is ``None`` when every row ends at the last position (keep 1), else each row's index into
    the kept positions (the distinct last positions, as a 1-D ``logits_to_keep``).
    """
    import torch

    width = int(new_lengths.max())
    if bool((new_lengths == width).all()):
        return 1, None
    positions, pick = torch.unique(new_lengths - 1, return_inverse=True)
    return positions.to(device), pick


def _picked_logits(logits: Any, pick: Any) -> Any:
    """Each row's verdict-position logits (float) from a forward's kept logits."""
    import torch

    if pick is None:
        return logits[:, -1, :].float()
    return logits[torch.arange(logits.shape[0], device=logits.device), pick.to(logits.device)].float()


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
