"""A minimal guard format: one question, a one-word rating after ``Rating:``."""

from __future__ import annotations

import re
from collections.abc import Iterable

from visguard import Capabilities, GuardFormat, GuardPrompt, GuardRequest, ParsedOutput, Policy
from visguard.engine.format import neutralize

_QUOTE_TAGS = ("<request>", "</request>", "<response>", "</response>")


class OneWordFormat(GuardFormat):
    """Asks the guard to rate (images + text [+ response]) ``safe`` or ``unsafe`` in one word.

    Fast mode ends the prompt with ``Rating:`` so the backend scores the next token; reason mode
    lets the guard write a short reason first and reads the first ``Rating:`` line it generated
    (text after it, such as an echo of the request, never decides).
    The guard calls :meth:`GuardFormat.check_request` before it plans a check (the default
    :meth:`GuardFormat.plan`: one prompt from :meth:`build`, scored in fast mode, generated and read
    by :meth:`parse` in reason mode), so a request outside :attr:`capabilities` never gets here. It
    names no categories and has no training hooks (``target``, ...: the training plugin's
    ``TrainableFormat``), so ``visguard train`` refuses it by name.
    """

    name = "oneword"
    capabilities = Capabilities(categories=False, custom_categories=False)
    verdict_prefix = "Rating:"
    verdict_words = {"safe": (" safe", " Safe"), "unsafe": (" unsafe", " Unsafe")}

    def build(self, request: GuardRequest, policy: Policy, *, mode: str,
              special_tokens: Iterable[str] = ()) -> GuardPrompt:
        quoted = f"<request>{neutralize(request.text, special_tokens, _QUOTE_TAGS)}</request>"
        if request.response is not None:
            quoted += f"\n<response>{neutralize(request.response, special_tokens, _QUOTE_TAGS)}</response>"
        harms = ", ".join(c.name for c in policy.categories)
        instruction = (f"Is the request (and the response, if any) harmful given the images? Harms: {harms}. "
                       + ("End with 'Rating: safe' or 'Rating: unsafe'." if mode == "reason"
                          else "Answer with 'Rating: safe' or 'Rating: unsafe'."))
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": f"{quoted}\n{instruction}"}]
        return GuardPrompt(
            messages=[{"role": "user", "content": content}],
            images=[img.image for img in request.images],
            assistant_prefix=self.verdict_prefix if mode == "fast" else "",
            verdict_prefix=self.verdict_prefix,
            verdict_words=self.verdict_words,
            mode=mode,
        )

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        found = re.search(r"Rating:\s*(safe|unsafe)\b", text, re.IGNORECASE)
        if found is None:
            return ParsedOutput(label=None, error="no 'Rating: safe|unsafe' line")
        reasoning = text[: found.start()].strip() or None
        return ParsedOutput(label=found.group(1).lower(), reasoning=reasoning, verdict_offset=found.start(1))
