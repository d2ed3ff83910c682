"""What a client may see of a decision: labels, scores and categories, never texts.

One home for the client-facing shape of verdicts and decisions, shared by ``visguard serve`` (the
``visguard`` field of a completion, ``/v1/guard/check``, ``/v1/moderations``) and LangChain's
``GuardedChatModel`` (``response_metadata["visguard"]``). A verdict's ``raw`` output, its
``reasoning``, the guard's ``safe_answer`` and timings stay with the operator: the Python API
(:class:`~visguard.hosting.guarded.GuardedResult`) and the audit log keep the full verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from visguard.core.redact import redact
from visguard.core.types import Verdict

#: verdict fields a client sees (``raw``, ``reasoning`` and ``safe_answer`` stay in the audit log)
PUBLIC_VERDICT_FIELDS = ("label", "score", "category", "sub_category", "stage")
#: decision fields a client sees
PUBLIC_DECISION_FIELDS = ("blocked", "flagged", "reason", "stage", "degraded", "request_id", "output_checks",
                          "host_called", "host_cancelled", "answered_by_guard")


def public_verdict(verdict: Verdict | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A verdict as a client sees it: label, score, category, sub-category, stage."""
    if verdict is None:
        return None
    data = verdict.model_dump(mode="json") if isinstance(verdict, Verdict) else dict(verdict)
    out = {k: data.get(k) for k in PUBLIC_VERDICT_FIELDS}
    if data.get("stages"):  # a cascade: each stage's guard and its public verdict
        out["stages"] = [{**(public_verdict(s) or {}), "model": public_name(s.get("model"))} for s in data["stages"]]
    return out


def public_name(name: str | None) -> str:
    """A model name fit for an unauthenticated answer: no credentials, no path on this server."""
    text = redact(str(name or ""))
    if "://" in text:
        return text.split("://", 1)[0] + "://…"  # a URL: its scheme only (hosts and keys stay private)
    if "/" in text or "\\" in text:
        path = text.replace("\\", "/").rstrip("/")
        looks_local = text.startswith(("/", ".", "~")) or ":\\" in text or path.count("/") > 1
        return path.rsplit("/", 1)[-1] if looks_local else text  # hub ids (org/name) stay
    return text


def public_decision(decision: Mapping[str, Any]) -> dict[str, Any]:
    """A decision (:meth:`GuardedResult.summary` or the proxy's) without texts, raw output or timings."""
    out: dict[str, Any] = {k: decision[k] for k in PUBLIC_DECISION_FIELDS if k in decision}
    for key in ("input_verdict", "output_verdict", "verdict"):
        if key in decision:
            out[key] = public_verdict(decision[key])
    if "choices" in decision:
        out["choices"] = [public_decision(c) for c in decision["choices"]]
    return out
