"""Decoding images the way Immich ML does: PIL, converted to RGB, no EXIF transpose (previews are pre-rotated)."""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

# A decompression bomb is an error, not a warning: a 200-megapixel "preview" is not something to OCR.
Image.MAX_IMAGE_PIXELS = 120_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. Permanent: retrying will not help."""


def declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header of a PNG, GIF, BMP or JPEG, without decoding; None if unknown.

    PIL refuses to open an image that declares a zero dimension, so this is how such a file gets the precise
    "zero width or height" error rather than a generic one.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True))
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    size = declared_size(data)
    if size is not None and (size[0] == 0 or size[1] == 0):
        raise ImageDecodeError("image has zero width or height")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now, so truncated files fail here and not later in a model thread
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"not a readable image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e
    if img.width == 0 or img.height == 0:
        raise ImageDecodeError("image has zero width or height")
    return img.convert("RGB")
