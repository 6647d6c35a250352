"""The gateway answers requests built exactly as Immich's server builds them (reference/immich.md §1, §7)."""
from __future__ import annotations

import io
import json
import zlib

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from cnai.settings import Settings
from cnai.wiring import build_gateway, build_pool
from gateway.app import Gateway, GatewayConfig
from tests.conftest import render_text

OCR_ENTRIES = {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
                       "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}}}}


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def immich_form(entries, image: bytes | None = None, text: str | None = None) -> aiohttp.FormData:
    """Like the server's FormData: entries = JSON.stringify(request), image = a bare Blob, text = the query."""
    form = aiohttp.FormData()
    form.add_field("entries", entries if isinstance(entries, str) else json.dumps(entries))
    if image is not None:
        form.add_field("image", image, filename="blob", content_type="application/octet-stream")
    if text is not None:
        form.add_field("text", text)
    return form


@pytest.fixture(scope="module")
def gateway_settings(tmp_path_factory) -> Settings:
    settings = Settings()
    settings.models_dir = tmp_path_factory.mktemp("models")  # no CLIP/face models here
    settings.upstream_ml_url = ""
    return settings


@pytest_asyncio.fixture(scope="module")
async def gateway_pool(gateway_settings):
    pool = build_pool(gateway_settings)
    await pool.preload(["ocr"])
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module")
async def client(gateway_pool, gateway_settings):
    async with TestClient(TestServer(build_gateway(gateway_pool, gateway_settings).app())) as c:
        yield c


async def test_root_and_ping(client):
    r = await client.get("/")
    assert r.status == 200 and await r.json() == {"message": "Immich ML"}
    r = await client.get("/ping")
    assert r.status == 200 and await r.text() == "pong" and r.content_type == "text/plain"


async def test_ocr_in_immich_shape(client):
    img = render_text(["增值税发票", "Total 128"], width=800)
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, jpeg(img)))
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["imageWidth"] == img.width and body["imageHeight"] == img.height
    ocr = body["ocr"]
    assert set(ocr) == {"text", "box", "boxScore", "textScore"}
    n = len(ocr["text"])
    assert n >= 2 and len(ocr["box"]) == 8 * n and len(ocr["boxScore"]) == n and len(ocr["textScore"]) == n
    assert all(0.0 <= v <= 1.0 for v in ocr["box"])            # normalised
    assert all(s > 0.8 for s in ocr["textScore"])              # recognition minScore honoured
    assert all(0.5 <= s <= 1.0 for s in ocr["boxScore"])       # detection minScore honoured
    assert "发票" in "".join(ocr["text"])
    # reading order: first line above the second
    assert ocr["box"][1] < ocr["box"][8 + 1]
    # corners clockwise from top-left: x2 > x1, y4 > y1
    assert ocr["box"][2] > ocr["box"][0] and ocr["box"][7] > ocr["box"][1]


async def test_ocr_min_score_filters(client):
    img = render_text(["增值税发票"], width=600)
    strict = {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5}},
                      "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 1.0}}}}
    r = await client.post("/predict", data=immich_form(strict, jpeg(img)))
    assert r.status == 200
    assert (await r.json())["ocr"] == {"text": [], "box": [], "boxScore": [], "textScore": []}


async def test_max_resolution_never_upscales_and_keeps_normalised_boxes(client):
    img = render_text(["海边日落"], size=40, width=500)
    data = jpeg(img)

    async def ocr_at(max_resolution: int) -> dict:
        entries = json.loads(json.dumps(OCR_ENTRIES))
        entries["ocr"]["detection"]["options"]["maxResolution"] = max_resolution
        r = await client.post("/predict", data=immich_form(entries, data))
        body = await r.json()
        assert r.status == 200 and (body["imageWidth"], body["imageHeight"]) == img.size
        assert all(0 <= v <= 1 for v in body["ocr"]["box"])
        return body["ocr"]

    as_is = await ocr_at(min(img.size))  # the shorter side exactly: the detector sees the image unchanged
    assert "日落" in "".join(as_is["text"])
    # a larger maxResolution changes nothing; an upscaled input would move the boxes and scores
    assert await ocr_at(2000) == as_is
    # a smaller one does downscale (same text, boxes measured on a different image), still normalised
    smaller = await ocr_at(min(img.size) * 2 // 3)
    assert smaller["box"] != as_is["box"] and len(smaller["box"]) == 8 * len(smaller["text"])


@pytest.mark.parametrize("entries", ["not json", "[]", '{"ocr": 1}', '{"ocr": {"detection": {"options": {}}}}',
                                     '{"ocr": {"detection": {"modelName": 5}}}'])
async def test_malformed_entries_get_422(client, entries):
    r = await client.post("/predict", data=immich_form(entries, jpeg(render_text(["x"]))))
    assert r.status == 422
    assert (await r.json())["detail"] == "Invalid request format."


async def test_missing_entries_get_422(client):
    form = aiohttp.FormData()
    form.add_field("text", "hello")
    r = await client.post("/predict", data=form)
    assert r.status == 422
    assert (await r.json())["detail"][0]["loc"] == ["body", "entries"]


@pytest.mark.parametrize("size", [(0, 100), (100, 0), (0, 0)])
async def test_zero_size_image_gets_400(client, size):
    # PIL cannot write a 0-sized image: patch the size fields of real PNG and JPEG files
    w, h = size
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), "white").save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = w.to_bytes(4, "big") + h.to_bytes(4, "big")
    jpg = bytearray(jpeg(Image.new("RGB", (100, 100), "white")))
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    for data in (bytes(png), bytes(jpg)):
        r = await client.post("/predict", data=immich_form(OCR_ENTRIES, data))
        assert r.status == 400
        assert (await r.json())["detail"] == "Image has zero width or height"


async def test_no_image_no_text_gets_400(client):
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES))
    assert r.status == 400
    assert (await r.json())["detail"] == "Either image or text must be provided"


async def test_corrupt_image_gets_400_with_reason(client):
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, b"\xff\xd8\xff garbage"))
    assert r.status == 400
    assert "image" in (await r.json())["detail"]


async def test_unknown_clip_model_without_upstream_is_a_clear_400(client):
    entries = {"clip": {"textual": {"modelName": "nllb-clip-large-siglip__v1"}}}
    r = await client.post("/predict", data=immich_form(entries, text="海边"))
    assert r.status == 400
    assert "CNAI_UPSTREAM_ML_URL" in (await r.json())["detail"]


async def test_missing_clip_model_names_the_file(client):
    entries = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "zh-CN"}}}}
    r = await client.post("/predict", data=immich_form(entries, text="海边日落"))
    assert r.status == 500
    detail = (await r.json())["detail"]
    assert "model file not found" in detail and "ViT-B-16" in detail and "import-clip" in detail


# --- bad input from outside: body size and fields --------------------------------------------------------------

MB = 1_000_000


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class peak_rss_growth:
    """How far this process's resident memory rose above its starting point inside the block, in MB (the kernel's
    high-water mark, reset on entry): memory, not time."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
        self.start_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mb = (_status_kb("VmHWM") - self.start_kb) / 1024
        return False


async def streamed_form(boundary: str, fields: list[tuple[str, bytes | int, str | None]]):
    """A multipart body sent in chunks with no Content-Length; an int field is that many zero bytes, generated as
    it goes, so the test itself holds no large body."""
    zeros = bytes(MB)
    for name, content, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        yield f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        if isinstance(content, int):
            for offset in range(0, content, MB):
                yield zeros[: min(MB, content - offset)]
        else:
            yield content
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


async def post_streamed(client, fields):
    boundary = "cnai-test-boundary"
    return await client.post("/predict", data=streamed_form(boundary, fields),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


async def test_body_over_the_total_limit_is_413_without_buffering_it(client):
    # each field is under 64 MiB; together they are not
    entries = json.dumps(OCR_ENTRIES).encode()
    with peak_rss_growth() as rss:
        r = await post_streamed(client, [("entries", entries, None), ("image", 40 * MB, "blob"),
                                         ("text", 40 * MB, None), ("other", 40 * MB, None)])
        assert r.status == 413
        assert "limit" in (await r.json())["detail"]
    assert rss.mb < 100, f"grew {rss.mb:.0f} MB for a 120 MB body"


async def test_single_oversize_field_is_413_streamed_or_declared(client):
    with peak_rss_growth() as rss:
        r = await post_streamed(client, [("image", 70 * MB, "blob"), ("entries", json.dumps(OCR_ENTRIES).encode(),
                                                                      None)])
        assert r.status == 413 and "limit" in (await r.json())["detail"]
    assert rss.mb < 100, f"grew {rss.mb:.0f} MB for a 70 MB field"
    # with a Content-Length over the limit, nothing is read at all
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, bytes(70 * MB)))
    assert r.status == 413 and "limit" in (await r.json())["detail"]
    # the connection pool and the server are fine afterwards
    r = await client.get("/ping")
    assert r.status == 200


def _gateway_client(pool, **config) -> TestClient:
    return TestClient(TestServer(Gateway(pool, GatewayConfig(**config)).app()))


async def test_body_limit_is_a_gateway_setting(gateway_pool):
    async with _gateway_client(gateway_pool, max_body=1 * MB) as small:
        img = jpeg(render_text(["限额"], width=300))
        r = await small.post("/predict", data=immich_form(OCR_ENTRIES, img))
        assert r.status == 200
        r = await small.post("/predict", data=immich_form(OCR_ENTRIES, img + bytes(2 * MB)))
        assert r.status == 413
    with pytest.raises(ValueError, match="max_body"):
        GatewayConfig(max_body=0)


async def test_unknown_fields_are_ignored_duplicates_refused(client):
    img = jpeg(render_text(["多余字段"], width=500))
    form = immich_form(OCR_ENTRIES, img)
    form.add_field("unexpected", b"x" * 100_000, filename="junk")
    r = await client.post("/predict", data=form)
    assert r.status == 200 and "多余" in "".join((await r.json())["ocr"]["text"])
    form = immich_form(OCR_ENTRIES, img)
    form.add_field("image", img, filename="blob")
    r = await client.post("/predict", data=form)
    assert r.status == 400 and "more than once" in (await r.json())["detail"]
    r = await post_streamed(client, [(f"f{i}", b"", None) for i in range(100)])
    assert r.status == 400 and "too many form fields" in (await r.json())["detail"]


async def test_proxy_forwards_every_field_to_upstream(gateway_pool):
    received = []

    async def upstream_predict(request):
        form = await request.post()
        image = form.get("image")
        received.append({"entries": form.get("entries"), "text": form.get("text"),
                         "image": image.file.read() if image is not None else None,
                         "filename": getattr(image, "filename", None)})
        return web.json_response({"clip": "[1,2]"})

    upstream = web.Application()
    upstream.router.add_post("/predict", upstream_predict)
    async with TestServer(upstream) as upstream_server:
        url = str(upstream_server.make_url("/"))
        async with _gateway_client(gateway_pool, upstream_url=url) as gw:
            entries = {"clip": {"visual": {"modelName": "ViT-H-14-378-quickgelu__dfn5b"}}}
            img = jpeg(render_text(["转发"], width=200))
            r = await gw.post("/predict", data=immich_form(entries, img, text="海边"))
            assert r.status == 200 and await r.json() == {"clip": "[1,2]"}
            r = await gw.post("/predict", data=immich_form({"clip": {"textual": {"modelName": "nllb"}}},
                                                           text="日落"))
            assert r.status == 200
    assert received[0] == {"entries": json.dumps(entries), "text": "海边", "image": img, "filename": "blob"}
    assert received[1]["text"] == "日落" and received[1]["image"] is None


# --- images from outside: formats, truncation, decompression bombs ----------------------------------------------

def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of zeros: a few hundred KB that declares width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 10000])
async def test_png_bomb_is_400_and_memory_stays_flat(client, side):
    bomb = png_bomb(side, side)
    assert len(bomb) < 2 * MB
    with peak_rss_growth() as rss:
        r = await client.post("/predict", data=immich_form(OCR_ENTRIES, bomb))
        assert r.status == 400
        assert "megapixel limit" in (await r.json())["detail"]
    assert rss.mb < 100, f"grew {rss.mb:.0f} MB decoding a {side}x{side} PNG"


async def test_truncated_jpeg_is_400(client):
    data = jpeg(render_text(["截断"], width=600))
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, data[: len(data) // 2]))
    assert r.status == 400 and "truncated" in (await r.json())["detail"]


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
async def test_other_image_formats_are_a_clear_400(client, fmt):
    buf = io.BytesIO()
    render_text(["格式"], width=300).save(buf, fmt)
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, buf.getvalue()))
    assert r.status == 400
    detail = (await r.json())["detail"]
    assert f"unsupported image format {fmt}" in detail and "JPEG, PNG, WebP" in detail


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
async def test_png_and_webp_previews_are_read(client, fmt):
    img = render_text(["预览格式"], width=500)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "WEBP" else {}))
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, buf.getvalue()))
    assert r.status == 200
    body = await r.json()
    assert (body["imageWidth"], body["imageHeight"]) == img.size and "预览" in "".join(body["ocr"]["text"])
