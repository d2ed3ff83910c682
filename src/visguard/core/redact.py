"""Credential redaction: the one place that scrubs secrets from text visguard shows or logs.

Error messages quote URLs, server answers and exception texts; any of them may carry a secret.
:func:`redact` removes the three kinds visguard handles: the ``user:password@`` part of URLs,
bearer tokens, and API keys (``sk-...`` style keys, ``api_key=`` / ``key=`` / ``token=`` query or
form values, and any value the caller names, such as the key read from ``$OPENAI_API_KEY``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

#: what a secret is replaced with
MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_BEARER = re.compile(r"(?P<prefix>\b[Bb]earer\s+)[A-Za-z0-9._~+/=-]+")
_NAMES = r"(?:api[_-]?key|access[_-]?token|token|key|password|secret)"
# query / form values (key=...) and JSON or repr fields ("api_key": "...", 'token': '...')
_KEY_PARAM = re.compile(rf"(?P<prefix>(?<![A-Za-z0-9_]){_NAMES}=)[^&\s\"',}}]+", re.IGNORECASE)
_KEY_FIELD = re.compile(rf"(?P<prefix>[\"']{_NAMES}[\"']\s*:\s*[\"'])[^\"']*", re.IGNORECASE)
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with credentials replaced by ``***``.

    Args:
        text: any message (an exception text, a URL, a server's error body).
        secrets: exact values to remove as well (e.g. the API key in use); ``None`` and values
            shorter than 4 characters are ignored (too likely to match ordinary text).

    Returns:
        The text with URL userinfo, bearer tokens, key-like parameters and ``secrets`` masked.
    """
    out = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, MASK)
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", out)
    out = _BEARER.sub(lambda m: f"{m['prefix']}{MASK}", out)
    out = _KEY_PARAM.sub(lambda m: f"{m['prefix']}{MASK}", out)
    out = _KEY_FIELD.sub(lambda m: f"{m['prefix']}{MASK}", out)
    return _SK_KEY.sub(MASK, out)


def redact_fields(value: Any) -> Any:
    """``value`` with :func:`redact` applied to every string in it (records, rows, metadata).

    Dicts, lists and tuples are walked (their keys are kept as they are); other values are returned
    unchanged. Used where records leave the process: audit lines, evaluation rows, run metadata.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_fields(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_fields(v) for v in value)
    return value


def redact_url(url: str) -> str:
    """A URL safe to show: no ``user:password@``, no key-like query values."""
    return redact(url)
