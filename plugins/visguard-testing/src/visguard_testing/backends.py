"""Rule-based guard backends for tests: verdicts with known scores, on the real guard format.

:class:`KeywordBackend` scores P(unsafe) = 1.0 when the checked text holds one of its keywords,
else 0.0, and records every (stage, checked text, score), so a test can see exactly what the
guard judged. It reads the prompts the ``visguard`` format builds.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from typing import Any

from visguard import Backend, Guard, Policy
from visguard.default_plugins.visguard_format import VisguardFormat

_RESPONSE = re.compile(r"<assistant_response>\n(.*)\n</assistant_response>", re.S)
_REQUEST = re.compile(r"<user_request>\n(.*)\n</user_request>", re.S)


class KeywordBackend(Backend):
    """A rule-based guard backend: P(unsafe) = 1.0 when the checked text has a keyword, else 0.0.

    Output checks look at the quoted assistant response only, input checks at the user request.
    Fast mode only.

    Attributes:
        seen: every ``(stage, checked text, score)``, in order.
        images_seen: per check, the SHA-256 of each image's RGB pixels, as the guard got them.
    """

    name = "keyword"

    def __init__(self, *keywords: str) -> None:
        self.keywords = keywords
        self.model_id = "keyword-guard"
        self.seen: list[tuple[str, str, float]] = []
        self.images_seen: list[list[str]] = []
        self._lock = threading.Lock()

    def score(self, prompts: Sequence[Any]) -> list[float]:
        out = []
        for prompt in prompts:
            text = prompt.messages[-1]["content"][-1]["text"]
            response = _RESPONSE.search(text)
            if response is not None:
                stage, checked = "output", response.group(1)
            else:
                stage, checked = "input", _REQUEST.search(text).group(1)
            score = 1.0 if any(k in checked for k in self.keywords) else 0.0
            with self._lock:
                self.seen.append((stage, checked, score))
                self.images_seen.append([pixel_sha256(img) for img in prompt.images])
            out.append(score)
        return out

    def generate(self, prompts: Sequence[Any], *, max_new_tokens: int) -> list[Any]:
        raise NotImplementedError("fast mode only")


def pixel_sha256(image: Any) -> str:
    """SHA-256 of an image's RGB pixels and size: equal exactly when two images look the same."""
    rgb = image.convert("RGB")
    return hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()


def keyword_guard(*keywords: str, policy: Policy | None = None) -> tuple[Guard, KeywordBackend]:
    """A guard on a fresh :class:`KeywordBackend` (returned too, to read what it judged)."""
    backend = KeywordBackend(*keywords)
    return Guard(backend, VisguardFormat(), policy or Policy()), backend
