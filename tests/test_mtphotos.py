"""MT Photos' AI API, with requests shaped as MT Photos sends them (reference/seed.md §2): an `api-key` header, the
photo as a multipart field `file`, `/clip/txt` as JSON `{"text": ...}`. Real RapidOCR, tiny cn-clip and face models."""
from __future__ import annotations

import io
import json
import re

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from cnai.metrics import ServiceMetrics
from cnai.settings import Settings
from cnai.wiring import build_gateway, build_mtphotos, build_pool
from inference.clip import ClipTextual, ClipVisual
from tests.clip_fixtures import build_clip, sample_images, save_official, tiny_vit
from tests.conftest import render_text
from tests.face_fixtures import BLUE, canvas, face_models, install_buffalo_l  # noqa: F401  (fixture)

pytest.importorskip("cn_clip")

KEY = "mt_photos_ai_extra"
TWO_DECIMALS = re.compile(r"^-?\d+\.\d\d$")
SIXTEEN_DECIMALS = re.compile(r"^-?\d+\.\d{16}$")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def upload(data: bytes, field: str = "file", filename: str = "photo.jpg") -> aiohttp.FormData:
    """As MT Photos posts a photo: one multipart field `file` with the file's name and type."""
    form = aiohttp.FormData()
    form.add_field(field, data, filename=filename, content_type="image/jpeg")
    return form


HEADERS = {"api-key": KEY}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, face_models):  # noqa: F811
    from inference.clip.export import import_checkpoint
    work = tmp_path_factory.mktemp("mtphotos")
    tiny = tiny_vit(512)
    ckpt = save_official(build_clip(tiny, seed=5), work / "clip_cn_tiny.pt")
    import_checkpoint(ckpt, "ViT-B-16", work / "models", model_config=tiny)
    return install_buffalo_l(work / "models", face_models)


@pytest.fixture(scope="module")
def settings(models_dir) -> Settings:
    s = Settings()
    s.models_dir = models_dir
    s.clip_model = "ViT-B-16"
    s.upstream_ml_url = ""
    s.mtphotos_api_key = KEY
    return s


@pytest_asyncio.fixture(scope="module")
async def pool(settings):
    pool = build_pool(settings)
    errors = await pool.preload(["ocr", "clip-visual:ViT-B-16", "clip-textual:ViT-B-16", "face:buffalo_l"])
    assert not any(errors.values()), errors
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module")
async def metrics(pool):
    return ServiceMetrics(pool)


@pytest_asyncio.fixture(scope="module")
async def client(pool, settings, metrics):
    async with TestClient(TestServer(build_mtphotos(pool, settings, metrics).app())) as c:
        yield c


async def test_check_needs_the_key(client):
    r = await client.post("/check", headers=HEADERS)
    assert r.status == 200 and (await r.json())["result"] == "pass"
    for headers in ({}, {"api-key": "wrong"}, {"api-key": KEY + "x"}):
        r = await client.post("/check", headers=headers)
        assert r.status == 401 and await r.json() == {"detail": "Invalid API key"}


async def test_face_check_reports_the_face_model(client):
    r = await client.get("/face/check")
    assert r.status == 200
    body = await r.json()
    assert body["detector_backend"] == "insightface" and body["recognition_model"] == "buffalo_l"


async def test_restarts_are_answered_and_restart_nothing(client):
    r = await client.post("/restart", headers=HEADERS)
    assert r.status == 200 and await r.json() == {"result": "unsupported"}
    r = await client.post("/restart_v2", headers=HEADERS)
    assert r.status == 200 and await r.json() == {"result": "pass"}
    r = await client.post("/check", headers=HEADERS)  # still serving
    assert r.status == 200
    assert (await client.post("/restart_v2")).status == 401


async def test_ocr_in_mt_photos_shape_and_shared_with_immichs_gateway(client, pool, settings):
    img = render_text(["增值税发票", "Total 128"], width=800)
    data = jpeg(img)
    r = await client.post("/ocr", data=upload(data), headers=HEADERS)
    assert r.status == 200, await r.text()
    result = (await r.json())["result"]
    assert set(result) == {"texts", "scores", "boxes"}
    n = len(result["texts"])
    assert n >= 2 and len(result["scores"]) == n and len(result["boxes"]) == n
    assert "发票" in "".join(result["texts"])
    assert all(TWO_DECIMALS.match(s) and 0.8 < float(s) <= 1 for s in result["scores"])
    for box in result["boxes"]:
        assert set(box) == {"x", "y", "width", "height"} and all(TWO_DECIMALS.match(v) for v in box.values())
        x, y, w, h = (float(box[k]) for k in ("x", "y", "width", "height"))
        assert 0 <= x and 0 <= y and w > 10 and h > 10 and x + w <= img.width and y + h <= img.height
    assert float(result["boxes"][0]["y"]) < float(result["boxes"][1]["y"])  # reading order
    # the same photo through Immich's protocol is answered from the same computation
    hits = pool.stats()["ocr"].cache_hits
    form = aiohttp.FormData()
    form.add_field("entries", json.dumps({"ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}}}}))
    form.add_field("image", data, filename="blob", content_type="application/octet-stream")
    async with TestClient(TestServer(build_gateway(pool, settings).app())) as gateway:
        r = await gateway.post("/predict", data=form)
        assert r.status == 200
        immich = (await r.json())["ocr"]
    assert pool.stats()["ocr"].cache_hits == hits + 1
    assert immich["text"] == result["texts"]
    first = immich["box"][:8]
    assert float(result["boxes"][0]["x"]) == pytest.approx(min(first[0::2]) * img.width, abs=0.01)
    assert float(result["boxes"][0]["height"]) == pytest.approx(
        (max(first[1::2]) - min(first[1::2])) * img.height, abs=0.02)


async def test_clip_img_and_txt_as_16_decimal_strings(client, models_dir, metrics):
    img = sample_images()[0]
    data = jpeg(img)
    r = await client.post("/clip/img", data=upload(data), headers=HEADERS)
    assert r.status == 200, await r.text()
    result = (await r.json())["result"]
    assert len(result) == 512 and all(SIXTEEN_DECIMALS.match(v) for v in result)
    model_dir = models_dir / "clip" / "ViT-B-16"
    [expected] = ClipVisual(model_dir).run_batch([Image.open(io.BytesIO(data)).convert("RGB")])
    got = np.array([float(v) for v in result])
    assert float(got @ expected) / (np.linalg.norm(got) * np.linalg.norm(expected)) > 0.9999

    r = await client.post("/clip/txt", json={"text": "海边日落"}, headers=HEADERS)
    assert r.status == 200, await r.text()
    result = (await r.json())["result"]
    assert len(result) == 512 and all(SIXTEEN_DECIMALS.match(v) for v in result)
    [expected] = ClipTextual(model_dir).run_batch(["海边日落"])
    got = np.array([float(v) for v in result])
    assert float(got @ expected) / (np.linalg.norm(got) * np.linalg.norm(expected)) > 0.9999

    # a person typing waits at interactive priority; photos are background work; answers counted per route
    page = (await metrics.page())[0].decode()
    assert 'cnai_inference_seconds_count{model="clip-textual:ViT-B-16",priority="interactive"} 1.0' in page
    assert re.search(r'cnai_inference_seconds_count\{model="clip-visual:ViT-B-16",priority="background"\} [1-9]',
                     page)
    assert re.search(r'cnai_mtphotos_requests_total\{route="/clip/txt",status="200"\} [1-9]', page)


async def test_clip_txt_needs_json_text(client):
    for body in (b"not json", b"[]", b'{"text": ""}', b'{"query": "x"}'):
        r = await client.post("/clip/txt", data=body, headers={**HEADERS, "Content-Type": "application/json"})
        assert r.status == 400 and "text" in (await r.json())["detail"]


async def test_represent_in_face_api_shape(client):
    data = png(Image.fromarray(canvas(800, 600, [(320, 240, 40, 40, BLUE)])))
    r = await client.post("/represent", data=upload(data, filename="a.png"), headers=HEADERS)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["detector_backend"] == "insightface" and body["recognition_model"] == "buffalo_l"
    [face] = body["result"]
    assert face["facial_area"] == {"x": 320, "y": 240, "w": 40, "h": 40}
    assert all(type(v) is int for v in face["facial_area"].values())
    assert len(face["embedding"]) == 512 and abs(np.linalg.norm(face["embedding"]) - 1) < 1e-6  # normed_embedding
    assert 0.65 <= face["face_confidence"] <= 1

    r = await client.post("/represent", data=upload(png(Image.fromarray(canvas(640, 480)))), headers=HEADERS)
    assert r.status == 200 and (await r.json())["result"] == []


@pytest.mark.parametrize("route", ["/ocr", "/clip/img", "/represent"])
async def test_image_routes_refuse_bad_requests_with_http_errors(client, route):
    good = jpeg(render_text(["你好"], width=200))
    r = await client.post(route, data=upload(good), headers={"api-key": "wrong"})
    assert r.status == 401 and (await r.json())["detail"] == "Invalid API key"
    # no `file` field, or no form at all
    r = await client.post(route, data=upload(good, field="image"), headers=HEADERS)
    assert r.status == 400 and "file" in (await r.json())["detail"]
    r = await client.post(route, data=b"", headers=HEADERS)
    assert r.status == 400 and "file" in (await r.json())["detail"]
    # a corrupt photo: not an image, and a JPEG cut short
    r = await client.post(route, data=upload(b"this is not a photo"), headers=HEADERS)
    assert r.status == 400 and "not a readable image" in (await r.json())["detail"]
    r = await client.post(route, data=upload(good[: len(good) // 2]), headers=HEADERS)
    assert r.status == 400 and "truncated" in (await r.json())["detail"]
    # a photo whose header declares more pixels than any model is given
    huge = bytearray(png(Image.new("RGB", (8, 8))))
    huge[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    r = await client.post(route, data=upload(bytes(huge), filename="huge.png"), headers=HEADERS)
    assert r.status == 413 and "megapixel" in (await r.json())["detail"]


async def test_oversized_upload_is_a_413_before_it_is_read(pool, settings):
    mtphotos = build_mtphotos(pool, settings)
    mtphotos.config.max_body = 100_000
    data = jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)))
    assert len(data) > 100_000
    async with TestClient(TestServer(mtphotos.app())) as c:
        r = await c.post("/ocr", data=upload(data), headers=HEADERS)
        assert r.status == 413 and "limit" in (await r.json())["detail"]
        # chunked: no Content-Length to refuse it by, so the reading stops at the limit
        async def chunks():
            boundary = "b0undary"
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
                   f"Content-Type: image/jpeg\r\n\r\n").encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]
            yield f"\r\n--{boundary}--\r\n".encode()
        r = await c.post("/clip/img", data=chunks(),
                         headers={**HEADERS, "Content-Type": "multipart/form-data; boundary=b0undary"})
        assert r.status == 413 and "limit" in (await r.json())["detail"]


async def test_upload_with_the_file_field_twice_is_refused(client):
    """Which of two photos would be the result's? Neither: a clear 400, as /predict answers a field sent twice."""
    form = aiohttp.FormData()
    for color in ("red", "blue"):
        form.add_field("file", jpeg(Image.new("RGB", (64, 64), color)), filename=f"{color}.jpg",
                       content_type="image/jpeg")
    r = await client.post("/clip/img", data=form, headers=HEADERS)
    assert r.status == 400 and "more than once" in (await r.json())["detail"]


async def test_missing_model_is_a_500_naming_it(tmp_path):
    settings = Settings()
    settings.models_dir = tmp_path  # nothing installed
    settings.mtphotos_api_key = KEY
    pool = build_pool(settings)
    try:
        async with TestClient(TestServer(build_mtphotos(pool, settings).app())) as c:
            r = await c.post("/clip/txt", json={"text": "猫"}, headers=HEADERS)
            assert r.status == 500
            detail = (await r.json())["detail"]
            assert "ViT-B-16" in detail and "not found" in detail
    finally:
        await pool.close()


def test_no_key_no_api(monkeypatch):
    monkeypatch.delenv("CNAI_MTPHOTOS_API_KEY", raising=False)
    settings = Settings()
    assert settings.mtphotos_api_key == "" and settings.mtphotos_port == 8060
    with pytest.raises(ValueError, match="CNAI_MTPHOTOS_API_KEY"):
        build_mtphotos(build_pool(settings), settings)
    monkeypatch.setenv("CNAI_MTPHOTOS_PORT", "70000")
    with pytest.raises(SystemExit, match="CNAI_MTPHOTOS_PORT"):
        Settings()


async def test_cnai_gateway_serves_the_api_on_its_port_only_with_a_key(tmp_path):
    import os
    import subprocess
    import sys

    from cnai.embedded import _free_port
    from tests.conftest import stop_process, wait_for

    port, mt_port = _free_port(), _free_port()
    base = {**os.environ, "CNAI_MODELS_DIR": str(tmp_path), "CNAI_UPSTREAM_ML_URL": "", "CNAI_PRELOAD": "0",
            "CNAI_MTPHOTOS_PORT": str(mt_port)}
    base.pop("CNAI_MTPHOTOS_API_KEY", None)
    for env, served in ((base, False), ({**base, "CNAI_MTPHOTOS_API_KEY": KEY}, True)):
        proc = subprocess.Popen([sys.executable, "-m", "cnai", "gateway", "--port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            async with aiohttp.ClientSession() as session:
                async def up():
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/ping") as r:
                            return r.status == 200
                    except aiohttp.ClientConnectionError:
                        return False
                await wait_for(up, timeout=60)
                try:
                    async with session.post(f"http://127.0.0.1:{mt_port}/check", headers=HEADERS) as r:
                        answer = r.status, (await r.json())["result"]
                except aiohttp.ClientConnectionError:
                    answer = None
            assert answer == ((200, "pass") if served else None)
        finally:
            stop_process(proc, timeout=20)
