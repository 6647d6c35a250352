"""Decoding images the way Immich ML does: PIL, converted to RGB, no EXIF transpose (previews are pre-rotated)."""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

# A decompression bomb is an error, not a warning: a 200-megapixel "preview" is not something to OCR.
Image.MAX_IMAGE_PIXELS = 120_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. Permanent: retrying will not help."""


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
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
