"""The ``openai`` backend: a guard model served behind any OpenAI-compatible chat endpoint.

Works with vLLM's OpenAI server, SGLang, TGI and hosted APIs. Images travel as ``data:`` URLs.

- ``score`` (fast mode): the prompt's ``assistant_prefix`` ("Verdict:") is sent as a prefilled
  assistant message that the server continues (``continue_final_message: true,
  add_generation_prompt: false`` in the request body, as vLLM and SGLang accept), with
  ``max_tokens=1, logprobs=true, top_logprobs=N``. P(unsafe) is the softmax restricted to the verdict
  spellings found among the N returned candidates, as the transformers backend computes it over the
  verdict tokens' logits (the full-vocabulary normaliser cancels out).

  A listed candidate that is a whole spelling counts for its label, as the transformers backend
  scores each spelling's first token (vLLM parity: plugins/visguard-vllm/tests/test_openai_server.py).
  An unlisted ``unsafe`` spelling counts with its longest listed first piece (a tokenizer may split
  ``" Unsafe"`` into ``" Un"`` + ``"safe"``), else at the smallest listed probability; ``safe`` counts
  from whole spellings only (see :func:`verdict_probability`), so the result never errs toward safe.

  *Prompts whose template picks the task from the last role* (``GuardPrompt.prefill_as_message``
  false: Qwen3Guard). A prefilled assistant message would turn a prompt check into a response
  check, so the conversation is sent alone (``add_generation_prompt: true``, the template's own
  assistant turn), the model writes the prefix itself in a few greedy tokens (``max_tokens=8``,
  per-token ``top_logprobs``), and the score is read at the verdict word's first token after the
  prefix. An answer that does not start with the prefix fails the check (``unavailable``).

  *Approximation when a spelling is missing from the top N.* Its probability is then unknown but no
  larger than the smallest listed one. A missing ``unsafe`` spelling is counted at that upper bound
  and a missing ``safe`` spelling at 0, so a truncated list can only *raise* the score: the result
  is exact when every spelling is listed and an upper bound of the exact score otherwise. When no
  spelling of either label is listed (or the server returns no logprobs) the check fails: the guard
  turns that into an ``unavailable`` verdict, never ``safe``.
- ``generate`` (reason mode): plain chat generation; per-token verdict probabilities come from the
  per-token ``top_logprobs`` when the server offers them (the same rule, ``None`` where no spelling
  is listed).

Requests go through :class:`visguard.integrations.openai.client.ApiClient` (one pooled ``httpx`` client; per-request
timeouts; connect errors, HTTP 429 and 5xx retried with exponential backoff, ``Retry-After``
honoured and capped, nothing else); a batch is sent as concurrent requests. Responses are read with
the wire helpers of :mod:`visguard.integrations.openai.wire`.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from visguard.core.errors import BackendError
from visguard.core.images import GuardImage
from visguard.engine.backend import Backend, Generation
from visguard.engine.format import GuardPrompt
from visguard.hookspecs import hookimpl
from visguard.integrations.openai.client import ApiClient
from visguard.integrations.openai.wire import WireError, completion_choice, content_text, image_part

#: generated tokens for a prefix the model writes itself ("Safety:" + the verdict word's first piece, with room)
_PREFIX_TOKENS = 8


class OpenAIBackend(Backend):
    """Ask a guard model served behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the served model name (what the server calls it in ``"model"``).
        base_url: the API root including the version, e.g. ``http://127.0.0.1:8000/v1``
            (default: ``$VISGUARD_GUARD_BASE_URL``).
        api_key_env: name of the environment variable holding the API key (sent as a bearer
            token when set; nothing is sent when the variable is unset or empty).
        timeout_s: per-request timeout (connect, read and write).
        max_retries: further attempts after a connect error, HTTP 429 or 5xx.
        backoff_s: first retry delay; doubles on each retry (with jitter), capped at ``max_backoff_s``.
        max_backoff_s: largest delay between attempts (also caps ``Retry-After``).
        top_logprobs: N, how many candidates the server lists per position (OpenAI caps it at 20;
            vLLM at its ``--max-logprobs``).
        scores: ``False`` when the server cannot continue a prefilled assistant message or return
            logprobs: :attr:`supports_scores` is then false and fast mode is refused (use reason).
        step_logprobs: request per-token ``top_logprobs`` in reason mode.
        max_concurrency: how many requests of one batch run at once.
        image_format: ``PNG`` (lossless, default) or ``JPEG`` for the data URLs.
        extra_body: more fields merged into every request body (e.g. ``{"chat_template_kwargs": ...}``).
        headers: more HTTP headers.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        top_logprobs: int = 20,
        scores: bool = True,
        step_logprobs: bool = True,
        max_concurrency: int = 8,
        image_format: str = "PNG",
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("VISGUARD_GUARD_BASE_URL")
        if not base_url:
            raise BackendError("the openai backend needs base_url= (e.g. http://127.0.0.1:8000/v1)")
        if top_logprobs < 1 or max_concurrency < 1:
            raise BackendError("top_logprobs and max_concurrency must be >= 1")
        self.model_id = model
        self.client = ApiClient(base_url, what="guard server", api_key_env=api_key_env, timeout_s=timeout_s,
                                max_retries=max_retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                                headers={"User-Agent": "visguard-openai-backend", **dict(headers or {})},
                                max_connections=max_concurrency)
        self.base_url = self.client.root
        self.top_logprobs = top_logprobs
        self.step_logprobs = step_logprobs
        self.max_concurrency = max_concurrency
        self.image_format = image_format
        self.extra_body = dict(extra_body or {})
        self._scores = scores
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def supports_scores(self) -> bool:
        return self._scores

    # ------------------------------------------------------------------ requests
    def messages(self, prompt: GuardPrompt, *, prefill: bool) -> list[dict[str, Any]]:
        """The prompt as OpenAI chat messages (images as data URLs; the assistant prefix prefilled)."""
        images = iter(prompt.images)
        out: list[dict[str, Any]] = []
        for msg in prompt.messages:
            content = msg.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind == "image":
                        try:
                            img = next(images)
                        except StopIteration:
                            raise BackendError("prompt has more image parts than images") from None
                        parts.append(image_part(_guard_image(img), self.image_format))
                    elif kind == "text":
                        parts.append({"type": "text", "text": part.get("text", "")})
                    else:
                        raise BackendError(f"cannot send a {kind!r} content part to an OpenAI-compatible server")
                content = parts
            out.append({"role": msg["role"], "content": content})
        if next(images, None) is not None:
            raise BackendError("prompt has more images than image parts")
        if prefill and prompt.assistant_prefix:
            out.append({"role": "assistant", "content": prompt.assistant_prefix})
        return out

    def score_request(self, prompt: GuardPrompt) -> dict[str, Any]:
        """The request body of a fast-mode check."""
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": self.messages(prompt, prefill=True),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            **self.extra_body,
        }
        if prompt.assistant_prefix:
            body.update({"continue_final_message": True, "add_generation_prompt": False})
        return _with_cache_salt(_with_template_kwargs(body, prompt), prompt)

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST JSON (retried on connect errors, 429 and 5xx); the decoded response.

        Raises:
            BackendError: after the last failed attempt, or at once for other HTTP errors.
        """
        return self.client.request_json("POST", path, body)

    # ------------------------------------------------------------------ Backend API
    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        if not self._scores:
            raise BackendError("this openai backend was configured with scores=False; use mode='reason'")
        return self._map(self._score_one, prompts)

    def _score_one(self, prompt: GuardPrompt) -> float:
        if prompt.assistant_prefix and not prompt.prefill_as_message:
            return self._score_written_prefix(prompt)
        data = self.post("/chat/completions", self.score_request(prompt))
        try:
            content = data["choices"][0]["logprobs"]["content"]
            candidates = content[0]["top_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"guard server returned no top_logprobs (does it support logprobs?): {exc!r}") from exc
        score = verdict_probability(candidates, prompt.verdict_words)
        if score is None:
            listed = [c.get("token") for c in candidates]
            raise BackendError(f"no verdict spelling among the top {len(candidates)} candidates {listed!r}")
        return score

    def written_prefix_request(self, prompt: GuardPrompt) -> dict[str, Any]:
        """The request body of a fast-mode check whose prefix the model writes itself (see the module docstring)."""
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": self.messages(prompt, prefill=False),
            "max_tokens": _PREFIX_TOKENS,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            **self.extra_body,
            "add_generation_prompt": True,
            "continue_final_message": False,
        }
        return _with_cache_salt(_with_template_kwargs(body, prompt), prompt)

    def _score_written_prefix(self, prompt: GuardPrompt) -> float:
        data = self.post("/chat/completions", self.written_prefix_request(prompt))
        try:
            choice = completion_choice(data)
            text = content_text(choice["message"].get("content")) or ""
        except WireError as exc:
            raise self.client.error(str(exc)) from exc
        head = re.match(r"\s*" + re.escape(prompt.assistant_prefix) + r"[ \t]*", text)
        if head is None or head.end() >= len(text):
            raise BackendError(f"the guard did not answer with {prompt.assistant_prefix!r} and a verdict "
                               f"(it wrote {text[:40]!r}); no fast score")
        steps = ((choice.get("logprobs") or {}).get("content")) or []
        score = _generation(text, steps, prompt.verdict_words).score_at(head.end())
        if score is None:
            raise BackendError("guard server returned no usable top_logprobs at the verdict word "
                               "(no verdict spelling listed, or tokens that do not spell the text)")
        return score

    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        return self._map(lambda p: self._generate_one(p, max_new_tokens), prompts)

    def _generate_one(self, prompt: GuardPrompt, max_new_tokens: int) -> Generation:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": self.messages(prompt, prefill=False),
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            **self.extra_body,
        }
        if self.step_logprobs:
            body.update({"logprobs": True, "top_logprobs": self.top_logprobs})
        body.update(prompt.request_options)
        data = self.post("/chat/completions", _with_cache_salt(_with_template_kwargs(body, prompt), prompt))
        try:
            choice = completion_choice(data)
            text = content_text(choice["message"].get("content")) or ""
        except WireError as exc:
            raise self.client.error(str(exc)) from exc
        steps = ((choice.get("logprobs") or {}).get("content")) or []
        return _generation(text, steps, prompt.verdict_words)

    def _map(self, fn: Any, prompts: Sequence[GuardPrompt]) -> list[Any]:
        if len(prompts) <= 1:
            return [fn(p) for p in prompts]
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="visguard-openai")
        return list(self._pool.map(fn, prompts))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def verdict_probability(
    candidates: Sequence[Mapping[str, Any]], verdict_words: Mapping[str, Sequence[str]]
) -> float | None:
    """P(unsafe) from one position's ``top_logprobs`` list (see the module docstring for the rule).

    A listed candidate whose token text is a spelling counts for its label. An ``unsafe`` spelling
    that is not listed counts with its longest listed first piece (a tokenizer that splits
    ``" Unsafe"`` lists ``" Un"``; the server does not say how it tokenizes), else at the smallest
    listed probability: an unlisted unsafe spelling only ever raises the score (the upper bound of
    the module docstring). ``safe`` is counted from whole spellings only, so a piece never makes a
    request look safer. Whitespace-only candidates count for nothing; each candidate counts once;
    with no whole spelling listed there is no score.

    Returns:
        The (upper-bound) restricted-softmax score, or ``None`` when no spelling is listed.
    """
    probs: dict[str, float] = {}
    for c in candidates:
        tok, lp = c.get("token"), c.get("logprob")
        if isinstance(tok, str) and isinstance(lp, int | float) and tok not in probs:
            probs[tok] = math.exp(lp) if lp > -math.inf else 0.0
    if not probs:
        return None
    floor = min(probs.values())
    spellings = {label: tuple(dict.fromkeys(verdict_words.get(label, ()))) for label in ("safe", "unsafe")}
    mass = {label: sum(probs[w] for w in words if w in probs) for label, words in spellings.items()}
    if not any(w in probs for words in spellings.values() for w in words):
        return None
    used = {w for words in spellings.values() for w in words if w in probs}
    for word in spellings["unsafe"]:
        if word in probs:
            continue
        pieces = [t for t in probs if t.strip() and t not in used and word.startswith(t)]
        if pieces:
            piece = max(pieces, key=len)
            used.add(piece)
            mass["unsafe"] += max(probs[piece], floor)
        else:
            mass["unsafe"] += floor  # upper bound of an unlisted candidate: never lowers the score
    total = mass["safe"] + mass["unsafe"]
    return mass["unsafe"] / total if total > 0.0 else None


def _generation(text: str, steps: Sequence[Mapping[str, Any]], verdict_words: Mapping[str, Sequence[str]]) -> Generation:
    """Token spans and per-step scores, when the server's tokens spell out exactly ``text``."""
    tokens = [t for t in (s.get("token") for s in steps) if isinstance(t, str)]
    if not steps or len(tokens) != len(steps):
        return Generation(text=text)
    spans, pos = [], 0
    for tok in tokens:
        spans.append((pos, pos + len(tok)))
        pos += len(tok)
    # Servers list the end-of-turn token or byte pieces sometimes; offsets are only usable when
    # the tokens concatenate to the text (a trailing stop token beyond the text is dropped).
    joined = "".join(tokens)
    if not joined.startswith(text):
        return Generation(text=text)
    keep = [i for i, (start, _) in enumerate(spans) if start < len(text)] or [0]
    n = keep[-1] + 1
    scores = tuple(verdict_probability(s.get("top_logprobs") or [], verdict_words) for s in steps[:n])
    return Generation(text=text, token_spans=tuple(spans[:n]), step_scores=scores)


def _guard_image(image: Any) -> GuardImage:
    return image if isinstance(image, GuardImage) else GuardImage(image, "", "prompt")


@hookimpl
def register_backends(register):
    register("openai", OpenAIBackend)


def _with_template_kwargs(body: dict[str, Any], prompt: GuardPrompt) -> dict[str, Any]:
    """Send the format's chat-template variables as ``chat_template_kwargs`` (vLLM's field)."""
    if prompt.template_kwargs:
        body["chat_template_kwargs"] = {**body.get("chat_template_kwargs", {}), **prompt.template_kwargs}
    return body


def _with_cache_salt(body: dict[str, Any], prompt: GuardPrompt) -> dict[str, Any]:
    """Send the prompt's cache salt as ``cache_salt`` (vLLM's OpenAI server field, vllm 0.32
    ``ChatCompletionRequest.cache_salt``: the server's prefix cache is salted with it); none: no field,
    so a server without the field never sees it."""
    if prompt.cache_salt:
        body["cache_salt"] = prompt.cache_salt
    return body
