"""Hugging Face prompt codec shared by the backends that run HF checkpoints (transformers, vLLM).

One place renders a :class:`~visguard.engine.format.GuardPrompt` with the checkpoint's own chat template,
finds the verdict spellings' token ids, lists the tokenizer's control strings, and maps generated
token ids back to text spans, so every such backend builds identical inputs and reads outputs
identically. :meth:`HFPromptCodec.static_prefix` finds the rendered text of a prompt's
request-independent prefix, and :class:`KVCacheStore` keeps key/value caches of scored prompts and
of generations so in-process backends continue later prompts from them.
:func:`resolve_checkpoint` decides where a model id loads from before anything is downloaded, so an
id that cannot be had (offline, unknown, the hub unreachable) fails in seconds with one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias, cast

from visguard.core.errors import BackendError, UnsupportedRequestError
from visguard.engine.backend import Generation
from visguard.engine.format import GuardPrompt

_PROCESSOR_TOKEN_ATTRS = ("image_token", "boi_token", "eoi_token", "video_token", "fake_image_token")
#: processor attributes naming a string its chat-template output must contain for an image to be read
_IMAGE_PLACEHOLDER_ATTRS = ("image_token", "boi_token", "start_image_token", "fake_image_token")
#: what ``from_pretrained(..., output_loading_info=True)`` returns: the model and its loading info
_Loaded: TypeAlias = "tuple[Any, dict[str, Any]]"


def too_long_reason(tokens: int, limit: int, why: str = "") -> str:
    """Why a prompt of ``tokens`` tokens does not fit a model taking ``limit`` (``why``: the limit's origin)."""
    return f"the guard prompt is {tokens} tokens long, more than the guard model's limit of {limit}{why}"


class HFPromptCodec:
    """Render prompts and read tokens for one HF processor (or bare tokenizer).

    Args:
        processor: an ``AutoProcessor`` result (or a tokenizer for text-only models).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._verdict_ids: dict[tuple, tuple[list[int], list[int]]] = {}
        self._static_heads: dict[str, str] = {}
        #: verdict spellings left out because their first token is not distinct (see verdict_token_ids)
        self.dropped_verdict_spellings: tuple[str, ...] = ()
        specials = set(self.tokenizer.all_special_tokens)
        specials.update(t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special)
        for attr in _PROCESSOR_TOKEN_ATTRS:
            token = getattr(processor, attr, None)
            if isinstance(token, str):
                specials.add(token)
        #: strings the tokenizer reads as control tokens (neutralised in untrusted text)
        self.special_tokens = frozenset(specials)
        #: strings marking where an image goes, one of which the processor must find in the text
        self.image_placeholders = frozenset(
            t for t in (getattr(processor, a, None) for a in _IMAGE_PLACEHOLDER_ATTRS) if isinstance(t, str) and t)

    def render(self, prompt: GuardPrompt) -> str:
        """The exact prompt string the model sees (chat template + assistant prefix).

        Raises:
            UnsupportedRequestError: the prompt has images but the rendered text holds none of the
                processor's image placeholders (a format that writes its own placeholder text, such
                as ``<image>``, for a checkpoint whose processor reads another): the images could
                not reach the model, so the check is refused instead of failing as ``unavailable``.
        """
        text = self.processor.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=False, **dict(prompt.template_kwargs))
        if prompt.images and self.image_placeholders and not any(t in text for t in self.image_placeholders):
            raise UnsupportedRequestError(
                f"the guard prompt has {len(prompt.images)} image(s) but none of this checkpoint's image "
                f"placeholders ({', '.join(sorted(self.image_placeholders))}): the guard format writes image "
                "placeholders this model's processor does not read; pick the format settings made for this "
                "checkpoint (docs/formats.md)")
        return text + prompt.assistant_prefix

    def prompt_tokens(self, prompt: GuardPrompt, rendered: str | None = None) -> int:
        """Tokens the model sees for ``prompt``: its rendered text's plus those its images expand to.

        ``rendered``: the prompt's :meth:`render`, when the caller has it (it is not rendered again).
        Image tokens come from the processor's own count (``_get_num_multimodal_tokens``, which
        every supported processor has and vLLM relies on); a processor without it adds none.
        """
        text = self.render(prompt) if rendered is None else rendered
        n = len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return n + self._image_tokens(prompt)

    def _image_tokens(self, prompt: GuardPrompt) -> int:
        """Tokens the processor adds for the prompt's images beyond their one placeholder each."""
        if not prompt.images:
            return 0
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return 0
        try:
            data = count(image_sizes=[(img.height, img.width) for img in prompt.images])
            per_image = getattr(data, "num_image_tokens", None) or data.get("num_image_tokens")
        except Exception:  # noqa: BLE001 - a processor that cannot say: the text count stands
            return 0
        return max(0, sum(int(t) for t in per_image) - len(prompt.images)) if per_image else 0

    def static_prefix(self, prompt: GuardPrompt, rendered: str) -> str | None:
        """The start of ``rendered`` (this prompt's :meth:`render`) that holds exactly its static parts.

        ``None`` when the prompt declares no static parts or the chat template does not keep them
        first (LLaVA-1.5's template, for one, moves every image before the text).
        """
        k = prompt.static_parts
        if k <= 0 or not prompt.messages:
            return None
        first = prompt.messages[0]
        content = first.get("content")
        if not isinstance(content, list) or len(content) <= k or any(p.get("type") != "text" for p in content[:k]):
            return None
        static_text = "".join(p.get("text", "") for p in content[:k])
        head = self._static_head({**first, "content": content[:k]}, prompt.template_kwargs)
        n = 0
        limit = min(len(head), len(rendered))
        while n < limit and head[n] == rendered[n]:
            n += 1
        end = rendered.find(static_text) + len(static_text) if static_text else -1
        # Both renders agree beyond the static text's end only by chance ("<|" of different tokens).
        return rendered[:end] if static_text in rendered and 0 < end <= n else None

    def _static_head(self, message: dict[str, Any], template_kwargs: Mapping[str, Any]) -> str:
        """The chat template's rendering of a prompt's static first message alone, rendered once
        per distinct message (a handful per policy) and kept, so a check renders only its prompt."""
        key = repr((message, sorted(template_kwargs.items())))
        head = self._static_heads.get(key)
        if head is None:
            head = self.processor.apply_chat_template(
                [message], add_generation_prompt=False, tokenize=False, **dict(template_kwargs))
            if len(self._static_heads) >= 64:
                self._static_heads.pop(next(iter(self._static_heads)))
            self._static_heads[key] = head
        return head

    def verdict_token_ids(self, prefix: str, words: Mapping[str, tuple[str, ...]]) -> tuple[list[int], list[int]]:
        """First token id of each usable verdict spelling as it follows ``prefix`` (safe ids, unsafe ids).

        A spelling is usable when its first token is its own: a token that also starts a spelling
        of the other label (a tokenizer that splits ``" Safe"`` and ``" Unsafe"`` into a shared
        space token and the word), or one that is only whitespace, says nothing about the verdict.
        Such spellings are dropped, with a warning, and listed in
        :attr:`dropped_verdict_spellings`; the rest are scored.

        Raises:
            BackendError: no usable spelling is left for ``safe`` or for ``unsafe``.
        """
        key = (prefix, tuple((k, tuple(v)) for k, v in sorted(words.items())))
        if key not in self._verdict_ids:
            first = {label: {word: self._first_token(prefix, word) for word in words.get(label, ())} for label in ("safe", "unsafe")}
            shared = set(first["safe"].values()) & set(first["unsafe"].values())
            ids: dict[str, list[int]] = {"safe": [], "unsafe": []}
            dropped: list[str] = []
            for label, spellings in first.items():
                for word, tid in spellings.items():
                    if tid in shared or not self.tokenizer.decode([tid]).strip():
                        dropped.append(word)
                    elif tid not in ids[label]:
                        ids[label].append(tid)
            if not ids["safe"] or not ids["unsafe"]:
                raise BackendError(
                    "this tokenizer gives no safe/unsafe verdict spellings with distinct first tokens after "
                    f"{prefix!r} (first tokens: "
                    + ", ".join(f"{w!r}->{t}" for label in first.values() for w, t in label.items())
                    + "); fast scores cannot be read from it"
                )
            if dropped:
                warnings.warn(
                    f"verdict spellings {dropped} left out: their first token after {prefix!r} is not distinct "
                    f"with this tokenizer; scoring with {[w for lab in first.values() for w in lab if w not in dropped]}",
                    UserWarning,
                    stacklevel=2,
                )
                self.dropped_verdict_spellings = tuple(dict.fromkeys((*self.dropped_verdict_spellings, *dropped)))
            self._verdict_ids[key] = (ids["safe"], ids["unsafe"])
        return self._verdict_ids[key]

    def _first_token(self, prefix: str, word: str) -> int:
        enc = self.tokenizer.encode
        head = enc(prefix, add_special_tokens=False) if prefix else []
        full = enc(prefix + word, add_special_tokens=False)
        if full[: len(head)] == head and len(full) > len(head):
            return full[len(head)]
        alone = enc(word, add_special_tokens=False)
        if not alone:
            raise BackendError(f"verdict spelling {word!r} encodes to no token")
        return alone[0]

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

    A text-only checkpoint (a text guard such as Qwen3Guard) loads as its causal LM, with its
    tokenizer as the processor. A checkpoint that lacks some of the loaded class's weights (saved by
    another class, e.g. a classifier wrapping the VLM) is refused: those weights would be random.

    Args:
        model: hub id or local path.
        role: ``"guard"`` or ``"host"``, for error messages.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU) or a torch dtype name.
        trust_remote_code: allow the checkpoint's own code (off by default).
        revision: hub revision.
        attn_implementation: e.g. ``"sdpa"``.

    Raises:
        BackendError: ``model`` is neither a local checkpoint directory nor a hub model that can be had
            (:func:`resolve_checkpoint`: unknown id, offline and not cached, hub unreachable), unknown dtype,
            the checkpoint cannot be loaded, weights are missing from it, or it is a custom-code
            vision-language checkpoint transformers' own classes do not run (named as such).
    """
    # Before torch and transformers: an id that cannot be had fails in a second, not after their
    # import and minutes of hub retries.
    source = resolve_checkpoint(model, role=role, revision=revision)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise BackendError(f"unknown dtype {dtype!r}")
        torch_dtype = named
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        load = {"dtype": torch_dtype, "use_safetensors": True, "output_loading_info": True, **kwargs, **extra}
        try:
            # output_loading_info=True: (model, info); transformers annotates the model alone
            hf_model, info = cast(_Loaded, AutoModelForImageTextToText.from_pretrained(source, **load))
        except ValueError as exc:  # a text-only checkpoint (e.g. a text guard): its causal LM, same prompts
            if "Unrecognized configuration class" not in str(exc):
                raise
            custom = _custom_code_model(source, revision, with_vision=True)
            if custom:  # its own code may load as a causal LM, with no way for images to reach it
                raise BackendError(f"cannot load {role} model {model!r} with transformers: {custom}") from exc
            from transformers import AutoModelForCausalLM

            hf_model, info = cast(_Loaded, AutoModelForCausalLM.from_pretrained(source, **load))
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError (truncated weights) ...
        custom = _custom_code_model(source, revision)
        if custom:
            raise BackendError(f"cannot load {role} model {model!r} with transformers: {custom}") from exc
        text = " ".join(str(exc).split())[:300]
        raise BackendError(f"cannot load {role} model {model!r} with transformers: {type(exc).__name__}: {text}") from exc
    missing = list(info.get("missing_keys") or ())
    if missing:  # transformers would fill them with random values: random verdicts, never acceptable
        saved_as = ", ".join(getattr(hf_model.config, "architectures", None) or ["?"])
        raise BackendError(
            f"cannot load {role} model {model!r} with transformers: {len(missing)} weights of "
            f"{type(hf_model).__name__} are missing from the checkpoint (e.g. {sorted(missing)[0]!r}; it was saved "
            f"as {saved_as}); they would be random")
    return hf_model.to(device), processor


#: seconds the one hub look-up of :func:`resolve_checkpoint` may take (``VISGUARD_HUB_TIMEOUT`` overrides)
HUB_PROBE_TIMEOUT_S = 5.0
#: loggers that report hub requests and their retries (silenced during the look-up)
_HUB_LOGGERS = ("huggingface_hub", "httpx", "httpcore", "urllib3")


def resolve_checkpoint(model: str, *, role: str = "guard", revision: str | None = None) -> str:
    """Where to load ``model`` from: a local directory as is, or a hub id checked before any download.

    A hub id is looked up once, with no retries, no log lines and a short timeout
    (:data:`HUB_PROBE_TIMEOUT_S`), so an id that cannot be had fails in seconds with one message
    saying how to point at a local checkpoint, instead of minutes of hub retries:

    - with ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is looked at;
    - online, the hub is asked whether the model (and ``revision``) exists; when it cannot be
      reached (no network, a timeout, a 5xx or 429 answer), a cached copy's snapshot directory is
      loaded instead, so a cached model still loads without network. Any other answer (a mirror
      without the model API, a bad token) leaves the id to the loader, whose own error stands.

    Returns:
        ``model`` itself (a local directory, a cached id offline, an id the hub knows), or the
        cached snapshot directory of a hub id while the hub is unreachable.

    Raises:
        BackendError: ``model`` is a file, not a directory; neither a local directory nor a valid hub
            id; offline and not cached; unknown to the hub (or private), gated, or a revision the hub
            does not have; or the hub is unreachable and the model is not cached.
    """
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    head = f"cannot load {role} model {model!r}"
    example = "--model /path/to/checkpoint" if role == "guard" else "/path/to/checkpoint"
    local_hint = f"pass a local checkpoint directory as the {role} model instead (e.g. {example})"
    if os.path.exists(model):
        raise BackendError(f"{head}: it is a file, not a checkpoint directory; {local_hint}")
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise BackendError(f"{head}: no such local directory, and not a valid Hugging Face hub id; {local_hint}") from None
    download_hint = f"{local_hint}, or download it first where the hub is reachable (hf download {model})"
    cached = _cached_snapshot(model, revision)
    if constants.is_offline_mode():
        if cached is not None:
            return model
        raise BackendError(f"{head}: no such local directory, and HF_HUB_OFFLINE is set but the Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}) has no copy of it; {download_hint}")
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    timeout = _probe_timeout()
    error = _ask_hub(model, revision, timeout)
    if error is None:
        return model
    if cached is not None:  # the hub cannot answer, or no longer has it: the cached copy, without the hub
        return cached
    if isinstance(error, RevisionNotFoundError):
        raise BackendError(f"{head}: the Hugging Face hub has no revision {revision!r} of it")
    if isinstance(error, GatedRepoError):
        raise BackendError(f"{head}: it is gated on the Hugging Face hub: accept its terms there and log in "
                           f"(hf auth login), or {local_hint[0].lower()}{local_hint[1:]}")
    if isinstance(error, RepositoryNotFoundError):
        raise BackendError(f"{head}: no such local directory, and no model of that id on the Hugging Face hub (or a "
                           f"private one: log in with hf auth login); {local_hint}")
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    if response is not None and response.status_code < 500 and response.status_code != 429:
        return model  # the hub answered (a mirror without this API, a bad token ...): the loader's own error stands
    if response is not None:
        reach = f"answered HTTP {response.status_code}"
    elif isinstance(error, TimeoutError) or "Timeout" in type(error).__name__:
        reach = f"did not answer within {timeout:g} s (VISGUARD_HUB_TIMEOUT sets the wait)"
    else:
        reach = f"could not be reached ({type(error).__name__}: {' '.join(str(error).split())[:80]})"
    raise BackendError(f"{head}: no such local directory, and the Hugging Face hub ({constants.ENDPOINT}) {reach}; "
                       f"{download_hint}")


def _ask_hub(repo_id: str, revision: str | None, timeout: float) -> BaseException | None:
    """Ask the hub once whether model ``repo_id`` (at ``revision``) exists: ``None`` if so, else the error.

    One request with no retries and no log lines, bounded by ``timeout`` (name resolution, which
    the HTTP client's own timeout does not cover, included: the request runs in a daemon thread
    that is given up on, with a :class:`TimeoutError`, once the time is over).
    """
    from huggingface_hub import HfApi

    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            HfApi().model_info(repo_id, revision=revision, timeout=timeout, expand=["sha"])
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append(exc)

    with _quiet_hub_loggers():
        worker = threading.Thread(target=ask, name="visguard-hub-probe", daemon=True)
        worker.start()
        worker.join(timeout)
    return outcome[0] if outcome else TimeoutError(f"no answer within {timeout:g} s")


def _cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    """The Hugging Face cache's snapshot directory of ``repo_id`` at ``revision`` (one with its ``config.json``), or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an unreadable cache holds nothing usable
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def _probe_timeout() -> float:
    try:
        value = float(os.environ.get("VISGUARD_HUB_TIMEOUT", HUB_PROBE_TIMEOUT_S))
    except ValueError:
        return HUB_PROBE_TIMEOUT_S
    return value if value > 0 else HUB_PROBE_TIMEOUT_S


@contextlib.contextmanager
def _quiet_hub_loggers() -> Iterator[None]:
    """Hub and HTTP client loggers at ERROR for the duration (no request or retry lines)."""
    loggers = [logging.getLogger(name) for name in _HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _custom_code_model(model: str, revision: str | None, *, with_vision: bool = False) -> str | None:
    """Why ``model`` is a checkpoint of its own code that transformers' classes cannot run, or ``None``.

    Such a checkpoint (``auto_map`` in its config, a ``model_type`` transformers does not know, e.g.
    an original-format InternVL ``InternVLChatModel``) cannot be loaded as an image-text-to-text
    model; with ``trust_remote_code`` its class may load as a causal LM that never sees the images.
    ``with_vision``: only a checkpoint whose config has a ``vision_config`` (a text-only one may run
    as the causal LM it is).
    """
    try:
        from transformers import PretrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config, _ = PretrainedConfig.get_config_dict(model, revision=revision)
    except Exception:  # noqa: BLE001 - no readable config: the loader's own error stands
        return None
    model_type = config.get("model_type")
    if not config.get("auto_map") or model_type in CONFIG_MAPPING or (with_vision and "vision_config" not in config):
        return None
    archs = ", ".join(config.get("architectures") or ["?"])
    return (f"it is a custom-code checkpoint (model_type {model_type!r}, {archs}) that transformers' own "
            "image-text-to-text classes do not run; convert it to a transformers-native checkpoint first, or "
            "serve it with a backend that runs its own format (docs/formats.md)")


class KVCacheStore:
    """A bounded, thread-safe LRU of key/value caches of scored prompts and generations, for prefix reuse.

    Each entry is one token sequence (a prompt, or a prompt and the tokens generated after it), its
    key (the request's cache salt, then the content key of its images: see the transformers
    backend's ``_image_key``) and its per-layer ``(keys, values)`` tensors (batch 1). An entry is
    found only by a lookup with an equal key: requests of different cache salts never share one. :meth:`lookup`
    returns the entry sharing the longest token prefix with a new prompt of the same images: a
    post-check continues from its pre-check (the images and the request), a stream's re-check from
    the previous re-check, a follow-up verdict question from the generation it follows (as far as
    its tokens agree with the generated ones). Causal attention makes
    the reuse exact: a position's keys and values depend only on the tokens (and images) up to it.

    A new entry that *extends* an entry of the same key replaces it (:meth:`put`): a stream's
    re-checks (the request, the answer so far, the question after it) then hold ONE growing entry
    instead of nested copies of the whole prefix, so the store's memory grows linearly with the
    answer and a long answer is not evicted by its own earlier copies.

    Args:
        max_bytes: total size of the tensors kept; least recently used entries go first.
        max_entries: most entries kept.
    """

    #: tokens of an old entry that may differ at the seam where the new entry inserted text (a
    #: tokenizer may merge the last answer token with what follows it) and still count as extended
    EXTEND_SLACK = 4

    def __init__(self, *, max_bytes: int = 256 << 20, max_entries: int = 64) -> None:
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[int, tuple[Any, tuple, list[tuple[Any, Any]], int]] = OrderedDict()
        self._next = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held."""
        return self._bytes

    def put(self, ids: Any, image_key: tuple, layers: list[tuple[Any, Any]], *, insertions: bool = True) -> bool:
        """Keep ``layers`` (per layer ``(keys, values)`` of shape ``[1, heads, len(ids), dim]``).

        Returns whether they were kept (an entry larger than the whole store is not). A kept entry
        replaces every entry of the same ``image_key`` that it extends (:func:`_extends`): one whose
        ids are a prefix of ``ids``, or that is ``ids`` with a middle part left out (a stream's
        earlier re-check: request + shorter answer + the same question). Every lookup the old entry
        served is served by the new one as far as the old one's own last tokens (the question),
        which are all a lookup may then compute again; the LRU and byte bounds are unchanged.

        ``insertions=False``: replace only entries whose ids are a prefix of ``ids`` (generations:
        two requests with the same images whose texts differ in a few tokens and whose answers end
        alike would otherwise look like one extended by the other).
        """
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes or self.max_entries < 1:
            return False
        with self._lock:
            for key in [key for key, (cached, cached_images, _, _) in self._entries.items()
                        if cached_images == image_key and _extends(ids, cached, self.EXTEND_SLACK, insertions)]:
                self._bytes -= self._entries.pop(key)[3]
            self._entries[self._next] = (ids, image_key, layers, size)
            self._next += 1
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                _, (_, _, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return True

    def lookup(self, ids: Any, image_key: tuple, *, limit: int, image_token: int | None = None
               ) -> tuple[int, list[tuple[Any, Any]]] | None:
        """``(n, layers)``: the longest cached prefix (``n <= limit`` tokens) of ``ids`` with the same images.

        ``image_token``: the model's image placeholder id. With it, an entry of other images also
        serves as far as its images agree with the prompt's (an image prefix: a subset prompt
        ``[instructions, image 1, ...]`` continues from ``[instructions, image 1, image 2, ...]``):
        the shared tokens are cut before the first image whose content key differs, or that the
        shared tokens would split. Both token sequences must hold one run of image tokens per image
        (the run ``j`` is image ``j``); where they do not (a processor that tiles an image into
        several runs), only an entry of the same images serves. The cache salt (the key's first
        item) must always be equal.
        """
        best: tuple[int, int] | None = None
        with self._lock:
            for key, (cached, cached_images, _, _) in self._entries.items():
                if cached_images == image_key:
                    n = _common_prefix(cached, ids, limit)
                elif image_token is None or not cached_images or not image_key or cached_images[0] != image_key[0]:
                    continue
                else:
                    n = _image_prefix(cached, cached_images[1:], ids, image_key[1:], image_token, limit)
                if n > 0 and (best is None or n > best[1]):
                    best = (key, n)
            if best is None:
                return None
            self._entries.move_to_end(best[0])
            layers = self._entries[best[0]][2]
        n = best[1]
        return n, [(k[:, :, :n], v[:, :, :n]) for k, v in layers]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _extends(new: Any, old: Any, slack: int, insertions: bool = True) -> bool:
    """Whether id tensor ``new`` holds ``old`` but for text inserted before old's tail: ``old`` is
    ``new``'s prefix, or (``insertions``) old's head is new's prefix and old's tail ends ``new``, up
    to ``slack`` tokens at the seam (``new`` no shorter than ``old``)."""
    if len(new) < len(old):
        return False
    head = _common_prefix(old, new, len(old))
    if head == len(old):
        return True
    if head == 0 or not insertions:
        return False
    rest = len(old) - head  # old's tail after the shared head: must end new too
    tail = _common_prefix(old.flip(0)[:rest], new.flip(0)[: len(new) - head], rest)
    return head + tail >= len(old) - slack


def _image_runs(ids: Any, image_token: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive ``image_token`` ids in a 1-D id tensor."""
    import torch

    flags = torch.nn.functional.pad((ids == image_token).to(torch.int8), (1, 1))
    edges = flags[1:] - flags[:-1]
    starts, ends = (edges == 1).nonzero()[:, 0].tolist(), (edges == -1).nonzero()[:, 0].tolist()
    return list(zip(starts, ends, strict=True))


def _image_prefix(cached: Any, cached_images: tuple, ids: Any, images: tuple, image_token: int, limit: int) -> int:
    """The common token prefix of ``cached`` and ``ids`` (at most ``limit``), cut before the first
    image run that holds different images (by content key) or that the prefix would split; 0 when
    either sequence has not exactly one image run per image (run ``j`` could not be named image ``j``)."""
    n = _common_prefix(cached, ids, limit)
    if n <= 0:
        return 0
    runs = _image_runs(ids, image_token)
    if len(runs) != len(images):
        return 0
    if not runs or n <= runs[0][0]:
        return n  # no image inside the shared tokens
    cached_runs = _image_runs(cached, image_token)
    if len(cached_runs) != len(cached_images):
        return 0
    for j, (start, end) in enumerate(runs):
        if start >= n:
            break
        if end > n or j >= len(cached_runs) or cached_runs[j] != (start, end) or cached_images[j] != images[j]:
            return start
    return n


def _common_prefix(a: Any, b: Any, limit: int) -> int:
    """Length of the common prefix of two 1-D id tensors, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n
