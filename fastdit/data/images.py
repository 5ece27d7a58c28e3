"""Safe image decoding and the training crop shared by every image data kind.

Images in web-scale data sets are untrusted bytes: some are not images, some are truncated, some are
crafted so that a few kilobytes inflate into gigabytes of pixels (decompression bombs). Every image goes
through :func:`decode_image`, which reads only the header first and refuses an oversized picture *before*
any pixel is decoded; every failure is an :class:`ImageRejected` with a short, fixed ``reason`` that the
streaming loaders count as a skip (``skip_counts()`` keys).

:func:`to_training_array` then turns the RGB picture into the ``uint8 (3, S, S)`` tensor a batch holds:
short side resized to ``S``, centre crop, optional horizontal flip.
"""
from __future__ import annotations

import io
import zlib
from typing import Optional

import numpy as np
import torch
from PIL import Image

from fastdit.data.base import derive_seed

# Formats a training image may be in. Pillow can open many more (EPS, ICNS, PSD, ...); each extra decoder
# is extra attack surface for untrusted bytes, and none of them is a photo format web data sets use.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# The fixed reasons an image is rejected (skip-counter keys).
REASON_NOT_IMAGE = "not an image"
REASON_UNSUPPORTED_FORMAT = "unsupported format"
REASON_TOO_LARGE = "too large"
REASON_TOO_SMALL = "too small"
REASON_TRUNCATED = "truncated"
REASON_CORRUPT = "corrupt image"
REASON_UNSUPPORTED_MODE = "unsupported mode"


class ImageRejected(ValueError):
    """An image that cannot be used for training; ``reason`` is one of the short fixed ``REASON_*``
    strings of this module (the message may add details)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = 64_000_000, min_side: int = 1,
                 draft_size: Optional[int] = None) -> Image.Image:
    """Decode encoded image bytes into an RGB ``PIL.Image`` of the image's own size.

    The header is read first (``Image.open`` decodes no pixels) and a picture with
    ``width * height > max_pixels`` is refused as ``"too large"`` before decoding, whatever Pillow's global
    ``Image.MAX_IMAGE_PIXELS`` says (Pillow's own check still applies on top: it refuses pictures above
    twice its limit at ``Image.open``; that also becomes ``"too large"``). A side shorter than ``min_side``
    is ``"too small"``. Formats outside :data:`ALLOWED_FORMATS` are ``"unsupported format"``.

    ``draft_size`` (JPEG only): let the decoder scale down by 1/2, 1/4 or 1/8 while both sides stay at
    least ``draft_size``: several times faster for large photos that are resized to ``draft_size`` anyway.

    Transparent images are composited onto white (dropping alpha would expose whatever colour hides
    under transparent pixels); grayscale, palette and CMYK become RGB. Any Pillow failure becomes an
    :class:`ImageRejected`; nothing else escapes (except ``MemoryError``/``KeyboardInterrupt``).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image wants bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageRejected(REASON_NOT_IMAGE, "empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as err:
        raise ImageRejected(REASON_TOO_LARGE, str(err)) from None
    except Image.UnidentifiedImageError:
        # Either no image at all or a real format we do not accept; tell them apart for the counters.
        try:
            with Image.open(io.BytesIO(data)) as other:
                fmt = other.format
        except Exception:  # noqa: BLE001 - any failure here just means "not an image"
            fmt = None
        if fmt is not None:
            raise ImageRejected(REASON_UNSUPPORTED_FORMAT, fmt) from None
        raise ImageRejected(REASON_NOT_IMAGE) from None
    except Exception as err:  # noqa: BLE001 - a malformed header can raise almost anything
        raise ImageRejected(_reason_of(err), f"{type(err).__name__}: {err}") from None

    # The bytes live in a BytesIO, so there is no file handle to close; ``Image.close`` would destroy the
    # pixel data we are about to return.
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(REASON_TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels")
    if min(width, height) < max(1, min_side):
        raise ImageRejected(REASON_TOO_SMALL, f"{width}x{height}, need sides >= {min_side}")
    try:
        if draft_size is not None and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (int(draft_size), int(draft_size)))
        img.load()
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ...
        raise ImageRejected(_reason_of(err), f"{type(err).__name__}: {err}") from None
    try:
        return _to_rgb(img)
    except Exception as err:  # noqa: BLE001 - exotic modes (I;16B, F, ...) may not convert
        raise ImageRejected(REASON_UNSUPPORTED_MODE, f"{img.mode}: {err}") from None


_formats_cache: Optional[tuple] = None


def _allowed_formats() -> tuple:
    """:data:`ALLOWED_FORMATS` that this Pillow build has (``Image.open(formats=...)`` needs the plugins
    registered, which ``Image.init`` does once; it changes no setting)."""
    global _formats_cache
    if _formats_cache is None:
        Image.init()
        _formats_cache = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
    return _formats_cache


def _reason_of(err: BaseException) -> str:
    """``"truncated"`` for Pillow's ways of saying the data ends early, else ``"corrupt image"``."""
    text = str(err).lower()
    if isinstance(err, (OSError, EOFError)) and ("truncated" in text or "end of file" in text
                                                  or isinstance(err, EOFError)):
        return REASON_TRUNCATED
    return REASON_CORRUPT


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB; transparency composited onto white."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High-bit-depth grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        scaled = (arr * (255.0 / top)) if top > 255.0 else arr
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def to_training_array(img: Image.Image, size: int, *, flip: bool) -> torch.Tensor:
    """The training view of ``img``: ``uint8`` tensor of shape ``(3, size, size)`` (RGB, channels first).

    Equivalent to resizing the short side to ``size`` and cropping the centre ``size x size`` square, but
    done in one step: the centre square of the *source* is resized straight to ``size`` (``resize`` with a
    ``box``), so a panorama never becomes a huge intermediate image. Bicubic with ``reducing_gap=3``
    (a fast box reduction first when shrinking by more than 3x; visually the same as plain bicubic).
    ``flip=True`` mirrors left-right (the caller draws it from its own seeded generator).
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    width, height = img.size
    side = min(width, height)
    if side == size:
        # No scaling: a pure crop (whole-pixel offsets) is exact and far cheaper than resampling.
        left, top = (width - side) // 2, (height - side) // 2
        out = img if (width, height) == (size, size) else img.crop((left, top, left + side, top + side))
    else:
        left, top = (width - side) / 2.0, (height - side) / 2.0
        box = (left, top, left + side, top + side)
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # HWC -> CHW in numpy: single-threaded, where torch's parallel copy can be 10x slower on a busy host
    # (OpenMP threads spinning on shared cores). ascontiguousarray makes the writable copy.
    chw = np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(chw)


def training_image(data: bytes, size: int, *, flip: bool, max_pixels: int = 64_000_000,
                   min_side: int = 1) -> torch.Tensor:
    """Encoded bytes -> ``uint8 (3, size, size)``: :func:`decode_image` (JPEG decoded at reduced scale
    when the picture is much larger than ``size``) then :func:`to_training_array`. Raises
    :class:`ImageRejected`."""
    img = decode_image(data, max_pixels=max_pixels, min_side=min_side, draft_size=size)
    return to_training_array(img, size, flip=flip)


def seeded_flip(seed: int, name: str, *parts: int) -> bool:
    """A fair, reproducible coin for the horizontal flip of the sample called ``name`` (an item id plus
    position, a relative path, ...) in a given epoch: a hash of ``(seed, crc32(name), *parts)``, so it
    needs no RNG state and a resumed run flips exactly as the uninterrupted one."""
    return bool(derive_seed(seed, zlib.crc32(name.encode("utf-8")), *parts) & 1)
