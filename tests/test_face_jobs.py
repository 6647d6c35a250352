"""Face jobs end to end: trigger -> listener -> tiny SCRFD/ArcFace pack in buffalo_l's layout -> cnai.face;
and /predict facial-recognition in Immich's shape."""
from __future__ import annotations

import io
import json

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from cnai.settings import Settings
from cnai.wiring import build_gateway, build_pool
from tests.conftest import listener_settings, make_asset, make_user, running_listener, wait_for
from tests.face_fixtures import BLUE, canvas, face_models, install_buffalo_l  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, face_models):  # noqa: F811
    return install_buffalo_l(tmp_path_factory.mktemp("models"), face_models)


def face_settings(models_dir) -> Settings:
    return listener_settings(["face"], models_dir)


@pytest_asyncio.fixture(scope="module")
async def face_pool(models_dir):
    pool = build_pool(face_settings(models_dir))
    errors = await pool.preload(["face:buffalo_l"])
    assert errors["face:buffalo_l"] is None
    yield pool
    await pool.close()


async def run_until(dsn, pool, models_dir, predicate):
    async with running_listener(dsn, pool, face_settings(models_dir), stop_timeout=30):
        await wait_for(predicate, timeout=60)


async def test_faces_are_written_with_image_size_and_replaced_on_reprocess(db, dsn, face_pool, models_dir,
                                                                           photo_dir):
    owner = await make_user(db)
    path = photo_dir / "two.png"
    Image.fromarray(canvas(1000, 600, [(500, 250, 50, 50, BLUE), (100, 100, 50, 50, BLUE)])).save(path)
    asset = await make_asset(db, owner, path)
    await run_until(dsn, face_pool, models_dir,
                    lambda: db.fetchval("SELECT state = 'done' FROM cnai.job WHERE asset_id = $1 AND task = 'face'",
                                        asset))
    rows = await db.fetch("SELECT x1, y1, x2, y2, score, embedding::text AS e, image_width, image_height, model "
                          "FROM cnai.face WHERE asset_id = $1 ORDER BY x1", asset)
    assert len(rows) == 2
    assert [(r["x1"], r["y1"], r["x2"], r["y2"]) for r in rows] == [(100, 100, 150, 150), (500, 250, 550, 300)]
    assert all(r["image_width"] == 1000 and r["image_height"] == 600 for r in rows)  # never 0x0
    assert all(len(json.loads(r["e"])) == 512 for r in rows) and rows[0]["model"] == "buffalo_l"

    # the photo changes: one face left; reprocessing replaces the asset's faces atomically
    Image.fromarray(canvas(1000, 600, [(500, 250, 50, 50, BLUE)])).save(path)
    req = await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{face}') RETURNING id", asset)
    await run_until(dsn, face_pool, models_dir,
                    lambda: db.fetchval("SELECT status = 'done' FROM reprocess_request WHERE id = $1", req))
    assert await db.fetchval("SELECT count(*) FROM cnai.face WHERE asset_id = $1", asset) == 1

    Image.fromarray(canvas(640, 480)).save(path)  # nobody in it
    req = await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{face}') RETURNING id", asset)
    await run_until(dsn, face_pool, models_dir,
                    lambda: db.fetchval("SELECT status = 'done' FROM reprocess_request WHERE id = $1", req))
    assert await db.fetchval("SELECT count(*) FROM cnai.face WHERE asset_id = $1", asset) == 0


async def test_missing_face_pack_fails_face_jobs_with_the_path(db, dsn, photo_dir, tmp_path):
    settings = face_settings(tmp_path)  # empty models dir
    pool = build_pool(settings)
    owner = await make_user(db)
    path = photo_dir / "x.png"
    Image.fromarray(canvas(64, 64)).save(path)
    asset = await make_asset(db, owner, path)
    try:
        async with running_listener(dsn, pool, settings, stop_timeout=30):
            await wait_for(lambda: db.fetchval(
                "SELECT state = 'failed' FROM cnai.job WHERE asset_id = $1 AND task = 'face'", asset), timeout=30)
    finally:
        await pool.close()
    error = await db.fetchval("SELECT error FROM cnai.job WHERE asset_id = $1 AND task = 'face'", asset)
    assert "buffalo_l" in error and "face" in error and "not found" in error
    # other tasks' jobs for the same asset are untouched
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1 AND state = 'queued'", asset) == 2


async def test_predict_facial_recognition_in_immich_shape(face_pool, models_dir):
    server = TestServer(build_gateway(face_pool, face_settings(models_dir)).app())
    async with TestClient(server) as client:
        buf = io.BytesIO()
        Image.fromarray(canvas(800, 600, [(320, 240, 40, 40, BLUE)])).save(buf, "PNG")
        form = aiohttp.FormData()
        form.add_field("entries", json.dumps({"facial-recognition": {
            "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
            "recognition": {"modelName": "buffalo_l"}}}))
        form.add_field("image", buf.getvalue(), filename="blob", content_type="application/octet-stream")
        r = await client.post("/predict", data=form)
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["imageWidth"] == 800 and body["imageHeight"] == 600
    [face] = body["facial-recognition"]
    assert face["boundingBox"] == {"x1": 320.0, "y1": 240.0, "x2": 360.0, "y2": 280.0}
    emb = json.loads(face["embedding"])  # a string holding a JSON array, as Immich stores it
    assert isinstance(face["embedding"], str) and len(emb) == 512
    assert abs(np.linalg.norm(emb) - 1) > 0.05  # raw, not normalised, like Immich ML
    assert 0.7 <= face["score"] <= 1
