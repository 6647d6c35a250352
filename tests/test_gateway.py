"""The gateway answers requests built exactly as Immich's server builds them (reference/immich.md §1, §7)."""
from __future__ import annotations

import io
import json

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from cnai.settings import Settings
from cnai.wiring import build_gateway, build_pool
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


@pytest_asyncio.fixture(scope="module")
async def client(tmp_path_factory):
    settings = Settings()
    settings.models_dir = tmp_path_factory.mktemp("models")  # no CLIP/face models here
    settings.upstream_ml_url = ""
    pool = build_pool(settings)
    await pool.preload(["ocr"])
    server = TestServer(build_gateway(pool, settings).app())
    async with TestClient(server) as c:
        yield c
    await pool.close()


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
