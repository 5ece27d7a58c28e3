"""Safe decoding and the training crop (fastdit.data.images)."""
import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from fastdit.data.images import (ImageRejected, decode_image, seeded_flip, to_training_array,
                                 training_image)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (the IDAT holds almost nothing): a decompression bomb
    as far as the header is concerned."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_decode_jpeg_and_png_to_rgb():
    img = decode_image(encode(Image.new("RGB", (24, 16), (200, 10, 10)), "JPEG"))
    assert img.mode == "RGB" and img.size == (24, 16)
    gray = decode_image(encode(Image.new("L", (8, 8), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)


def test_transparent_pixels_become_white():
    img = decode_image(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"))
    assert img.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("data, reason", [
    (b"", "not an image"),
    (b"definitely not an image", "not an image"),
])
def test_garbage_is_rejected(data, reason):
    with pytest.raises(ImageRejected) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageRejected) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == "truncated"


def test_unsupported_format_is_rejected():
    with pytest.raises(ImageRejected) as err:
        decode_image(encode(Image.new("RGB", (16, 16)), "ICO"))
    assert err.value.reason == "unsupported format"


def test_decompression_bomb_refused_from_header(monkeypatch):
    bomb = png_with_header(50000, 50000)
    assert len(bomb) < 200
    # Pixels are never decoded: load() must not be reached for a refused header.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageRejected) as err:
        decode_image(bomb)
    assert err.value.reason == "too large"
    # Our limit holds even when Pillow's global one is switched off, and we do not change it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageRejected) as err:
        decode_image(bomb)
    assert err.value.reason == "too large"
    assert Image.MAX_IMAGE_PIXELS is None


def test_max_pixels_and_min_side():
    data = encode(Image.new("RGB", (40, 30)), "PNG")
    with pytest.raises(ImageRejected) as err:
        decode_image(data, max_pixels=1000)
    assert err.value.reason == "too large"
    with pytest.raises(ImageRejected) as err:
        decode_image(data, min_side=31)
    assert err.value.reason == "too small"
    assert decode_image(data, max_pixels=1200, min_side=30).size == (40, 30)


def test_to_training_array_center_crop_and_flip():
    # Left half red, right half blue, with a green band in the middle third horizontally.
    img = Image.new("RGB", (48, 24), (255, 0, 0))
    img.paste((0, 0, 255), (24, 0, 48, 24))
    out = to_training_array(img, 12, flip=False)
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 12)
    assert out[0, 6, 0] > 200 and out[2, 6, 11] > 200  # centre crop keeps red left, blue right
    flipped = to_training_array(img, 12, flip=True)
    assert torch.equal(flipped, out.flip(-1))


def test_to_training_array_tall_and_exact_sizes():
    tall = Image.new("RGB", (10, 300), (1, 2, 3))
    assert to_training_array(tall, 16, flip=False).shape == (3, 16, 16)
    same = Image.new("RGB", (16, 16), (9, 8, 7))
    assert to_training_array(same, 16, flip=False)[:, 0, 0].tolist() == [9, 8, 7]


def test_training_image_jpeg_draft_and_flip_coin():
    data = encode(Image.new("RGB", (512, 384), (0, 128, 0)), "JPEG")
    out = training_image(data, 32, flip=True)
    assert out.shape == (3, 32, 32) and abs(int(out[1, 16, 16]) - 128) < 4
    coins = [seeded_flip(3, "shard.tar", p, 0) for p in range(200)]
    assert coins == [seeded_flip(3, "shard.tar", p, 0) for p in range(200)]
    assert 60 < sum(coins) < 140
    assert coins != [seeded_flip(3, "shard.tar", p, 1) for p in range(200)]
