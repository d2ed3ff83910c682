"""Credential redaction: the one place that scrubs secrets from text visguard shows or logs.

Error messages quote URLs, server answers, headers and exception texts; any of them may carry a
secret. :func:`redact` removes:

- the ``user:password@`` part of URLs;
- credentials in HTTP headers: ``Authorization: Bearer|Basic|Token ...`` (any scheme),
  ``x-api-key:``, ``api-key:``, ``x-auth-token:`` and the like, in header lines, dict reprs and
  JSON;
- bearer tokens elsewhere (``Bearer <token>``; a token looks like one: 8+ characters with a digit
  or symbol, or 20+ letters, so "Bearer bonds" stays);
- API keys by their shape: OpenAI/Anthropic style ``sk-...`` (a long random segment, so
  ``sk-learn-regressor-v2`` stays), Hugging Face ``hf_...``, GitHub ``ghp_``/``gho_``/``ghs_``/
  ``ghu_``/``ghr_``/``github_pat_...``, AWS access key ids ``AKIA...``/``ASIA...``;
- key-like values: ``api_key=`` / ``access_token=`` / ``password=`` / ``secret=`` query, form, repr
  (``api_key='...'``), JSON or dict fields (``"api_key": "..."``) and YAML lines
  (``api_key: ...``); the generic names ``key=`` / ``token=`` in a URL query, elsewhere only with
  a value that looks like a secret (``key=Enter`` stays);
- PEM private keys (``-----BEGIN ... PRIVATE KEY-----`` to its end line, or to the end of the text);
- any value the caller names, such as the key read from ``$OPENAI_API_KEY``.

Redaction belongs at the sinks that leave the process (logs, error texts, HTTP bodies, audit
lines); the data a run records (evaluation item ids, questions, answers) is never rewritten: see
:func:`redact_errors` for records that hold both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

#: what a secret is replaced with
MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_PRIVATE_KEY = re.compile(r"-----BEGIN (?P<kind>[A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
                          re.DOTALL)
# header names whose value is a credential, as a header line, a dict/JSON field or a repr
_HEADER_NAMES = r"(?:authorization|proxy-authorization|x-api-key|api-key|x-auth-token|x-access-token|x-goog-api-key|cookie)"
_HEADER = re.compile(rf"(?P<prefix>(?<![A-Za-z0-9_-]){_HEADER_NAMES}[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\"'\r\n,}}]+)",
                     re.IGNORECASE)
_BEARER = re.compile(r"(?P<prefix>\b(?:[Bb]earer|BEARER)\s+)(?P<token>[A-Za-z0-9._~+/=-]+)")
_STRONG_NAMES = r"(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|refresh[_-]?token|id[_-]?token|client[_-]?secret|" \
                r"secret[_-]?key|secret|password|passwd|private[_-]?key)"
_WEAK_NAMES = r"(?:key|token)"
# name=value (query, form, repr without quotes)
_STRONG_PARAM = re.compile(rf"(?P<prefix>(?<![A-Za-z0-9_]){_STRONG_NAMES}=)(?P<value>[^&\s\"',}})]+)", re.IGNORECASE)
_WEAK_PARAM = re.compile(rf"(?P<prefix>(?<![A-Za-z0-9_]){_WEAK_NAMES}=)(?P<value>[^&\s\"',}})]+)", re.IGNORECASE)
# name='value' / name="value" (a Python repr of a call or an object)
_QUOTED_PARAM = re.compile(rf"(?P<prefix>(?<![A-Za-z0-9_]){_STRONG_NAMES}\s*=\s*(?P<q>[\"']))(?P<value>[^\"']*)", re.IGNORECASE)
_WEAK_QUOTED_PARAM = re.compile(rf"(?P<prefix>(?<![A-Za-z0-9_]){_WEAK_NAMES}\s*=\s*(?P<q>[\"']))(?P<value>[^\"']*)", re.IGNORECASE)
# "name": "value" / 'name': 'value' (JSON, dict reprs)
_KEY_FIELD = re.compile(rf"(?P<prefix>[\"']{_STRONG_NAMES}[\"']\s*:\s*[\"'])(?P<value>[^\"']*)", re.IGNORECASE)
_WEAK_FIELD = re.compile(rf"(?P<prefix>[\"']{_WEAK_NAMES}[\"']\s*:\s*[\"'])(?P<value>[^\"']*)", re.IGNORECASE)
# YAML / .env / config lines: name: value
_YAML = re.compile(rf"(?P<prefix>(?:^|(?<=\n)|(?<=\s))[ \t-]*{_STRONG_NAMES}[ \t]*:[ \t]*)(?P<value>[^\s\"'#,}}]+)",
                   re.IGNORECASE)
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")
_SHAPED = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|(?:AKIA|ASIA)[A-Z0-9]{16})\b")


def _secret_like(value: str) -> bool:
    """Whether a token looks like a credential rather than a word: 8+ characters with a digit or a
    symbol, or 20+ characters."""
    if len(value) >= 20:
        return True
    return len(value) >= 8 and bool(re.search(r"[0-9._~+/=-]", value))


def _sk_key(match: re.Match[str]) -> str:
    text = match.group(0)
    segments = re.split(r"[-_]", text[3:])
    # real keys carry a long random segment (letters and digits); "sk-learn-regressor-v2" does not
    if len(text) >= 32 or any(len(s) >= 10 and re.search(r"\d", s) for s in segments):
        return MASK
    return text


def _masked(match: re.Match[str]) -> str:
    return f"{match['prefix']}{MASK}"


def _masked_if_secret(match: re.Match[str]) -> str:
    value = match["value"]
    # a URL's query (?token=..., &key=...) names a credential; prose (press key=Enter) needs a secret-like value
    in_query = match.start() > 0 and match.string[match.start() - 1] in "?&"
    return f"{match['prefix']}{MASK}" if in_query or _secret_like(value) else match.group(0)


def _masked_yaml(match: re.Match[str]) -> str:
    value = match["value"]
    return f"{match['prefix']}{MASK}" if len(value) >= 6 or re.search(r"\d", value) else match.group(0)


_SCHEMES = ("bearer", "basic", "token", "digest", "negotiate", "apikey", "key", "hmac")
_PROSE = ("see", "is", "not", "missing", "none", "null", "required", "invalid", "empty", "header", "must", "was")


def _header(match: re.Match[str]) -> str:
    value = match["value"]
    words = re.match(r"(?P<lead>\s*)(?P<first>\S+)(?:(?P<gap>\s+)(?P<second>\S+))?(?P<rest>.*)", value, re.DOTALL)
    if words is None:
        return match.group(0)
    first, second = words["first"], words["second"]
    if first.lower() in _SCHEMES and second:  # Authorization: Basic <credentials>
        return f"{match['prefix']}{words['lead']}{first}{words['gap']}{MASK}{words['rest']}"
    if first.lower().strip(".;:") in _PROSE or first.startswith("$"):
        return match.group(0)  # prose about the header ("Authorization: missing"), not its value
    return f"{match['prefix']}{words['lead']}{MASK}{value[words.end('first'):]}"


def _bearer(match: re.Match[str]) -> str:
    return f"{match['prefix']}{MASK}" if _secret_like(match["token"]) else match.group(0)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with credentials replaced by ``***`` (see the module docstring for what counts).

    Args:
        text: any message (an exception text, a URL, a server's error body).
        secrets: exact values to remove as well (e.g. the API key in use, header values); ``None``
            and values shorter than 4 characters are ignored (too likely to match ordinary text).

    Returns:
        The text with URL userinfo, credentials in headers, bearer tokens, key-shaped strings,
        key-like parameters, private keys and ``secrets`` masked.
    """
    out = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        out = out.replace(secret, MASK)
    out = _PRIVATE_KEY.sub(MASK, out)
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", out)
    out = _HEADER.sub(_header, out)
    out = _BEARER.sub(_bearer, out)
    out = _STRONG_PARAM.sub(_masked, out)
    out = _WEAK_PARAM.sub(_masked_if_secret, out)
    out = _QUOTED_PARAM.sub(_masked, out)
    out = _WEAK_QUOTED_PARAM.sub(_masked_if_secret, out)
    out = _KEY_FIELD.sub(_masked, out)
    out = _WEAK_FIELD.sub(_masked_if_secret, out)
    out = _YAML.sub(_masked_yaml, out)
    out = _SHAPED.sub(MASK, out)
    return _SK_KEY.sub(_sk_key, out)


def redact_fields(value: Any) -> Any:
    """``value`` with :func:`redact` applied to every string in it (settings, metadata, error bodies).

    Dicts, lists and tuples are walked (their keys are kept as they are); other values are returned
    unchanged. Used where records leave the process: audit lines, run settings (``run.json``). A
    record that also holds data (evaluation rows) uses :func:`redact_errors`.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_fields(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_fields(v) for v in value)
    return value


#: keys whose values are error texts (also any key ending in ``_error``)
ERROR_KEYS = frozenset({"error", "errors", "message", "detail", "warning", "plots_note"})


def redact_errors(value: Any) -> Any:
    """``value`` with :func:`redact` applied to the error texts in it only: strings (or lists of
    them) under :data:`ERROR_KEYS` or a key ending in ``_error``, at any depth.

    Everything else (item ids, questions, answers, labels) is the data a run records and is kept
    exactly: an id like ``img.png?token=3`` must stay the same for a rerun to resume it.
    """
    if isinstance(value, dict):
        return {k: (redact_fields(v) if _is_error_key(k) else redact_errors(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_errors(v) for v in value)
    return value


def _is_error_key(key: Any) -> bool:
    return isinstance(key, str) and (key in ERROR_KEYS or key.endswith("_error"))


def redact_url(url: str) -> str:
    """A URL safe to show: no ``user:password@``, no key-like query values."""
    return redact(url)
