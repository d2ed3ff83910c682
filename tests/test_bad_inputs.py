"""Bad-input corpus through all four channels: Python API, CLI, HTTP server and LangChain runnable.

Every case must end in a typed visguard error (CLI: exit 2 with one ``Error:`` line and no
traceback; server: a 4xx JSON error with a one-line message, never a 5xx) or in a valid verdict
(``safe`` / ``unsafe`` with a score). The guard is the real tiny Qwen2-VL checkpoint, so an input
that reaches the model goes through Qwen2-VL's real processor. ``on_error="allow"`` is set on
purpose: an input that turned into a backend failure would show up as ``unavailable`` here, which
this suite counts as a failure (it is the bypass of issue 10, item 4).

The case list is data (``CASES``); docs/guarantees.md quotes its size.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from visguard import Guard, Policy, VisguardError
from visguard.cli import cli
from visguard.integrations.langchain import GuardCheck
from visguard.integrations.openai.server.app import create_app

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

# ---------------------------------------------------------------------------------- building blocks


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif_header_bomb() -> bytes:
    return b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"," + b"\x00" * 9 + b"\x02\x02\x44\x01\x00;"


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.new("RGB", (80, 40), (10, 200, 10)), "JPEG", exif=exif)


def _multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (12, 12), (0, 0, i * 80)) for i in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def _text_chunk_bomb() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "A" * 20_000_000, zip=True)  # ~20 MB once inflated, a few KB stored
    return _encode(Image.new("RGB", (8, 8)), "PNG", pnginfo=info)


PNG = _encode(Image.new("RGB", (32, 24), (200, 40, 40)), "PNG")
JPEG = _encode(Image.new("RGB", (32, 24), (40, 200, 40)), "JPEG")
#: 4.4 megapixels: eight of them (35.3 MP) are over the server's request budget (2 x 4096 x 4096),
#: each within one image's limit (issue #24 item 10: eight 4096 px PNGs in a 625 KB request)
BIG = _encode(Image.new("RGB", (2100, 2100), (90, 90, 90)), "PNG")


@dataclass(frozen=True)
class Img:
    """One image of a case, as each channel would carry it."""

    kind: str  # "bytes" | "path" | "url" | "obj"
    value: Any
    ext: str = ".png"


@dataclass(frozen=True)
class Case:
    id: str
    images: tuple[Img, ...] | Any = ()
    text: Any = "what is in the picture?"
    response: Any = None
    conversation: Any = ()
    #: what must happen: "error" (typed refusal), "verdict" (safe/unsafe), or "either"
    expect: str = "either"


def b(data: bytes, ext: str = ".png") -> Img:
    return Img("bytes", data, ext)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _symlink(target: str) -> Callable[[Path], str]:
    """A symlink to ``target`` (a relative target is a valid PNG written next to it)."""

    def make(tmp: Path) -> str:
        link = tmp / f"link-to-{Path(target).name}"
        if not link.is_symlink():
            if not target.startswith("/"):
                (tmp / target).write_bytes(PNG)
            link.symlink_to(target if target.startswith("/") else tmp / target)
        return str(link)

    return make


CASES: list[Case] = [
    # ---- encoded image bytes
    Case("zero-byte", (b(b""),), expect="error"),
    Case("truncated-png", (b(PNG[: len(PNG) // 2]),), expect="error"),
    Case("truncated-jpeg", (b(JPEG[: len(JPEG) // 2], ".jpg"),), expect="either"),
    Case("garbage-bytes", (b(b"hello, I am not an image"),), expect="error"),
    Case("fake-gif-header", (b(b"GIF89a" + b"\xff" * 40, ".gif"),), expect="error"),
    Case("wrong-extension", (b(PNG, ".jpg"),), expect="verdict"),
    Case("png-header-bomb", (b(_png_header_bomb(30000, 30000)),), expect="error"),
    Case("gif-header-bomb", (b(_gif_header_bomb(), ".gif"),), expect="error"),
    Case("png-text-chunk-bomb", (b(_text_chunk_bomb()),), expect="either"),
    Case("one-pixel", (b(_encode(Image.new("RGB", (1, 1)), "PNG")),), expect="verdict"),
    Case("palette", (b(_encode(Image.new("P", (20, 20), 5), "PNG")),), expect="verdict"),
    Case("rgba-transparent", (b(_encode(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), "PNG")),), expect="verdict"),
    Case("gray-alpha", (b(_encode(Image.new("LA", (20, 20), (9, 100)), "PNG")),), expect="verdict"),
    Case("cmyk-jpeg", (b(_encode(Image.new("CMYK", (20, 20), (0, 50, 100, 0)), "JPEG"), ".jpg"),), expect="verdict"),
    Case("16-bit-png", (b(_encode(Image.new("I;16", (20, 20), 40000), "PNG")),), expect="verdict"),
    Case("float-tiff", (b(_encode(Image.new("F", (20, 20), 0.5), "TIFF"), ".tif"),), expect="verdict"),
    Case("animated-gif", (b(_animated("GIF"), ".gif"),), expect="verdict"),
    Case("animated-webp", (b(_animated("WEBP"), ".webp"),), expect="verdict"),
    Case("multipage-tiff", (b(_multipage_tiff(), ".tif"),), expect="verdict"),
    Case("bmp", (b(_encode(Image.new("RGB", (9, 7), (1, 2, 3)), "BMP"), ".bmp"),), expect="verdict"),
    Case("exif-rotated-jpeg", (b(_exif_rotated(), ".jpg"),), expect="verdict"),
    Case("ppm-not-accepted", (b(_encode(Image.new("RGB", (4, 4)), "PPM"), ".ppm"),), expect="error"),
    Case("svg-not-accepted", (b(b'<svg xmlns="http://www.w3.org/2000/svg"/>', ".svg"),), expect="error"),
    Case("strip-30000x10", (b(_encode(Image.new("RGB", (30000, 10), (250, 0, 0)), "PNG")),), expect="verdict"),
    Case("strip-10x30000", (b(_encode(Image.new("RGB", (10, 30000), (0, 0, 250)), "PNG")),), expect="verdict"),
    Case("strip-too-long-to-pad", (b(_encode(Image.new("L", (200_000, 1)), "PNG")),), expect="error"),
    Case("over-byte-limit", (b(b"\x89PNG\r\n\x1a\n" + os.urandom(21 * 1024 * 1024)),), expect="error"),
    # ---- paths (a server must not read its own files: refused or, until then, judged like any image)
    Case("missing-file", (Img("path", "/no/such/image.png"),), expect="error"),
    Case("directory", (Img("path", "/tmp"),), expect="error"),
    Case("symlink-to-image", (Img("path", _symlink("real.png")),), expect="either"),
    Case("dangling-symlink", (Img("path", _symlink("/no/such/target.png")),), expect="error"),
    Case("proc-file", (Img("path", "/proc/self/status"),), expect="error"),
    Case("dev-null", (Img("path", "/dev/null"),), expect="error"),
    Case("nul-in-path", (Img("path", "a\x00b.png"),), expect="error"),
    Case("very-long-path", (Img("path", "/" + "x" * 5000 + ".png"),), expect="error"),
    # ---- URLs
    Case("data-url-bad-base64", (Img("url", "data:image/png;base64,@@not-base64@@"),), expect="error"),
    Case("data-url-not-image", (Img("url", "data:text/plain;base64,aGVsbG8="),), expect="error"),
    Case("data-url-not-base64", (Img("url", "data:image/png,rawbytes"),), expect="error"),
    Case("data-url-oversized", (Img("url", "data:image/png;base64," + "A" * (28 * 1024 * 1024)),), expect="error"),
    Case("data-url-garbage-image", (Img("url", _data_url(b"not an image")),), expect="error"),
    Case("data-url-valid", (Img("url", _data_url(PNG)),), expect="verdict"),
    Case("remote-url-when-off", (Img("url", "http://127.0.0.1:9/cat.png"),), expect="error"),
    Case("file-url", (Img("url", "file:///etc/passwd"),), expect="error"),
    # ---- image counts
    Case("zero-images", (), expect="verdict"),
    Case("too-many-images", tuple(b(PNG) for _ in range(9)), expect="error"),
    # the server refuses it from the image headers (400); in-process channels judge it
    Case("eight-images-over-request-pixel-budget", tuple(b(BIG) for _ in range(8)), expect="either"),
    # ---- text
    Case("empty-text", (), text="", expect="verdict"),
    Case("text-over-limit", (), text="x" * 40_000, expect="error"),
    Case("text-at-char-limit", (), text="word " * 6_400, expect="either"),  # 6,401 tokens: over the tiny model's 4,096
    Case("text-within-context", (), text="word " * 600, expect="verdict"),
    Case("emoji-text-128k-tokens", (), text="\U0001F600" * 32_000, expect="error"),
    Case("cjk-conversation-96k-tokens", (), conversation=[{"role": "user", "content": "\u4e2d" * 31_000}], expect="error"),
    Case("control-characters", (), text="\x00\x01\x07\x1b[31mred\x7f\x9b", expect="verdict"),
    Case("lone-surrogate", (), text="abc\ud800def", expect="error"),
    Case("bidi-and-zero-width", (), text="\u202eevil\u202c \u200b\ufeff", expect="verdict"),
    Case("response-lone-surrogate", (), response="ok\udfff", expect="error"),
    Case("response-over-limit", (), response="y" * 40_000, expect="error"),
    Case("response-control-characters", (), response="ok\x00\r\nx-visguard-blocked: false\x1b[2J", expect="verdict"),
    Case("conversation-control-characters", (), conversation=[{"role": "user", "content": "\x00\x07\x1b]0;t\x07"}],
         expect="verdict"),
    # texts the redaction masked by mistake (#24 item 6): ordinary text, judged as given
    Case("text-key-equals-enter", (), text="press key=Enter to continue", expect="verdict"),
    Case("text-bearer-bonds", (), text="Are Bearer bonds still issued?", expect="verdict"),
    Case("text-sklearn-model-name", (), text="sk-learn-regressor-v2 predicts prices", expect="verdict"),
    Case("text-ring-bearer", (), text="the ring bearer Frodo, token=3 of 9", expect="verdict"),
    Case("conversation-bad-role", (), conversation=[{"role": "wizard", "content": "x"}], expect="error"),
    Case("conversation-not-a-list", (), conversation="earlier", expect="error"),
    # ---- wrong types
    Case("images-int", Img("obj", 5), expect="error"),
    Case("image-none", (Img("obj", None),), expect="error"),
    Case("image-audio-part", (Img("obj", {"type": "audio", "data": "x"}),), expect="error"),
    Case("image-url-part-without-url", (Img("obj", {"type": "image_url", "image_url": {}}),), expect="error"),
    Case("text-int", (), text=5, expect="error"),
]


# ---------------------------------------------------------------------------------- channels


@pytest.fixture(scope="module")
def guard(qwen_path):
    g = Guard.from_pretrained(qwen_path, device="cpu", policy=Policy(on_error="allow"))
    yield g
    g.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


def _value(img: Img, tmp: Path) -> Any:
    return img.value(tmp) if callable(img.value) else img.value


def _images(case: Case, tmp: Path, channel: str) -> Any:
    if isinstance(case.images, Img):  # not even a list
        return _one(case.images, tmp, channel, 0)
    return [_one(img, tmp, channel, i) for i, img in enumerate(case.images)]


def _one(img: Img, tmp: Path, channel: str, i: int) -> Any:
    value = _value(img, tmp)
    if img.kind == "bytes":
        if channel == "api":
            return value
        if channel == "cli":
            path = tmp / f"{abs(hash(value)) % 10**8}-{i}{img.ext}"
            path.write_bytes(value)
            return str(path)
        b64 = base64.b64encode(value).decode()
        if channel == "server":
            return f"data:image/{img.ext.lstrip('.')};base64," + b64
        return {"type": "image", "base64": b64}
    if img.kind == "url" and channel == "langchain":
        return {"type": "image_url", "image_url": {"url": value}}
    if channel == "cli":
        return str(value)
    return value


def _typed(exc: BaseException) -> bool:
    return isinstance(exc, VisguardError) and "\n" not in str(exc)


def _valid(verdict: Any) -> bool:
    return verdict.label in ("safe", "unsafe") and verdict.score is not None


def run_api(guard: Guard, case: Case, tmp: Path) -> str:
    extra = {"conversation": case.conversation} if case.conversation else {}
    try:
        if case.response is None:
            v = guard.check_input(_images(case, tmp, "api"), case.text, **extra)
        else:
            v = guard.check_output(_images(case, tmp, "api"), case.text, case.response, **extra)
    except Exception as exc:  # noqa: BLE001 - classified below
        assert _typed(exc), f"untyped or multi-line error: {type(exc).__name__}: {exc}"
        return "error"
    assert _valid(v), v
    return "verdict"


def run_cli(guard: Guard, case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # The model is loaded once for the module (loading is tested in test_guard.py / test_input_boundary.py).
    monkeypatch.setattr(Guard, "from_pretrained", classmethod(lambda cls, *a, **k: guard.with_policy(
        mode=k["policy"].mode, threshold=k["policy"].threshold)))
    images = _images(case, tmp, "cli")
    args = ["check", "--model", "tiny", "--json", "--text", str(case.text)]
    if case.response is not None:
        args += ["--response", case.response]
    if case.conversation:
        return "n/a"  # the CLI has no conversation option
    args += images if isinstance(images, list) else [images]
    res = CliRunner().invoke(cli, args)
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
        return "error"
    assert res.exit_code in (0, 1), (res.exit_code, res.output, res.exception)
    verdict = json.loads(res.stdout)
    assert verdict["label"] in ("safe", "unsafe") and verdict["score"] is not None, res.output
    return "verdict"


def run_server(client: TestClient, case: Case, tmp: Path) -> str:
    images = _images(case, tmp, "server")
    body: dict[str, Any] = {"images": images, "text": case.text}
    if case.response is not None:
        body["response"] = case.response
    if case.conversation:
        body["conversation"] = case.conversation
    resp = client.post("/v1/guard/check", content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        message = resp.json()["error"]["message"]
        assert "\n" not in message and "Traceback" not in message, message
        return "error"
    verdict = resp.json()
    assert verdict["label"] in ("safe", "unsafe") and verdict["score"] is not None, verdict
    return "verdict"


def run_langchain(guard: Guard, case: Case, tmp: Path) -> str:
    value: dict[str, Any] = {"images": _images(case, tmp, "langchain"), "text": case.text}
    if case.response is not None:
        value["response"] = case.response
    if case.conversation:
        value["conversation"] = case.conversation
    runnable = GuardCheck(guard=guard, stage="output" if case.response is not None else "input")
    try:
        v = runnable.invoke(value)
    except Exception as exc:  # noqa: BLE001 - classified below
        assert _typed(exc), f"untyped or multi-line error: {type(exc).__name__}: {exc}"
        return "error"
    assert _valid(v), v
    return "verdict"


#: case id -> channel -> outcome, filled by the test (printed by test_outcome_table)
OUTCOMES: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module")
def client(guard):
    return TestClient(create_app(guard))


def test_corpus_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_channel_ends_in_a_typed_error_or_a_valid_verdict(case, guard, client, files, monkeypatch):
    outcomes = {
        "api": run_api(guard, case, files),
        "cli": run_cli(guard, case, files, monkeypatch),
        "server": run_server(client, case, files),
        "langchain": run_langchain(guard, case, files),
    }
    OUTCOMES[case.id] = outcomes
    if isinstance(case.images, tuple) and any(img.kind == "path" for img in case.images):
        assert outcomes["server"] == "error", "an HTTP client must never make the server read its own files"
    if case.expect != "either":
        # The Python channels must agree with the case's expectation. (The CLI receives every
        # value as a string and the server every value as JSON, so a wrong *type* may become a
        # valid string there: `--text 5` is the text "5".)
        assert outcomes["api"] == outcomes["langchain"] == case.expect, outcomes
        for channel in ("cli", "server"):
            assert outcomes[channel] in (case.expect, "n/a") or case.id.endswith("-int") or case.id.startswith("image-"), (
                channel, outcomes)


def test_outcome_table():
    """Runs last in this module: prints the table docs/guarantees.md quotes (pytest -s)."""
    if len(OUTCOMES) < len(CASES):
        pytest.skip("run with the whole corpus")
    runs = [o for per in OUTCOMES.values() for o in per.values() if o != "n/a"]
    print(f"\nbad-input corpus: {len(CASES)} cases x 4 channels = {len(runs)} runs "
          f"({runs.count('error')} typed errors, {runs.count('verdict')} valid verdicts, 0 other outcomes)")
    for case_id, per in OUTCOMES.items():
        print(f"  {case_id:32} " + " ".join(f"{k}={v}" for k, v in per.items()))


# ---------------------------------------------------------------------------------- issue 24 cases


def test_the_server_refuses_images_over_its_request_pixel_budget(client):
    """``/v1/guard/check`` bounds the pixels of a whole request from the image headers (issue #24 item 10;
    before, only the chat, Responses and moderation endpoints did: eight large images were decoded)."""
    body = {"images": [_data_url(BIG)] * 8, "text": "what is in the pictures?"}
    r = client.post("/v1/guard/check", json=body)
    assert r.status_code == 400, r.text
    assert "pixels" in r.json()["error"]["message"] and r.json()["error"]["param"] == "images"
    parts = [{"type": "image_url", "image_url": {"url": _data_url(BIG)}}] * 8  # the same as OpenAI parts
    assert client.post("/v1/guard/check", json={**body, "images": parts}).status_code == 400


def test_a_guard_category_with_control_characters_is_served():
    """A guard that names a category with NUL, CR/LF and an escape sequence (issue #24 item 13): the
    answer arrives, its x-visguard-* headers are printable ASCII and the JSON keeps the category."""
    from visguard_testing.faults import FaultyBackend

    from visguard.engine.backend import Generation
    from visguard.plugins import get

    class Naming(FaultyBackend):
        def generate(self, prompts, *, max_new_tokens):  # type: ignore[no-untyped-def]
            return [Generation(text="Verdict: unsafe\nCategory: Viol\x00ent\r\nSet-Cookie: a=b\x1b[2J")] * len(prompts)

    guard = Guard(Naming("naming"), get("formats", "visguard")(), Policy(mode="reason"))
    app = create_app(guard, lambda images, text: "fine", settings=None)
    with TestClient(app) as http:
        chat = http.post("/v1/chat/completions", json={"model": app.state.model_name,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        check = http.post("/v1/guard/check", json={"text": "hi"})
    assert chat.status_code == 200 and check.status_code == 200, (chat.text, check.text)
    assert chat.json()["choices"][0]["finish_reason"] == "content_filter"
    for name, value in chat.headers.items():
        if name.startswith("x-visguard"):
            assert all(" " <= ch <= "~" for ch in value), (name, value)
    assert check.json()["label"] == "unsafe"
