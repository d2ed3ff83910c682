"""Property tests (hypothesis): the output parsers and the input boundary never raise untyped errors.

- Every registered guard format's ``parse`` takes any text and returns a ``ParsedOutput``:
  a label of ``safe`` / ``unsafe``, or ``None`` with an error. Through a guard, text that does not
  parse is an ``unavailable`` verdict, never ``safe``.
- The image boundary takes any bytes (random, and random corruptions of valid PNG / JPEG / GIF /
  WEBP / TIFF / BMP files), any data URL and any content-part mapping, and either returns an RGB
  image within the limits or raises ``ImageInputError``.
- The text boundary takes any string (lone surrogates included) and either builds a request or
  raises ``InputError`` with a one-line message.

The number of examples per property is ``PROPERTY_EXAMPLES`` (docs/guarantees.md quotes it).
"""

from __future__ import annotations

import base64
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visguard import (
    Guard,
    GuardRequest,
    ImageInputError,
    ImageLimits,
    InputError,
    Policy,
    load_image,
    plugins,
)
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.engine.backend import Backend, Generation
from visguard.engine.format import ParsedOutput

PROPERTY_EXAMPLES = 300
SETTINGS = settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
LIMITS = ImageLimits(max_pixels=512 * 512, max_bytes=256 * 1024)
POLICY = Policy()
FORMATS = sorted(plugins.registry("formats"))

# Text the parsers are likely to half-recognise, mixed with anything at all.
_WORDS = st.sampled_from([
    "Verdict:", "verdict", "Safe", "unsafe", "UNSAFE", "safe", "Category:", "none", "Violent", "S1", "S14",
    "Rating:", "Unsafe\nCategories:", "<think>", "</think>", "Answer:", "harmful", "unharmful", "Safety:",
    "Controversial", "{\"rating\": ", "\"Unsafe\"", "O1", "\n", " ", "**", "> ", "- ", ":", "=", "\u200b", "\ud800",
])
GUARD_TEXT = st.one_of(st.text(), st.lists(st.one_of(_WORDS, st.text(max_size=8)), max_size=30).map("".join))


@pytest.mark.parametrize("name", FORMATS)
@SETTINGS
@given(text=GUARD_TEXT)
def test_every_format_parses_any_text_without_raising(name, text):
    parsed = plugins.registry("formats")[name]().parse(text, POLICY)
    assert isinstance(parsed, ParsedOutput)
    assert parsed.label in (None, "safe", "unsafe")
    if parsed.label is None:
        assert parsed.error, "an unparsed output must say why"
    if parsed.verdict_offset is not None:
        assert 0 <= parsed.verdict_offset <= len(text)


class ScriptedBackend(Backend):
    """Generates the given text; scores are unavailable (reason mode only)."""

    name = "scripted"
    model_id = "scripted"

    def __init__(self) -> None:
        self.text = ""

    @property
    def supports_scores(self) -> bool:
        return False

    def score(self, prompts):  # pragma: no cover - reason mode only
        raise NotImplementedError

    def generate(self, prompts, *, max_new_tokens):
        return [Generation(text=self.text) for _ in prompts]


_SCRIPTED = ScriptedBackend()
_GUARD = Guard(_SCRIPTED, VisguardFormat(), Policy(mode="reason"))


@SETTINGS
@given(text=GUARD_TEXT)
def test_unparseable_output_is_unavailable_never_safe(text):
    _SCRIPTED.text = text
    verdict = _GUARD.check_input(None, "hello")
    parsed = _GUARD.format.parse(text, POLICY)
    if parsed.label is None:
        assert verdict.label == "unavailable" and verdict.error
    else:
        assert verdict.label == parsed.label
    assert verdict.raw == text


# ---------------------------------------------------------------------------------- image boundary


def _sample(fmt: str, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (24, 16), 120 if mode in ("L", "P") else (10, 120, 200)).save(buf, format=fmt, **kw)
    return buf.getvalue()


VALID = [_sample("PNG"), _sample("JPEG"), _sample("GIF", "P"), _sample("WEBP"), _sample("TIFF"), _sample("BMP"),
         _sample("PNG", "L")]


@st.composite
def corrupted(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=32))
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def _accepts_or_refuses(item) -> None:
    try:
        gi = load_image(item, LIMITS, index=0)
    except ImageInputError as exc:
        assert str(exc).startswith("image 0: ") and "\n" not in str(exc) and "object at 0x" not in str(exc)
        return
    assert gi.image.mode == "RGB"
    w, h = gi.size
    assert w * h <= LIMITS.max_pixels and max(w, h) / min(w, h) <= LIMITS.max_aspect_ratio
    assert len(gi.sha256) == 64


@SETTINGS
@given(data=st.one_of(st.binary(max_size=2048), corrupted()))
def test_any_bytes_become_an_image_or_an_image_input_error(data):
    _accepts_or_refuses(data)


@SETTINGS
@given(data=st.one_of(st.binary(max_size=512), corrupted()), mime=st.sampled_from(["png", "jpeg", "gif", "x"]),
       noise=st.text(max_size=6))
def test_any_data_url_becomes_an_image_or_an_image_input_error(data, mime, noise):
    _accepts_or_refuses(f"data:image/{mime};base64,{base64.b64encode(data).decode()}{noise}")


_PART_VALUES = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(max_size=12), st.binary(max_size=12),
              st.sampled_from(["image", "image_url", "input_image", "base64", "url", "data:image/png;base64,AAAA"])),
    lambda inner: st.dictionaries(st.sampled_from(["type", "image_url", "url", "base64", "data", "source",
                                                   "source_type", "file_id", "mime_type"]), inner, max_size=4),
    max_leaves=8,
)


@SETTINGS
@given(part=st.dictionaries(st.sampled_from(["type", "image_url", "url", "base64", "data", "source", "source_type",
                                             "file_id"]), _PART_VALUES, max_size=4))
def test_any_content_part_becomes_an_image_or_an_image_input_error(part):
    if isinstance(part.get("url"), str) and not part["url"].startswith("data:"):
        part["url"] = "data:" + part["url"]  # never read the test machine's files
    for key in ("image_url",):
        if isinstance(part.get(key), str) and not part[key].startswith("data:"):
            part[key] = "data:" + part[key]
    inner = part.get("image_url")
    if isinstance(inner, dict) and isinstance(inner.get("url"), str) and not inner["url"].startswith("data:"):
        inner["url"] = "data:" + inner["url"]
    source = part.get("source")
    if isinstance(source, dict) and isinstance(source.get("url"), str) and not source["url"].startswith("data:"):
        source["url"] = "data:" + source["url"]
    _accepts_or_refuses(part)


# ---------------------------------------------------------------------------------- text boundary

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=64)


@SETTINGS
@given(text=ANY_TEXT, response=st.one_of(st.none(), ANY_TEXT), role=st.sampled_from(["user", "assistant", "x"]))
def test_any_text_builds_a_request_or_an_input_error(text, response, role):
    try:
        req = GuardRequest.build(None, text, response, conversation=[{"role": role, "content": text}])
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    req.text.encode("utf-8")  # whatever was accepted is valid Unicode
    assert role != "x"
