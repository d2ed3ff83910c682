"""``POST /v1/moderations``: OpenAI's moderation endpoint, answered by the configured guard (any Checker).

Shapes follow OpenAI's moderation API as the ``openai`` package types it (openai 3.63.0:
``openai/types/moderation_create_params.py``, ``moderation_multi_modal_input_param.py``,
``moderation.py``, ``moderation_create_response.py``; https://platform.openai.com/docs/api-reference/moderations):

- ``input``: a string (one result), a list of strings (one result each), or a list of
  ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}`` parts
  (one result for them together, as OpenAI's omni-moderation does);
- the answer: ``{"id": "modr-...", "model": ..., "results": [{"flagged", "categories",
  "category_scores", "category_applied_input_types"}]}`` with OpenAI's 13 category names, plus a
  ``visguard`` field per result (label, score, category, stage).

Each input is one pre-check (``stage: input``) of its images and text; the guard's policy decides
``flagged`` (:meth:`~visguard.core.policy.Policy.action`: ``block`` and ``flag`` are flagged; an
``unavailable`` verdict is flagged under ``on_error="block"``, not flagged but ``degraded`` under
``allow``, HTTP 503 under ``raise``). Scores go to OpenAI's categories through
:data:`OPENAI_CATEGORIES` (docs/serving.md has the table); a visguard category with no OpenAI
counterpart (``Privacy``, a custom category) is reported under its own lower-cased name, never dropped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

from visguard.core.errors import InputError
from visguard.core.images import ImageLimits
from visguard.core.types import GuardRequest, Verdict
from visguard.engine.checker import Checker
from visguard.hosting.audit import AuditLog
from visguard.integrations.openai.server.common import ApiError
from visguard.integrations.openai.server.proxy import load_request_images, public_verdict

#: OpenAI's moderation categories, in the order its API lists them
OPENAI_CATEGORY_NAMES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)

#: a visguard (or guard-native) category name, lower-cased -> the OpenAI category it is reported as
OPENAI_CATEGORIES: Mapping[str, str] = {
    # visguard's policy (the MIS taxonomy)
    "illegal activity": "illicit",
    "violent": "violence",
    "hate": "hate",
    "self-harm": "self-harm",
    "erotic": "sexual",
    # MIS sub-categories that OpenAI names more precisely
    "weapon-related violence": "illicit/violent",
    "physical self-injury": "self-harm",
    # names guard models report when a code has no visguard counterpart (core/taxonomy.py)
    "violent crimes": "violence",
    "non-violent crimes": "illicit",
    "sex crimes": "sexual",
    "child exploitation": "sexual/minors",
    "indiscriminate weapons": "illicit/violent",
    "sexual content": "sexual",
    "harassment": "harassment",
    "hate, humiliation, harassment": "harassment",
    "violence, harm, or cruelty": "violence",
    "criminal planning": "illicit",
    "weapons or substance abuse": "illicit/violent",
    "nudity content": "sexual",
    "dangerous": "illicit/violent",
    "sexual": "sexual",
    "violence & gore": "violence/graphic",
    "violence_gore": "violence/graphic",
}


def openai_category(name: str) -> str:
    """The OpenAI category a visguard category name is reported as (its own lower-cased name if none)."""
    key = name.strip().lower()
    return OPENAI_CATEGORIES.get(key, key)


def _inputs(value: Any) -> list[tuple[list[Any], str]]:
    """``input`` -> one (image URLs, text) per result."""
    if isinstance(value, str):
        return [([], value)]
    if not isinstance(value, list) or not value:
        raise InputError("input must be a string, a non-empty list of strings, or a non-empty list of text / image_url parts")
    if all(isinstance(v, str) for v in value):
        return [([], v) for v in value]
    if not all(isinstance(v, dict) for v in value):
        raise InputError("input mixes strings and parts; send a list of strings or a list of parts")
    images: list[Any] = []
    texts: list[str] = []
    for i, part in enumerate(value):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
            images.append(part["image_url"]["url"])
        else:
            raise InputError(f"input[{i}] must be {{'type': 'text', 'text': str}} or "
                             "{'type': 'image_url', 'image_url': {'url': str}}")
    return [(images, "\n".join(texts))]


def moderation_result(verdict: Verdict, action: str, *, has_text: bool, has_image: bool) -> dict[str, Any]:
    """One ``results[]`` entry for ``verdict`` (``action``: the policy's action on it)."""
    flagged = action in ("block", "flag")
    scores = dict.fromkeys(OPENAI_CATEGORY_NAMES, 0.0)
    categories = dict.fromkeys(OPENAI_CATEGORY_NAMES, False)
    for name, score in (verdict.category_scores or {}).items():
        key = openai_category(name)
        scores[key] = max(scores.get(key, 0.0), float(score))
    named = verdict.categories or ((verdict.category,) if verdict.category else ())
    for name in named:
        key = openai_category(name)
        if verdict.score is not None and name not in (verdict.category_scores or {}):
            scores[key] = max(scores.get(key, 0.0), float(verdict.score))
        if verdict.label == "unsafe":
            categories[key] = categories.get(key, False) or flagged
    for key in scores:
        categories.setdefault(key, False)
    types = [t for t, present in (("text", has_text), ("image", has_image)) if present]
    return {
        "flagged": flagged,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": {key: list(types) for key in scores},
        "visguard": {**(public_verdict(verdict) or {}), "action": action},
    }


async def moderate(guard: Checker, body: Any, *, limits: ImageLimits | None, max_request_pixels: int | None,
                   audit: AuditLog | None, model_name: str) -> dict[str, Any]:
    """Answer a moderation request body.

    Raises:
        ApiError: 400 for a malformed input or a refused image; 503 when the guard is unavailable
            and the policy says ``on_error="raise"``.
    """
    if not isinstance(body, dict) or "input" not in body:
        raise ApiError(400, "missing required parameter: 'input'", param="input")
    try:
        inputs = _inputs(body["input"])
    except InputError as exc:
        raise ApiError(400, str(exc), param="input") from exc

    def build() -> list[GuardRequest]:
        every = [url for urls, _ in inputs for url in urls]
        load_request_images(every, limits, max_request_pixels)  # the budget over the whole request
        return [guard.request(load_request_images(urls, limits, None), text) for urls, text in inputs]

    try:
        requests = await asyncio.to_thread(build)
    except InputError as exc:
        raise ApiError(400, str(exc), param="input") from exc
    verdicts = await asyncio.to_thread(guard.report_batch, requests)
    request_id = uuid.uuid4().hex
    results = []
    for request, verdict, (urls, text) in zip(requests, verdicts, inputs, strict=True):
        action = guard.policy.action(verdict)
        if audit is not None:
            audit.record_verdict(verdict, request_id=request_id, images=request.images, action=action)
        if action == "raise":
            raise ApiError(503, "the safety check is unavailable", type="server_error", code="guard_unavailable",
                           extra={"visguard": {"verdict": public_verdict(verdict)}})
        results.append(moderation_result(verdict, action, has_text=bool(text), has_image=bool(urls)))
    model = body.get("model") if isinstance(body.get("model"), str) else model_name
    return {"id": "modr-" + request_id, "model": model, "results": results}
