"""Reading a form body with one bound on the whole body: `/predict`'s, and MT Photos' uploads.

aiohttp's own `request.post()` bounds each field, not the request, on some of the versions this project allows;
here parts are read one by one, only the fields an endpoint takes are kept, anything else is read past and dropped
(as FastAPI ignores unknown form fields), and the body stops being read as soon as it passes the limit.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import MultipartReader, web

from .protocol import RequestError

FIELDS = ("entries", "image", "text")  # what /predict takes, as Immich ML does
# Immich sends two or three parts, MT Photos one; this only stops a body made of endless empty parts.
MAX_PARTS = 16
_CHUNK = 1 << 16


@dataclass
class FormField:
    value: bytes
    filename: str | None = None
    content_type: str | None = None  # a multipart part's own Content-Type, if it sent one


@dataclass
class PredictForm:
    entries: str | None = None
    text: str | None = None
    image: bytes | None = None
    image_filename: str | None = None
    image_content_type: str = "application/octet-stream"


def too_large(max_body: int, path: str) -> RequestError:
    limit = f"{max_body / 2**20:g} MiB" if max_body % 2**20 == 0 else f"{max_body} bytes"
    return RequestError(413, f"request body is larger than the {limit} limit of {path}")


async def read_form(request: web.Request, fields: tuple[str, ...], max_body: int,
                    urlencoded: bool = True) -> dict[str, FormField]:
    """The `fields` a multipart body (or, with `urlencoded`, an urlencoded one) holds, reading at most `max_body`
    bytes of it; no fields for any other body. RequestError: 413 past the limit, 400 for a malformed body, nested
    multipart, too many parts or a wanted field sent twice."""
    if request.content_length is not None and request.content_length > max_body:
        raise too_large(max_body, request.path)
    try:
        if request.content_type.startswith("multipart/"):
            return await _read_multipart(request, fields, max_body)
        if urlencoded and request.content_type == "application/x-www-form-urlencoded":
            return await _read_urlencoded(request, fields, max_body)
    except web.HTTPRequestEntityTooLarge:  # aiohttp's own per-part limit, where a version has one
        raise too_large(max_body, request.path) from None
    except (ValueError, AssertionError) as e:  # how aiohttp's multipart parser reports a malformed body
        raise RequestError(400, f"could not read the multipart form: {e}") from None
    return {}


async def read_predict_form(request: web.Request, max_body: int) -> PredictForm:
    """`/predict`'s fields; an empty form for a body that is not a form (then `entries` is missing)."""
    fields = await read_form(request, FIELDS, max_body)
    form = PredictForm()
    image = fields.pop("image", None)
    if image is not None:
        form.image = image.value
        form.image_filename = image.filename
        form.image_content_type = image.content_type or form.image_content_type
    for name, field in fields.items():
        setattr(form, name, field.value.decode("utf-8", errors="replace"))
    return form


async def _read_multipart(request: web.Request, fields: tuple[str, ...], max_body: int) -> dict[str, FormField]:
    def check_size() -> None:
        # counts every byte of the body received so far (boundaries and part headers too), decompressed
        if request.content.total_bytes > max_body:
            raise too_large(max_body, request.path)

    reader = await request.multipart()
    # chunks are joined once the whole body is known to fit: a body over the limit never costs a joined copy
    kept: dict[str, tuple[list[bytes], FormField]] = {}
    parts = 0
    while (part := await reader.next()) is not None:
        check_size()
        parts += 1
        if parts > MAX_PARTS:
            raise RequestError(400, f"too many form fields (more than {MAX_PARTS}); {request.path} takes "
                                    f"{', '.join(fields)}")
        if isinstance(part, MultipartReader):
            raise RequestError(400, "nested multipart bodies are not accepted")
        name = part.name
        keep = name in fields
        if keep and name in kept:
            raise RequestError(400, f"form field {name!r} was sent more than once")
        chunks: list[bytes] = []
        while chunk := await part.read_chunk(_CHUNK):
            check_size()
            if keep:
                chunks.append(chunk)
        if keep:
            kept[name] = chunks, FormField(b"", part.filename, part.headers.get("Content-Type"))
    check_size()
    found = {}
    for name, (chunks, field) in kept.items():
        field.value = b"".join(chunks)
        found[name] = field
    return found


async def _read_urlencoded(request: web.Request, fields: tuple[str, ...], max_body: int) -> dict[str, FormField]:
    body = io.BytesIO()
    async for chunk in request.content.iter_chunked(_CHUNK):
        if body.tell() + len(chunk) > max_body:
            raise too_large(max_body, request.path)
        body.write(chunk)
    found: dict[str, FormField] = {}
    for name, value in parse_qsl(body.getvalue().decode("utf-8", errors="replace"), keep_blank_values=True):
        if name not in fields:
            continue
        if name in found:
            raise RequestError(400, f"form field {name!r} was sent more than once")
        found[name] = FormField(value.encode())
    return found
