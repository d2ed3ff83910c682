"""The one image boundary: every image that enters visguard passes through here.

Accepted inputs: a file path (``str`` or ``os.PathLike``), raw encoded ``bytes``, a ``PIL.Image``,
a ``data:image/...;base64,`` URL, an OpenAI-style part (``{"type": "image_url", "image_url":
{"url": ...}}``, or the Responses API's ``{"type": "input_image", "image_url": ...}``), a LangChain
content block (``{"type": "image", "base64"|"url": ...}`` or the older ``source_type`` form
``{"type": "image", "source_type": "base64", "data": ...}``), an Anthropic-style block
(``{"type": "image", "source": {"type": "base64", "data": ...}}``) or a :class:`GuardImage`
(already checked). Images named only by a provider file id (``file_id``, ``source_type: "id"``)
are refused: the guard cannot see them. With ``ImageLimits(allow_paths=False)`` (the HTTP servers)
a path or ``file:`` URL is refused before the file system is touched. Everything becomes an RGB ``PIL.Image`` with its SHA-256 (of
the decoded pixels' source bytes) for audit logs and caches. Remote ``http(s)`` URLs are refused
unless the limits allow fetching. Anything else raises :class:`~visguard.core.errors.ImageInputError`
naming the image and the problem in one line.

Every accepted image is also made acceptable to every model: EXIF orientation is applied (the
guard sees the image as a viewer does), transparency is composited on white, and an image whose
sides differ by more than ``ImageLimits.max_aspect_ratio`` is padded with white along its short
side up to that ratio (refused when the padded image would exceed ``max_pixels``). Vision
processors refuse extreme shapes (Qwen2-VL: aspect ratio 200), so without this an attacker could
turn a valid image into a guard failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import itertools
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from visguard.core.errors import ImageInputError


class ImageLimits(BaseModel):
    """Limits applied at the image boundary (:func:`load_images`; a :class:`~visguard.core.policy.Policy` carries one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_images: int = Field(default=8, ge=0)
    max_pixels: int = Field(default=4096 * 4096, gt=0, description="width * height of one image")
    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="encoded size of one image")
    max_aspect_ratio: float = Field(
        default=100.0, ge=1.0, le=150.0,
        description="longer side / shorter side; a longer strip is padded with white up to this ratio "
        "(vision processors refuse extreme ratios, e.g. Qwen2-VL above 200)",
    )
    allow_remote: bool = Field(default=False, description="fetch http(s) URLs (off: refused)")
    allow_paths: bool = Field(
        default=True,
        description="read local image files (off, as in the HTTP servers: a path or file: URL is refused "
        "before the file system is touched, with one message whatever the path)",
    )
    remote_timeout_s: float = Field(default=10.0, gt=0)

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})

ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | Mapping[str, Any] | GuardImage"


@dataclass(frozen=True)
class GuardImage:
    """An image that passed the boundary: RGB pixels plus provenance for logs.

    Attributes:
        image: the RGB image.
        sha256: hex digest of the encoded bytes (or of the raw pixels for in-memory images).
        source: short description of where it came from (a path, ``"bytes"``, ``"data-url"`` ...).
    """

    image: Image.Image = field(repr=False)
    sha256: str
    source: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def to_data_url(self, fmt: str = "PNG") -> str:
        """Encode as a ``data:`` URL (how images travel to OpenAI-compatible servers)."""
        buf = io.BytesIO()
        self.image.save(buf, format=fmt)
        mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
        return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_image(item: ImageInput, limits: ImageLimits | None = None, *, index: int | None = None) -> GuardImage:
    """Turn one supported input into a :class:`GuardImage`.

    Args:
        item: the image in any supported form (see module docstring).
        limits: size and source limits (default: :class:`ImageLimits()`).
        index: the image's position in its request, used in error messages.

    Returns:
        The checked RGB image with its hash.

    Raises:
        ImageInputError: unsupported type, unreadable or oversized data, refused URL.
    """
    limits = limits or ImageLimits()
    if isinstance(item, GuardImage):
        _check_pixels(item.image.size, limits, index)
        _check_aspect(item.image.size, limits, index)
        return item
    if isinstance(item, Image.Image):
        _check_pixels(item.size, limits, index)
        try:
            rgb = _to_rgb(_upright(item))
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageInputError(f"cannot read PIL image: {_one_line(exc)}", index=index, reason="undecodable") from exc
        digest = hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()
        return GuardImage(_fit_aspect(rgb, limits, index), digest, "pil")
    if isinstance(item, bytes | bytearray | memoryview):
        return _decode(bytes(item), limits, index, "bytes")
    if isinstance(item, Mapping):
        return _from_part(item, limits, index)
    if isinstance(item, str) and item.startswith("data:"):
        return _decode(_data_url_bytes(item, index, limits), limits, index, "data-url")
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        return _fetch(item, limits, index)
    if isinstance(item, str | os.PathLike):
        if not limits.allow_paths:  # refused before any file-system access: the answer says nothing about files
            raise ImageInputError(
                "image source refused: send a data: URL"
                + (" or an http(s) URL" if limits.allow_remote else "")
                + " (file paths are not read here)",
                index=index,
                reason="path_refused",
            )
        return _from_path(Path(item), limits, index)
    raise ImageInputError(
        f"unsupported image type {type(item).__name__}; expected a path, bytes, PIL image, data URL "
        "or an image_url/image content part",
        index=index,
        reason="unsupported_type",
    )


def load_images(items: Iterable[ImageInput] | ImageInput | None, limits: ImageLimits | None = None) -> list[GuardImage]:
    """Load a request's images, enforcing the count limit first.

    A single image (not in a list) is accepted for convenience; ``None`` means no images.
    """
    limits = limits or ImageLimits()
    if items is None:
        return []
    if isinstance(items, str | bytes | bytearray | memoryview | os.PathLike | Image.Image | Mapping | GuardImage) or not isinstance(
        items, Iterable
    ):
        items = [items]  # one image (an unsupported one is refused by load_image with its type named)
    items = list(itertools.islice(items, limits.max_images + 1))  # an endless iterator is not read to the end
    if len(items) > limits.max_images:
        raise ImageInputError(
            f"more than {limits.max_images} images given; the policy allows at most {limits.max_images}",
            reason="too_many",
        )
    return [load_image(it, limits, index=i) for i, it in enumerate(items)]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency on white so hidden content under alpha is not silently revealed differently.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so the guard sees what a viewer sees."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
        return img
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def _check_aspect(size: tuple[int, int], limits: ImageLimits, index: int | None) -> None:
    w, h = size
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise ImageInputError(
            f"{w}x{h} has an aspect ratio above the limit of {limits.max_aspect_ratio:g}", index=index, reason="aspect_ratio"
        )


def _fit_aspect(img: Image.Image, limits: ImageLimits, index: int | None) -> Image.Image:
    """Pad an extreme strip with white up to ``max_aspect_ratio`` (refused if that needs too many pixels)."""
    w, h = img.size
    ratio = limits.max_aspect_ratio
    if max(w, h) / min(w, h) <= ratio:
        return img
    new = (w, math.ceil(w / ratio)) if w > h else (math.ceil(h / ratio), h)
    if new[0] * new[1] > limits.max_pixels:
        raise ImageInputError(
            f"{w}x{h} has an aspect ratio above {ratio:g} and padding it to {new[0]}x{new[1]} exceeds the limit of "
            f"{limits.max_pixels} pixels",
            index=index,
            reason="aspect_ratio",
        )
    canvas = Image.new("RGB", new, (255, 255, 255))
    canvas.paste(img, ((new[0] - w) // 2, (new[1] - h) // 2))
    return canvas


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line, without object reprs (``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the data", str(exc))
    return " ".join(text.split())[:300] or type(exc).__name__


def _check_pixels(size: tuple[int, int], limits: ImageLimits, index: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"empty image ({w}x{h})", index=index, reason="empty")
    if w * h > limits.max_pixels:
        raise ImageInputError(
            f"{w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels}", index=index, reason="too_large"
        )


def _decode(data: bytes, limits: ImageLimits, index: int | None, source: str) -> GuardImage:
    if not data:
        raise ImageInputError("no image data (0 bytes)", index=index, reason="empty")
    if len(data) > limits.max_bytes:
        raise ImageInputError(
            f"{len(data)} bytes exceeds the limit of {limits.max_bytes}", index=index, reason="too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if img.format not in ALLOWED_FORMATS:
                raise ImageInputError(
                    f"image format {img.format!r} is not accepted (allowed: {sorted(ALLOWED_FORMATS)})",
                    index=index,
                    reason="bad_format",
                )
            _check_pixels(img.size, limits, index)  # before decoding pixels: stops decompression bombs
            img.load()
            rgb = _to_rgb(_upright(img))
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"decompression bomb refused: {_one_line(exc)}", index=index, reason="too_large") from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(
            f"not a recognised image ({len(data)} bytes; accepted formats: {', '.join(sorted(ALLOWED_FORMATS))})",
            index=index,
            reason="undecodable",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageInputError(f"cannot decode image data: {_one_line(exc)}", index=index, reason="undecodable") from exc
    return GuardImage(_fit_aspect(rgb, limits, index), hashlib.sha256(data).hexdigest(), source)


def _data_url_bytes(url: str, index: int | None, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/"):
        raise ImageInputError("data URL must look like data:image/<type>;base64,<data>", index=index, reason="bad_url")
    if not header.endswith(";base64"):
        raise ImageInputError("only base64 data URLs are accepted", index=index, reason="bad_url")
    return _b64(payload, index, limits, "data URL", "bad_url")


def _b64(payload: str, index: int | None, limits: ImageLimits, what: str, reason: str) -> bytes:
    if len(payload) // 4 * 3 > limits.max_bytes + 3:  # checked before decoding: no huge allocations
        raise ImageInputError(
            f"{what} holds about {len(payload) // 4 * 3} bytes, more than the limit of {limits.max_bytes}",
            index=index,
            reason="too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(f"invalid base64 in {what}: {_one_line(exc)}", index=index, reason=reason) from exc


def _from_path(path: Path, limits: ImageLimits, index: int | None) -> GuardImage:
    shown = _one_line(ValueError(str(path)))[:200]
    try:
        if not path.exists():
            raise ImageInputError(f"no such image file: {shown}", index=index, reason="not_found")
        if not path.is_file():
            raise ImageInputError(f"not a regular file: {shown}", index=index, reason="not_found")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageInputError(f"{shown}: {size} bytes exceeds the limit of {limits.max_bytes}", index=index, reason="too_large")
        with path.open("rb") as fh:  # bounded read: /proc files report size 0 but may be long
            data = fh.read(limits.max_bytes + 1)
    except ImageInputError:
        raise
    except (OSError, ValueError) as exc:  # permission denied, name too long, embedded NUL ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
        raise ImageInputError(f"cannot read image file {shown}: {reason}", index=index, reason="unreadable") from exc
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"{shown}: more than {limits.max_bytes} bytes", index=index, reason="too_large")
    return _decode(data, limits, index, str(path))


def _from_part(part: Mapping[str, Any], limits: ImageLimits, index: int | None) -> GuardImage:
    kind = part.get("type")
    if kind in ("image_url", "input_image"):  # OpenAI chat content part / Responses API input image
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, Mapping) else inner
        if url is None and part.get("file_id") is not None:
            raise _unseen_file(part["file_id"], index)
        if not isinstance(url, str):
            raise ImageInputError(f"{kind} part has no url string", index=index, reason="bad_part")
        return load_image(url, limits, index=index)
    if kind == "image":  # LangChain standard block (v1 keys or v0 ``source_type``), or Anthropic's ``source``
        source = part.get("source")
        if isinstance(source, Mapping):
            if source.get("type") == "base64" and isinstance(source.get("data"), str):
                return _from_base64(source["data"], limits, index)
            if source.get("type") == "url" and isinstance(source.get("url"), str):
                return load_image(source["url"], limits, index=index)
            raise ImageInputError(f"image source of type {source.get('type')!r} is not accepted", index=index, reason="bad_part")
        for key in ("base64", "data"):
            if isinstance(part.get(key), str):
                return _from_base64(part[key], limits, index)
        if isinstance(part.get("url"), str):
            return load_image(part["url"], limits, index=index)
        if part.get("file_id") is not None or part.get("source_type") == "id":
            raise _unseen_file(part.get("file_id", part.get("id")), index)
        raise ImageInputError("image block needs 'base64', 'data' or 'url'", index=index, reason="bad_part")
    raise ImageInputError(f"unsupported content part type {kind!r}", index=index, reason="bad_part")


def _from_base64(payload: str, limits: ImageLimits, index: int | None) -> GuardImage:
    return _decode(_b64(payload, index, limits, "image block", "bad_part"), limits, index, "base64")


def _unseen_file(file_id: Any, index: int | None) -> ImageInputError:
    # A provider-side file cannot be checked here: refusing it keeps unseen pixels from passing as safe.
    return ImageInputError(
        f"image given by a provider file id ({file_id!r}) cannot be checked; send it as base64 or a data URL",
        index=index,
        reason="unresolvable",
    )


def _fetch(url: str, limits: ImageLimits, index: int | None) -> GuardImage:
    if not limits.allow_remote:
        raise ImageInputError(
            f"remote image URL refused ({url}); pass ImageLimits(allow_remote=True) to fetch",
            index=index,
            reason="remote_refused",
        )
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=True) as resp:
            resp.raise_for_status()
            buf = bytearray()
            for chunk in resp.iter_bytes():
                buf.extend(chunk)
                if len(buf) > limits.max_bytes:
                    raise ImageInputError(f"{url}: more than {limits.max_bytes} bytes", index=index, reason="too_large")
    except httpx.HTTPError as exc:
        raise ImageInputError(f"cannot fetch {url}: {exc}", index=index, reason="fetch_failed") from exc
    return _decode(bytes(buf), limits, index, url)
