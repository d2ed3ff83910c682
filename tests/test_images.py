"""The image boundary: every accepted form, every refusal with a typed error."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from visguard import GuardRequest, ImageInputError, ImageLimits, InputError, load_image, load_images


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_every_supported_form_gives_the_same_rgb_pixels(tmp_path):
    img = Image.new("RGB", (10, 6), (12, 34, 56))
    data = _png(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    forms = [
        str(path),
        path,
        data,
        img,
        url,
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image", "base64": base64.b64encode(data).decode(), "mime_type": "image/png"},
        {"type": "image", "source_type": "base64", "data": base64.b64encode(data).decode()},
    ]
    for form in forms:
        gi = load_image(form)
        assert gi.image.mode == "RGB" and gi.size == (10, 6), form
        assert gi.image.getpixel((3, 3)) == (12, 34, 56)
        assert len(gi.sha256) == 64
    # Encoded forms of the same bytes hash the same.
    assert load_image(data).sha256 == load_image(str(path)).sha256 == load_image(url).sha256


def test_transparency_and_palette_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).image.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 3)
    assert load_image(pal).image.mode == "RGB"
    gray = Image.new("L", (4, 4), 7)
    assert load_image(_png(gray)).image.getpixel((1, 1)) == (7, 7, 7)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"", "empty"),
        (b"not an image at all", "undecodable"),
        (12345, "unsupported_type"),
        ("/no/such/file.png", "not_found"),
        ("data:text/plain;base64,aGk=", "bad_url"),
        ("data:image/png;base64,@@@", "bad_url"),
        ("data:image/png,rawdata", "bad_url"),
        ({"type": "image_url", "image_url": {}}, "bad_part"),
        ({"type": "audio", "data": "x"}, "bad_part"),
        ({"type": "image"}, "bad_part"),
        ("https://example.com/cat.png", "remote_refused"),
    ],
)
def test_refusals_are_typed_and_name_the_problem(bad, reason):
    with pytest.raises(ImageInputError) as err:
        load_image(bad, index=2)
    assert err.value.reason == reason
    assert str(err.value).startswith("image 2: ")
    assert isinstance(err.value, ValueError)


def test_limits_pixels_bytes_count():
    big = Image.new("RGB", (100, 100))
    with pytest.raises(ImageInputError, match="exceeds the limit") as err:
        load_image(big, ImageLimits(max_pixels=99 * 100))
    assert err.value.reason == "too_large"
    with pytest.raises(ImageInputError, match="bytes exceeds") as err:
        load_image(_png(big), ImageLimits(max_bytes=10))
    with pytest.raises(ImageInputError, match="at most 2") as err:
        load_images([big, big, big], ImageLimits(max_images=2))
    assert err.value.reason == "too_many"


def test_decompression_bomb_refused_before_decoding():
    # A tiny PNG whose header claims 30000 x 30000 pixels: refused from the header, never decoded.
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    assert len(bomb) < 200
    with pytest.raises(ImageInputError) as err:
        load_image(bomb)
    assert err.value.reason == "too_large"


def test_disallowed_format_refused():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PPM")
    with pytest.raises(ImageInputError) as err:
        load_image(buf.getvalue())
    assert err.value.reason in {"bad_format", "undecodable"}


def test_single_image_and_none_are_accepted():
    img = Image.new("RGB", (4, 4))
    assert len(load_images(img)) == 1
    assert load_images(None) == []


def test_request_build_validates_text_and_response():
    req = GuardRequest.build(None, "hi")
    assert req.stage == "input" and req.images == ()
    assert GuardRequest.build(None, "hi", "answer").stage == "output"
    with pytest.raises(InputError, match="text must be a string"):
        GuardRequest.build(None, 123)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="response must be a string"):
        GuardRequest.build(None, "hi", b"x")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="^text has 40000 characters, more than the limit of 32000$"):
        GuardRequest.build(None, "x" * 40_000)


def test_data_url_round_trip():
    gi = load_image(Image.new("RGB", (5, 5), (1, 2, 3)))
    again = load_image(gi.to_data_url())
    assert again.image.getpixel((2, 2)) == (1, 2, 3)
