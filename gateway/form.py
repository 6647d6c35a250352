"""Reading `/predict`'s form with one bound on the whole body.

aiohttp's own `request.post()` bounds each field, not the request, on some of the versions this project allows;
here parts are read one by one, only the fields Immich ML takes (`entries`, `image`, `text`) are kept, anything else
is read past and dropped (as FastAPI ignores unknown form fields), and the body stops being read as soon as it
passes the limit.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import MultipartReader, web

from .protocol import RequestError

FIELDS = ("entries", "image", "text")
# Immich sends two or three parts; this only stops a body made of endless empty parts.
MAX_PARTS = 16
_CHUNK = 1 << 16


@dataclass
class PredictForm:
    entries: str | None = None
    text: str | None = None
    image: bytes | None = None
    image_filename: str | None = None
    image_content_type: str = "application/octet-stream"


def _too_large(max_body: int) -> RequestError:
    limit = f"{max_body / 2**20:g} MiB" if max_body % 2**20 == 0 else f"{max_body} bytes"
    return RequestError(413, f"request body is larger than the {limit} limit of /predict")


async def read_predict_form(request: web.Request, max_body: int) -> PredictForm:
    """The fields of a multipart or urlencoded body; an empty form for any other body (then `entries` is missing)."""
    if request.content_length is not None and request.content_length > max_body:
        raise _too_large(max_body)
    try:
        if request.content_type.startswith("multipart/"):
            return await _read_multipart(request, max_body)
        if request.content_type == "application/x-www-form-urlencoded":
            return await _read_urlencoded(request, max_body)
    except web.HTTPRequestEntityTooLarge:  # aiohttp's own per-part limit, where a version has one
        raise _too_large(max_body) from None
    except (ValueError, AssertionError) as e:  # how aiohttp's multipart parser reports a malformed body
        raise RequestError(400, f"could not read the multipart form: {e}") from None
    return PredictForm()


async def _read_multipart(request: web.Request, max_body: int) -> PredictForm:
    def check_size() -> None:
        # counts every byte of the body received so far (boundaries and part headers too), decompressed
        if request.content.total_bytes > max_body:
            raise _too_large(max_body)

    reader = await request.multipart()
    form = PredictForm()
    # chunks are joined once the whole body is known to fit: a body over the limit never costs a joined copy
    kept: dict[str, list[bytes]] = {}
    parts = 0
    while (part := await reader.next()) is not None:
        check_size()
        parts += 1
        if parts > MAX_PARTS:
            raise RequestError(400, f"too many form fields (more than {MAX_PARTS}); /predict takes "
                                    f"{', '.join(FIELDS)}")
        if isinstance(part, MultipartReader):
            raise RequestError(400, "nested multipart bodies are not accepted")
        name = part.name
        keep = name in FIELDS
        if keep and name in kept:
            raise RequestError(400, f"form field {name!r} was sent more than once")
        chunks: list[bytes] = []
        while chunk := await part.read_chunk(_CHUNK):
            check_size()
            if keep:
                chunks.append(chunk)
        if not keep:
            continue
        kept[name] = chunks
        if name == "image":
            form.image_filename = part.filename
            form.image_content_type = part.headers.get("Content-Type", form.image_content_type)
    check_size()
    if "image" in kept:
        form.image = b"".join(kept.pop("image"))
    for name, chunks in kept.items():
        setattr(form, name, b"".join(chunks).decode("utf-8", errors="replace"))
    return form


async def _read_urlencoded(request: web.Request, max_body: int) -> PredictForm:
    body = io.BytesIO()
    async for chunk in request.content.iter_chunked(_CHUNK):
        if body.tell() + len(chunk) > max_body:
            raise _too_large(max_body)
        body.write(chunk)
    form = PredictForm()
    seen: set[str] = set()
    for name, value in parse_qsl(body.getvalue().decode("utf-8", errors="replace"), keep_blank_values=True):
        if name not in FIELDS:
            continue
        if name in seen:
            raise RequestError(400, f"form field {name!r} was sent more than once")
        seen.add(name)
        if name == "image":
            form.image = value.encode()
        else:
            setattr(form, name, value)
    return form
