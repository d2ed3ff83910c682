"""Credential redaction: one helper for every error text that may quote a URL, a header or a key."""

from __future__ import annotations

import pytest

from visguard.core.redact import MASK, redact, redact_url


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("cannot reach http://alice:s3cret@guard:8000/v1: refused", "s3cret"),
        ("https://tok3n@host.example/v1/models answered 401", "tok3n"),
        ("headers {'Authorization': 'Bearer abc.def-123'}", "abc.def-123"),
        ("GET http://h/v1?api_key=k3y-value&x=1 failed", "k3y-value"),
        ('{"error": {"message": "bad", "api_key": "zzzz9999"}}', "zzzz9999"),
        ("Incorrect API key provided: sk-proj-AbCdEf123456", "sk-proj-AbCdEf123456"),
    ],
)
def test_secrets_never_survive(text, leaked):
    out = redact(text)
    assert leaked not in out and MASK in out


def test_named_secrets_and_ordinary_text():
    assert redact("the key is hunter2-long", secrets=["hunter2-long", None, "x"]) == f"the key is {MASK}"
    plain = "host http://127.0.0.1:8000/v1 timed out after 60 s (key: see docs)"
    assert redact("host http://127.0.0.1:8000/v1 timed out after 60 s") == "host http://127.0.0.1:8000/v1 timed out after 60 s"
    assert "127.0.0.1:8000" in redact(plain)
    assert redact_url("http://u:p@h:1/v1?token=t0k&model=m") == f"http://{MASK}@h:1/v1?token={MASK}&model=m"


def test_hints_that_name_a_variable_stay_readable():
    hint = "answered HTTP 401: denied (no API key: $MY_KEY_ENV is not set)"
    assert redact(hint) == hint
