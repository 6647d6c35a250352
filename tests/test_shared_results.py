"""One inference per photo and task: Immich's /predict and the trigger's job for the same preview meet on one
computation in the shared pool, whichever comes first (real OCR, real listener, real PostgreSQL)."""
from __future__ import annotations

import io
import json

import numpy as np
from aiohttp.test_utils import TestClient, TestServer

from cnai.wiring import build_gateway, build_pool
from gateway.app import Gateway, GatewayConfig
from inference import images
from inference.cache import content_digest
from inference.ocr import OcrResult
from inference.pool import ModelPool
from tests.conftest import listener_settings, make_asset, make_user, render_text, running_listener, wait_for
from tests.test_gateway import OCR_ENTRIES, immich_form


def save(img, path):
    img.save(path, "JPEG", quality=80)
    return path


def digest(path) -> str:
    return content_digest(path.read_bytes())


async def predict_ocr(client, path) -> list[str]:
    r = await client.post("/predict", data=immich_form(OCR_ENTRIES, path.read_bytes()))
    assert r.status == 200, await r.text()
    return (await r.json())["ocr"]["text"]


async def test_gateway_and_listener_share_one_ocr_run_per_photo(db, dsn, photo_dir, monkeypatch):
    """And a job whose result is shared reads the file (its digest names the result) but never decodes it."""
    decoded: list[str] = []
    decode = images.decode_image

    def counting_decode(data: bytes):
        decoded.append(content_digest(data))
        return decode(data)
    monkeypatch.setattr(images, "decode_image", counting_decode)
    settings = listener_settings(["ocr"], batch_size=4)
    pool = build_pool(settings)
    gateway_first = save(render_text(["增值税发票"]), photo_dir / "a.jpg")
    listener_first = save(render_text(["海边日落"]), photo_dir / "b.jpg")
    owner = await make_user(db)
    try:
        async with TestClient(TestServer(build_gateway(pool, settings).app())) as client:
            # Immich asks first for one photo: the listener's job then finds the result
            assert "发票" in "".join(await predict_ocr(client, gateway_first))
            a = await make_asset(db, owner, gateway_first)
            async with running_listener(dsn, pool, settings):
                await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM cnai.ocr"), timeout=90)
                assert decoded == [digest(gateway_first)]  # the gateway's; the listener's job did not decode
                # the listener first for the other: Immich's request then finds the result
                b = await make_asset(db, owner, listener_first)
                await wait_for(lambda: db.fetchval("SELECT count(*) = 2 FROM cnai.ocr"), timeout=90)
            assert decoded == [digest(gateway_first), digest(listener_first)]
            assert "日落" in "".join(await predict_ocr(client, listener_first))
        texts = {r["asset_id"]: json.loads(r["lines"]) for r in await db.fetch("SELECT asset_id, lines FROM cnai.ocr")}
        assert "发票" in "".join(ln["text"] for ln in texts[a]) and "日落" in "".join(ln["text"] for ln in texts[b])
        stats = pool.stats()["ocr"]
        assert stats.items == 2, stats          # two photos, two model runs (four requests)
        assert stats.cache_hits + stats.singleflight_joins == 2, stats
    finally:
        await pool.close()


async def test_cache_off_runs_the_model_for_each_path(db, dsn, photo_dir):
    settings = listener_settings(["ocr"], batch_size=4, result_cache_mb=0)
    pool = build_pool(settings)
    path = save(render_text(["增值税发票"]), photo_dir / "a.jpg")
    try:
        async with TestClient(TestServer(build_gateway(pool, settings).app())) as client:
            await predict_ocr(client, path)
            await make_asset(db, await make_user(db), path)
            async with running_listener(dsn, pool, settings):
                await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM cnai.ocr"), timeout=90)
        assert pool.stats()["ocr"].items == 2
    finally:
        await pool.close()


class PriorityProbe:
    """Stands in for a model; records whether the pool counted its batch as a person's (interactive) work."""

    max_batch = 1

    def __init__(self, key, pool, output):
        self.key, self.pool, self.output, self.seen = key, pool, output, []

    def load(self):
        pass

    def unload(self):
        pass

    def run_batch(self, items):
        self.seen.append(self.pool._interactive > 0)
        return [self.output for _ in items]


async def test_gateway_runs_image_jobs_in_the_background_and_text_queries_interactive():
    pool = ModelPool()
    ocr = PriorityProbe("ocr", pool, OcrResult())
    text = PriorityProbe("clip-textual:ViT-B-16", pool, np.ones(4, dtype=np.float32))
    pool.register("ocr", lambda: ocr)
    pool.register("clip-textual:ViT-B-16", lambda: text)
    buf = io.BytesIO()
    render_text(["发票"]).save(buf, "JPEG")
    async with TestClient(TestServer(Gateway(pool, GatewayConfig(clip_model="ViT-B-16")).app())) as client:
        r = await client.post("/predict", data=immich_form(OCR_ENTRIES, buf.getvalue()))
        assert r.status == 200, await r.text()
        r = await client.post("/predict", data=immich_form(
            {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {}}}}, text="海边"))
        assert r.status == 200, await r.text()
    await pool.close()
    assert ocr.seen == [False] and text.seen == [True]
