#!/usr/bin/env python
"""Pipeline benchmark: Immich wired to cnai, every upload reaching the models twice (Immich's /predict calls and
the trigger's jobs), on one `cnai serve`-like process (gateway + listener + one pool, wired as `cnai serve` does).

Part 1, one inference per photo: N uploads, each written the way Immich writes it (asset, then the preview's
asset_file row, which the trigger turns into jobs) and followed within a second by Immich's three /predict calls
(CLIP visual, faces, OCR; Immich-shaped multipart, the preview's bytes as `image`). Printed per task: model runs
per photo (PoolStats.items / N) and photos/s, with the result cache off (the two-runs baseline) and on, same run.

Part 2, a person's search during a backfill: CLIP text /predict latency (p50/p95) alone, then while uploads
saturate the machine (gateway images + listener jobs), with background yielding off and on, same run.

Models: RapidOCR's real bundled models; the tiny stand-ins the tests build for CLIP (cn-clip's own classes, tiny
ViT, 512-d; needs torch + cn_clip, else CLIP is left out) and faces (SCRFD/ArcFace-shaped graphs). So OCR carries
nearly all the compute, as on a CPU box; absolute numbers are this machine's, the ratios are the point.

    python bench/pipeline.py [--photos N] [--uploads-in-flight K] [--queries Q]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# run as a script: import the project, and don't let bench/queue.py shadow the standard library's queue
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
from aiohttp import web  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cnai.db import migrate  # noqa: E402
from cnai.embedded import EmbeddedServer  # noqa: E402
from cnai.settings import Settings  # noqa: E402
from cnai.wiring import build_gateway, build_listener, build_pool, preload_keys  # noqa: E402
from tests.conftest import cjk_font  # noqa: E402

ENTRIES = {
    "clip": {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}},
    "face": {"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
                                    "recognition": {"modelName": "buffalo_l"}}},
    "ocr": {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
                    "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}}}},
}
TEXT_ENTRIES = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {}}}}


def build_models(root: Path) -> list[str]:
    """Tiny CLIP and face stand-ins in a models folder; returns the tasks that have models (OCR always)."""
    from tests.face_fixtures import build_detector, build_recogniser
    pack = root / "face" / "buffalo_l"
    pack.mkdir(parents=True)
    build_detector(pack / "det_10g.onnx")
    build_recogniser(pack / "w600k_r50.onnx")
    tasks = ["face", "ocr"]
    try:
        from inference.clip.export import import_checkpoint
        from tests.clip_fixtures import build_clip, save_official, tiny_vit
        config = tiny_vit(512)
        ckpt = save_official(build_clip(config, seed=3), root / "clip_cn_tiny.pt")
        import_checkpoint(ckpt, "ViT-B-16", root, model_config=config)
        tasks.insert(0, "clip")
    except ImportError as e:
        print(f"(CLIP left out: {e})")
    return tasks


def preview(i: int) -> bytes:
    """A 1024x768 JPEG with a line of text, as Immich's preview of a photo of a sign would be."""
    img = Image.new("RGB", (1024, 768), (200 + i % 50, 220, 240))
    draw = ImageDraw.Draw(img)
    draw.text((60, 300), f"发票 {i:04d} 合计 {i * 7 % 1000} 元", font=cjk_font(56), fill="black")
    draw.ellipse((700, 100, 900, 300), fill=(180, 120, 90))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def form(entries: dict, image: bytes | None = None, text: str | None = None) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("entries", json.dumps(entries))
    if image is not None:
        data.add_field("image", image, filename="blob", content_type="application/octet-stream")
    if text is not None:
        data.add_field("text", text)
    return data


class Service:
    """Gateway + listener + one pool, as cnai/cli.py's _run_service wires them for `cnai serve`."""

    def __init__(self, dsn: str, settings: Settings):
        self.dsn, self.settings = dsn, settings

    async def __aenter__(self):
        self.pool = build_pool(self.settings)
        await self.pool.preload(preload_keys(self.settings))
        self.listener = build_listener(self.dsn, self.pool, self.settings)
        self.listener_task = asyncio.create_task(self.listener.run())
        self.runner = web.AppRunner(build_gateway(self.pool, self.settings).app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/predict"
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        self.listener.stop()
        await self.listener_task
        await self.runner.cleanup()
        await self.pool.close()

    async def predict(self, data: aiohttp.FormData) -> dict:
        async with self.http.post(self.url, data=data) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"/predict answered {r.status}: {body}")
            return body


async def reset(db) -> object:
    await db.execute('TRUNCATE "user", asset, reprocess_request, cnai.job, cnai.job_intake CASCADE')
    return await db.fetchval('INSERT INTO "user" (email) VALUES ($1) RETURNING id', f"{uuid.uuid4().hex[:8]}@b")


async def upload(svc: Service, db: asyncpg.Pool, owner, path: Path, data: bytes, tasks: list[str], i: int):
    """What Immich does for one upload: the rows, then its three ML jobs within a second."""
    checksum = hashlib.sha1(str(path).encode() + uuid.uuid4().bytes).digest()
    asset = await db.fetchval("""INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                                 VALUES ($1, $2, $3, $4) RETURNING id""", owner, str(path), path.name, checksum)
    await db.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', $2)
                        ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""",
                     asset, str(path))
    await asyncio.sleep((i * 37 % 10) / 10)  # 0-0.9 s after the write, spread as Immich's job queue spreads them
    await asyncio.gather(*(svc.predict(form(ENTRIES[t], data)) for t in tasks))


async def drive_uploads(svc: Service, db, photos: list[tuple[Path, bytes]], tasks: list[str], in_flight: int):
    owner = await reset(db)
    gate = asyncio.Semaphore(in_flight)

    async def one(i, path, data):
        async with gate:
            await upload(svc, db, owner, path, data, tasks, i)

    await asyncio.gather(*(one(i, p, d) for i, (p, d) in enumerate(photos)))
    expected = len(photos) * len(tasks)
    while await db.fetchval("SELECT count(*) FROM cnai.job WHERE state IN ('done', 'failed')") < expected:
        await asyncio.sleep(0.05)
    failed = await db.fetch("SELECT task, error FROM cnai.job WHERE state = 'failed' LIMIT 3")
    if failed:
        raise SystemExit(f"jobs failed: {[dict(r) for r in failed]}")


def settings_for(models_dir: Path, tasks: list[str], **overrides) -> Settings:
    s = Settings()
    s.models_dir = models_dir
    s.tasks = tasks
    s.path_map = []
    s.poll_interval_s = 0.3
    s.upstream_ml_url = ""
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


def model_key(task: str, s: Settings) -> str:
    return {"clip": f"clip-visual:{s.clip_model}", "face": f"face:{s.face_model}", "ocr": "ocr"}[task]


async def part_one(dsn, db, models_dir, tasks, photos, in_flight):
    print(f"\n1. one inference per photo: {len(photos)} uploads, {in_flight} in flight, tasks {','.join(tasks)}")
    rates = {}
    for label, cache_mb in (("cache off (two runs)", 0), ("cache on", 256)):
        s = settings_for(models_dir, tasks, result_cache_mb=cache_mb)
        async with Service(dsn, s) as svc:
            t0 = time.perf_counter()
            await drive_uploads(svc, db, photos, tasks, in_flight)
            elapsed = time.perf_counter() - t0
            stats = svc.pool.stats()
        rates[label] = len(photos) / elapsed
        runs = "  ".join(f"{t} {stats[model_key(t, s)].items / len(photos):.2f}" for t in tasks)
        shared = sum(stats[model_key(t, s)].cache_hits + stats[model_key(t, s)].singleflight_joins for t in tasks)
        print(f"  {label:22s} model runs per photo: {runs}   shared answers {shared:4d}   "
              f"{rates[label]:.2f} photos/s")
    print(f"  photos/s, cache on / off: {rates['cache on'] / rates['cache off (two runs)']:.2f}x")


async def text_latencies(svc: Service, texts: list[str]) -> list[float]:
    out = []
    for text in texts:
        t0 = time.perf_counter()
        await svc.predict(form(TEXT_ENTRIES, text=text))
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)  # a person typing, not a flood
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


async def part_two(dsn, db, models_dir, tasks, photos, in_flight, queries):
    if "clip" not in tasks:
        print("\n2. skipped: no CLIP text model (torch + cn_clip needed to build the stand-in)")
        return
    print(f"\n2. CLIP text /predict latency, {queries} queries each, during a backfill of {len(photos)} uploads "
          f"({in_flight} in flight)")
    from tests.clip_fixtures import mixed_texts
    texts = iter(mixed_texts(queries * 5, seed=99))  # all different: no query is answered from the cache
    rows = []
    for label, yield_s in (("background never yields", 0.0), ("background yields", 0.2)):
        s = settings_for(models_dir, tasks, background_yield_s=yield_s)
        async with Service(dsn, s) as svc:
            await text_latencies(svc, [next(texts) for _ in range(3)])  # warm-up
            alone = await text_latencies(svc, [next(texts) for _ in range(queries)])
            backfill = asyncio.create_task(drive_uploads(svc, db, photos, tasks, in_flight))
            await asyncio.sleep(1.0)  # let it saturate
            busy = []
            while not backfill.done() and len(busy) < queries:
                busy += await text_latencies(svc, [next(texts)])
            await backfill
        rows.append((label, alone, busy))
    for label, alone, busy in rows:
        print(f"  {label:26s} alone p50 {p(alone, 50):6.1f} ms p95 {p(alone, 95):6.1f} ms   during backfill "
              f"p50 {p(busy, 50):6.1f} ms p95 {p(busy, 95):6.1f} ms ({len(busy)} queries)   "
              f"p95 ratio {p(busy, 95) / p(alone, 95):.1f}x")


async def main(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="cnai-bench-pipeline-"))
    work.chmod(0o755)  # as root, the server runs as its own user, which must reach the data folder
    server = EmbeddedServer(work / "pg")
    try:
        models_dir = work / "models"
        tasks = build_models(models_dir)
        server.start()
        dsn = server.dsn()
        await migrate(dsn, standalone=True)
        photos = []
        for i in range(args.photos):
            data = preview(i)
            path = work / "previews" / f"{i:04d}_preview.jpeg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            photos.append((path, data))
        db = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        try:
            await part_one(dsn, db, models_dir, tasks, photos, args.uploads_in_flight)
            await part_two(dsn, db, models_dir, tasks, photos, args.uploads_in_flight, args.queries)
        finally:
            await db.close()
    finally:
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--uploads-in-flight", type=int, default=8)
    ap.add_argument("--queries", type=int, default=30)
    asyncio.run(main(ap.parse_args()))
