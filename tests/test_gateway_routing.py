"""Routing, task by task: a name cnai's model really is gets served here; any other name goes to the upstream Immich
ML (a real aiohttp stand-in that records what it got) or, without one, gets a 400 naming it; a missing local model
goes upstream where the upstream's model of that name is the same one."""
from __future__ import annotations

import json

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from cnai.settings import Settings
from cnai.wiring import build_gateway, build_pool
from gateway.immich_models import IMMICH_OCR_MODELS, SERVED_OCR_MODELS
from tests.conftest import render_text
from tests.face_fixtures import canvas, face_models, install_buffalo_l  # noqa: F401  (fixture)
from tests.test_gateway import immich_form, jpeg


def ocr_entries(det: str, rec: str | None = None) -> dict:
    return {"ocr": {"detection": {"modelName": det, "options": {"minScore": 0.5, "maxResolution": 736}},
                    "recognition": {"modelName": rec or det, "options": {"minScore": 0.8}}}}


def face_entries(pack: str) -> dict:
    return {"facial-recognition": {"detection": {"modelName": pack, "options": {"minScore": 0.7}},
                                   "recognition": {"modelName": pack}}}


UPSTREAM_ANSWER = {"answered": "upstream"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, face_models):  # noqa: F811
    """buffalo_l is here (tiny stand-ins in its layout); antelopev2 and every CLIP model are not."""
    return install_buffalo_l(tmp_path_factory.mktemp("routing-models"), face_models)


@pytest_asyncio.fixture(scope="module")
async def pool(models_dir):
    settings = Settings()
    settings.models_dir = models_dir
    pool = build_pool(settings)
    await pool.preload(["ocr"])
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module")
async def upstream():
    """A stand-in Immich ML: records each /predict form and answers with a marker."""
    received: list[dict] = []

    async def predict(request):
        form = await request.post()
        image = form.get("image")
        received.append({"entries": json.loads(form["entries"]), "text": form.get("text"),
                         "image": image.file.read() if image is not None else None})
        return web.json_response(UPSTREAM_ANSWER)

    app = web.Application()
    app.router.add_post("/predict", predict)
    async with TestServer(app) as server:
        server.received = received
        yield server


def gateway_client(pool, models_dir, upstream_url: str = "") -> TestClient:
    settings = Settings()
    settings.models_dir = models_dir
    settings.upstream_ml_url = upstream_url
    return TestClient(TestServer(build_gateway(pool, settings).app()))


@pytest_asyncio.fixture
async def with_upstream(pool, models_dir, upstream):
    upstream.received.clear()
    async with gateway_client(pool, models_dir, str(upstream.make_url("/"))) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def alone(pool, models_dir):
    async with gateway_client(pool, models_dir) as client:
        yield client


OCR_IMAGE = jpeg(render_text(["增值税发票", "Total 128"], width=700))
FACE_IMAGE = jpeg(Image.fromarray(canvas(320, 240, [(40, 40, 120, 120, (0, 0, 255))])))


# --- OCR ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SERVED_OCR_MODELS)
async def test_ocr_names_of_cnai_model_are_served_here(with_upstream, upstream, name):
    r = await with_upstream.post("/predict", data=immich_form(ocr_entries(name), OCR_IMAGE))
    assert r.status == 200
    assert "发票" in "".join((await r.json())["ocr"]["text"])
    assert upstream.received == []


OTHER_OCR = [n for n in IMMICH_OCR_MODELS if n not in SERVED_OCR_MODELS]


def test_every_other_immich_ocr_name_is_another_model():
    # the server model and each script's recogniser: none of them is answered by cnai's Chinese/English mobile one
    assert set(OTHER_OCR) == {"PP-OCRv5_server", "CH__PP-OCRv5_server", "EL__PP-OCRv5_mobile", "EN__PP-OCRv5_mobile",
                              "ESLAV__PP-OCRv5_mobile", "KOREAN__PP-OCRv5_mobile", "LATIN__PP-OCRv5_mobile",
                              "TH__PP-OCRv5_mobile"}


@pytest.mark.parametrize("name", OTHER_OCR)
async def test_other_scripts_ocr_is_forwarded_as_sent(with_upstream, upstream, name):
    entries = ocr_entries(name)
    r = await with_upstream.post("/predict", data=immich_form(entries, OCR_IMAGE))
    assert r.status == 200 and await r.json() == UPSTREAM_ANSWER
    assert upstream.received == [{"entries": entries, "text": None, "image": OCR_IMAGE}]


async def test_ocr_with_another_recogniser_is_forwarded(with_upstream, upstream):
    # Chinese detection but Korean recognition is not cnai's model either
    entries = ocr_entries("PP-OCRv5_mobile", "KOREAN__PP-OCRv5_mobile")
    r = await with_upstream.post("/predict", data=immich_form(entries, OCR_IMAGE))
    assert r.status == 200 and await r.json() == UPSTREAM_ANSWER
    assert upstream.received[0]["entries"] == entries


@pytest.mark.parametrize("name", ["KOREAN__PP-OCRv5_mobile", "PP-OCRv5_server", "PP-OCRv9_huge"])
async def test_other_ocr_without_upstream_is_400_naming_it(alone, name):
    r = await alone.post("/predict", data=immich_form(ocr_entries(name), OCR_IMAGE))
    assert r.status == 400
    detail = (await r.json())["detail"]
    assert name in detail and "CNAI_UPSTREAM_ML_URL" in detail and "PP-OCRv5_mobile" in detail


# --- faces -------------------------------------------------------------------------------------------------------

async def test_face_pack_present_here_is_served(with_upstream, upstream):
    r = await with_upstream.post("/predict", data=immich_form(face_entries("buffalo_l"), FACE_IMAGE))
    assert r.status == 200, await r.text()
    body = await r.json()
    assert isinstance(body["facial-recognition"], list) and body["imageWidth"] == 320
    assert upstream.received == []


@pytest.mark.parametrize("pack", ["antelopev2", "no_such_pack"])
async def test_face_pack_missing_or_unknown_here_is_forwarded(with_upstream, upstream, pack):
    entries = face_entries(pack)
    r = await with_upstream.post("/predict", data=immich_form(entries, FACE_IMAGE))
    assert r.status == 200 and await r.json() == UPSTREAM_ANSWER
    assert upstream.received == [{"entries": entries, "text": None, "image": FACE_IMAGE}]


async def test_face_pack_mixed_is_forwarded(with_upstream, upstream):
    entries = face_entries("buffalo_l")
    entries["facial-recognition"]["recognition"]["modelName"] = "antelopev2"
    r = await with_upstream.post("/predict", data=immich_form(entries, FACE_IMAGE))
    assert r.status == 200 and await r.json() == UPSTREAM_ANSWER


async def test_missing_face_pack_without_upstream_names_the_file(alone):
    r = await alone.post("/predict", data=immich_form(face_entries("antelopev2"), FACE_IMAGE))
    assert r.status == 500
    assert "antelopev2" in (await r.json())["detail"]


async def test_unknown_face_pack_without_upstream_is_400_naming_it(alone):
    r = await alone.post("/predict", data=immich_form(face_entries("no_such_pack"), FACE_IMAGE))
    assert r.status == 400
    detail = (await r.json())["detail"]
    assert "no_such_pack" in detail and "buffalo_l" in detail and "CNAI_UPSTREAM_ML_URL" in detail


# --- CLIP --------------------------------------------------------------------------------------------------------

async def test_clip_name_served_as_is_never_forwarded_when_missing(with_upstream, upstream):
    # the upstream's ViT-B-32__openai is another model than cnai's: its vectors would share Immich's column with ours
    entries = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
    r = await with_upstream.post("/predict", data=immich_form(entries, text="海边日落"))
    assert r.status == 500 and "model file not found" in (await r.json())["detail"]
    assert upstream.received == []


async def test_other_clip_model_is_forwarded(with_upstream, upstream):
    entries = {"clip": {"textual": {"modelName": "nllb-clip-large-siglip__v1"}}}
    r = await with_upstream.post("/predict", data=immich_form(entries, text="海边"))
    assert r.status == 200 and await r.json() == UPSTREAM_ANSWER
    assert upstream.received == [{"entries": entries, "text": "海边", "image": None}]


async def test_other_clip_model_without_upstream_is_400_naming_it(alone):
    entries = {"clip": {"visual": {"modelName": "ViT-H-14-378-quickgelu__dfn5b"}}}
    r = await alone.post("/predict", data=immich_form(entries, OCR_IMAGE))
    assert r.status == 400
    detail = (await r.json())["detail"]
    assert "ViT-H-14-378-quickgelu__dfn5b" in detail and "ViT-B-32__openai" in detail


# --- several tasks in one request ---------------------------------------------------------------------------------

async def test_a_request_with_any_entry_not_served_goes_upstream_whole(with_upstream, upstream):
    entries = {**ocr_entries("PP-OCRv5_mobile"), **face_entries("no_such_pack")}
    r = await with_upstream.post("/predict", data=immich_form(entries, OCR_IMAGE))
    assert r.status == 200 and await r.json() == UPSTREAM_ANSWER
    assert upstream.received[0]["entries"] == entries
