"""CLIP jobs end to end with a tiny cn-clip imported through the real importer: listener -> cnai.clip (and Immich's
smart_search only when Immich's configured model is one we answer), and /predict clip in Immich's shape."""
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
from inference.clip import ClipTextual, ClipVisual
from tests.clip_fixtures import build_clip, sample_images, save_official, tiny_vit
from tests.conftest import listener_settings, make_asset, make_user, running_listener, wait_for

pytest.importorskip("cn_clip")

TINY_512 = tiny_vit(512)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from inference.clip.export import import_checkpoint
    work = tmp_path_factory.mktemp("clip-jobs")
    ckpt = save_official(build_clip(TINY_512, seed=3), work / "clip_cn_tiny.pt")
    import_checkpoint(ckpt, "ViT-B-16", work / "models", model_config=TINY_512)
    return work / "models"


def clip_settings(models_dir) -> Settings:
    return listener_settings(["clip"], models_dir, clip_model="ViT-B-16")


@pytest_asyncio.fixture(scope="module")
async def clip_pool(models_dir):
    pool = build_pool(clip_settings(models_dir))
    errors = await pool.preload(["clip-visual:ViT-B-16", "clip-textual:ViT-B-16"])
    assert not any(errors.values()), errors
    yield pool
    await pool.close()


async def run_listener_until(dsn, pool, models_dir, predicate, mirror):
    async with running_listener(dsn, pool, clip_settings(models_dir), mirror_clip=mirror, stop_timeout=30):
        await wait_for(predicate, timeout=60)


async def smart_search_mirror_ok(conn, settings: Settings) -> bool:
    """What the listener's clip writes decide in SQL per batch: may results fill Immich's smart_search right now."""
    return await conn.fetchval("SELECT cnai.smart_search_mirror_ok($1)", settings.clip_serve_as)


def vec(text: str) -> np.ndarray:
    return np.array(json.loads(text), dtype=np.float32)


async def test_clip_jobs_write_embeddings_and_mirror_to_immich(db, dsn, clip_pool, models_dir, photo_dir):
    owner = await make_user(db)
    images = sample_images()[:3]
    assets = []
    for i, im in enumerate(images):
        path = photo_dir / f"{i}.png"
        im.save(path)
        assets.append(await make_asset(db, owner, path))
    settings = clip_settings(models_dir)
    mirror = await smart_search_mirror_ok(db, settings)  # no system-config: Immich's default ViT-B-32__openai
    assert mirror is True
    await run_listener_until(dsn, clip_pool, models_dir,
                             lambda: db.fetchval("SELECT count(*) = 3 FROM cnai.clip"), mirror)
    expected = ClipVisual(models_dir / "clip" / "ViT-B-16").run_batch(images)
    for asset, exp in zip(assets, expected):
        row = await db.fetchrow("SELECT embedding::text AS e, model FROM cnai.clip WHERE asset_id = $1", asset)
        got = vec(row["e"])
        assert got.shape == (512,) and abs(np.linalg.norm(got) - 1) < 1e-4
        assert float(got @ exp) > 0.9999
        assert row["model"] == "cn-clip/ViT-B-16"
        mirrored = vec(await db.fetchval('SELECT embedding::text FROM smart_search WHERE "assetId" = $1', asset))
        assert np.allclose(mirrored, got, atol=1e-6)


async def test_no_mirror_when_immich_uses_another_model_or_dimension(db, models_dir):
    settings = clip_settings(models_dir)
    await db.execute("""INSERT INTO system_metadata (key, value) VALUES ('system-config', $1::jsonb)
                        ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                     json.dumps({"machineLearning": {"clip": {"enabled": True, "modelName": "ViT-L-14__openai"}}}))
    try:
        assert await smart_search_mirror_ok(db, settings) is False
        await db.execute("""UPDATE system_metadata SET value = $1::jsonb WHERE key = 'system-config'""",
                         json.dumps({"machineLearning": {"clip": {"modelName": "immich-app/ViT-B-16__openai"}}}))
        assert await smart_search_mirror_ok(db, settings) is True
        # same name but Immich's column was resized for another model: never mix
        tx = db.transaction()
        await tx.start()
        await db.execute("DELETE FROM smart_search")
        await db.execute("DROP INDEX clip_index")
        await db.execute("ALTER TABLE smart_search ALTER COLUMN embedding TYPE vector(640)")
        assert await smart_search_mirror_ok(db, settings) is False
        await tx.rollback()
    finally:
        await db.execute("DELETE FROM system_metadata WHERE key = 'system-config'")


async def test_predict_clip_textual_and_visual(clip_pool, models_dir):
    settings = clip_settings(models_dir)
    server = TestServer(build_gateway(clip_pool, settings).app())
    model_dir = models_dir / "clip" / "ViT-B-16"
    async with TestClient(server) as client:
        form = aiohttp.FormData()
        form.add_field("entries", json.dumps({"clip": {"textual": {"modelName": "ViT-B-32__openai",
                                                                   "options": {"language": "zh-CN"}}}}))
        form.add_field("text", "海边日落")
        r = await client.post("/predict", data=form)
        assert r.status == 200, await r.text()
        body = await r.json()
        assert set(body) == {"clip"} and isinstance(body["clip"], str)  # no image size keys for text
        [exp_t] = ClipTextual(model_dir).run_batch(["海边日落"])
        assert float(vec(body["clip"]) @ exp_t) > 0.9999

        img = sample_images()[0]
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        form = aiohttp.FormData()
        form.add_field("entries", json.dumps({"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}))
        form.add_field("image", buf.getvalue(), filename="blob", content_type="application/octet-stream")
        r = await client.post("/predict", data=form)
        assert r.status == 200, await r.text()
        body = await r.json()
        assert body["imageWidth"] == img.width and body["imageHeight"] == img.height
        [exp_v] = ClipVisual(model_dir).run_batch([Image.open(io.BytesIO(buf.getvalue())).convert("RGB")])
        got = vec(body["clip"])
        assert got.shape == (512,) and float(got @ exp_v) > 0.9999
