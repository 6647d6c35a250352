"""Decoding images the way Immich ML does: PIL, converted to RGB, no EXIF transpose (previews are pre-rotated).

Only the formats Immich writes previews in are decoded (JPEG, WebP; PNG for pasted screenshots and the standalone
folder), plus AVIF and HEIC where this Pillow can read them. Each image's size is checked from its header before
a single pixel is decoded, so a small file declaring a huge image is refused at the cost of reading its header.
Decoding runs in executor threads, so it changes no global state (warning filters, Pillow's limits) on the way.
"""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError, features
from PIL.JpegImagePlugin import JpegImageFile

from .cache import content_digest

# Previews are at most ~1440 px on a side (~2 megapixels); this leaves room for large originals in the standalone
# folder while a decoded image stays around 150 MB as RGB.
MAX_PIXELS = 50_000_000

# A JPEG whose longer side is over DRAFT_ABOVE is decoded at a reduced scale (1/2, 1/4 or 1/8, done by the JPEG
# decoder itself, aspect kept) whose longer side stays at least DRAFT_MIN_SIDE: more than any model looks at
# (CLIP 224, face detection 640, OCR's default 736 on the shorter side). Previews (<= ~1440 px) are never reduced:
# OCR and face boxes need their real size.
DRAFT_ABOVE = 4096
DRAFT_MIN_SIDE = 2048


def _accepted_formats() -> dict[str, tuple[str, ...]]:
    """Pillow format name -> file suffixes, for the formats decode_image accepts in this installation."""
    formats = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
    if features.check("avif"):
        formats["AVIF"] = (".avif",)
    try:
        import pillow_heif  # optional; not a dependency
    except ImportError:
        pass
    else:
        pillow_heif.register_heif_opener()
        formats["HEIF"] = (".heic", ".heif")
    return formats


_FORMATS = _accepted_formats()
ACCEPTED_FORMATS: tuple[str, ...] = tuple(_FORMATS)
# What a folder of photos should pick up: exactly the files decode_image can read.
DECODABLE_SUFFIXES: frozenset[str] = frozenset(s for suffixes in _FORMATS.values() for s in suffixes)
_ACCEPTED_TEXT = ", ".join("WebP" if f == "WEBP" else f for f in ACCEPTED_FORMATS)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. Permanent: retrying will not help.

    The message starts with a stable reason (the same for every file with this problem, so failures group by
    it); details that differ per file follow after DETAIL_SEPARATOR."""


DETAIL_SEPARATOR = " — "


def _sniff_format(data: bytes) -> str | None:
    """The format a file's magic bytes announce (accepted or not), for a precise error; None if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    return None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header of a PNG, JPEG or WebP, without decoding; None if unknown.

    Read before PIL sees the file: PIL refuses a zero dimension with a generic error, and a huge declared size is
    refused here before any decoder allocates for it.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: two 14-bit fields, each size-1
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_size(width: int, height: int) -> None:
    if width == 0 or height == 0:
        raise ImageDecodeError("image has zero width or height")
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the "
                               f"{MAX_PIXELS // 1_000_000} megapixel limit")


def decode_image(data: bytes) -> Image.Image:
    img = _open_checked(data)
    try:
        img.load()  # decode now, so truncated files fail here and not later in a model thread
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image{DETAIL_SEPARATOR}{e}") from e
    return img.convert("RGB")


def decoded_size(data: bytes) -> tuple[int, int]:
    """The (width, height) decode_image's image has, from the file's header alone (no pixel is decoded)."""
    return _open_checked(data).size


def _open_checked(data: bytes) -> Image.Image:
    """The image opened from its header, checked, and set to decode at the scale decode_image uses."""
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    fmt = _sniff_format(data)
    if fmt is not None and fmt not in ACCEPTED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {fmt} (accepted: {_ACCEPTED_TEXT})")
    size = declared_size(data)
    if size is not None:
        _check_size(*size)
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # reads the header only
    except UnidentifiedImageError as e:
        # Pillow's text names an in-memory buffer by its address: nothing a person can use
        raise ImageDecodeError(f"not a readable image ({_ACCEPTED_TEXT} accepted)") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large{DETAIL_SEPARATOR}{e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image{DETAIL_SEPARATOR}{e}") from e
    _check_size(*img.size)  # formats whose header declared_size does not read
    if isinstance(img, JpegImageFile) and max(img.size) > DRAFT_ABOVE:
        k = DRAFT_MIN_SIDE / max(img.size)
        img.draft("RGB", (max(1, round(img.width * k)), max(1, round(img.height * k))))
    return img


def decode_with_digest(data: bytes) -> tuple[Image.Image, str]:
    """The image, and the pool's name for its content (see ModelPool.run): a digest of the bytes as stored."""
    return decode_image(data), content_digest(data)
