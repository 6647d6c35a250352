"""Image decoding for the gateway and the listener: accepted formats, sizes read from headers, reduced JPEG decoding."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.images import (ACCEPTED_FORMATS, DECODABLE_SUFFIXES, DRAFT_MIN_SIDE, MAX_PIXELS, ImageDecodeError,
                              declared_size, decode_image, decoded_size)
from inference.cache import content_digest
from listener.errors import PermanentJobError
from listener.worker import read_preview


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(size: tuple[int, int]) -> Image.Image:
    """Not a flat colour, so the encoders produce real image data."""
    return Image.linear_gradient("L").resize(size).convert("RGB")


@pytest.mark.parametrize("mode,kw", [("RGB", {}), ("RGBA", {}), ("RGB", {"lossless": True})])
def test_webp_size_is_read_from_its_header(mode, kw):
    # lossy (VP8), extended with alpha (VP8X), lossless (VP8L)
    data = encode(Image.new(mode, (1234, 567)), "WEBP", **kw)
    assert declared_size(data) == (1234, 567)


def test_huge_webp_is_refused_before_decoding():
    data = bytearray(encode(Image.new("RGBA", (64, 64)), "WEBP"))
    assert data[12:16] == b"VP8X"
    data[24:30] = (16000 - 1).to_bytes(3, "little") + (16000 - 1).to_bytes(3, "little")
    with pytest.raises(ImageDecodeError, match="16000x16000.*megapixel limit"):
        decode_image(bytes(data))


def test_every_accepted_format_decodes_and_has_its_suffixes():
    assert {".jpg", ".jpeg", ".png", ".webp"} <= DECODABLE_SUFFIXES
    assert not {".gif", ".bmp", ".tif", ".tiff"} & DECODABLE_SUFFIXES
    for fmt in ACCEPTED_FORMATS:
        if fmt == "HEIF":  # only with pillow-heif, which cannot write here
            continue
        img = decode_image(encode(gradient((300, 200)), fmt))
        assert (img.size, img.mode) == ((300, 200), "RGB"), fmt


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(encode(gradient((100, 80)), fmt))
    assert f"unsupported image format {fmt}" in str(e.value)
    assert "JPEG, PNG, WebP" in str(e.value)


def test_pixel_limit_is_checked_on_the_header():
    side = int(MAX_PIXELS ** 0.5) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")  # 1-bit: a small file for a large declared size
    with pytest.raises(ImageDecodeError, match="megapixel limit"):
        decode_image(buf.getvalue())


def test_big_jpeg_is_decoded_reduced_keeping_its_aspect():
    img = decode_image(encode(gradient((6000, 3000)), "JPEG", quality=80))
    assert img.size == (3000, 1500)           # the JPEG decoder's own 1/2 scale
    assert max(img.size) >= DRAFT_MIN_SIDE


@pytest.mark.parametrize("size", [(1440, 1080), (4096, 2304)])
def test_preview_sized_jpeg_keeps_its_real_size(size):
    # OCR boxes and face boxes are measured on the preview as it is
    assert decode_image(encode(gradient(size), "JPEG", quality=80)).size == size


def test_big_png_is_not_reduced():
    assert decode_image(encode(gradient((5000, 300)), "PNG")).size == (5000, 300)


@pytest.mark.parametrize("size, fmt", [((1440, 1080), "JPEG"), ((6000, 3000), "JPEG"), ((640, 480), "WEBP"),
                                       ((5000, 300), "PNG")])
def test_decoded_size_from_the_header_is_the_decoded_images(size, fmt):
    """Face boxes are measured on the decoded image (reduced for a big JPEG): a job answered from a shared result
    records that size without decoding."""
    data = encode(gradient(size), fmt)
    assert decoded_size(data) == decode_image(data).size


def test_truncated_jpeg_is_an_error():
    data = encode(gradient((800, 600)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_listener_reads_files_through_the_same_rules(tmp_path):
    good = tmp_path / "a.webp"
    good.write_bytes(encode(gradient((320, 240)), "WEBP"))
    preview = read_preview(good)
    assert preview.decode().size == (320, 240) and preview.digest == content_digest(good.read_bytes())
    gif = tmp_path / "b.jpg"  # the suffix does not matter, the bytes do
    gif.write_bytes(encode(gradient((32, 32)), "GIF"))
    with pytest.raises(PermanentJobError, match=f"unsupported image format GIF.*{gif.name}"):
        read_preview(gif).decode()
