#!/usr/bin/env python
"""MT Photos' protocol vs Immich's, same pool, same photos, same run: `/clip/img` and `/ocr` throughput at
`--clients` concurrent clients against `/predict` with Immich's entries, on real sockets.

    python bench/mtphotos.py [--models-dir DIR] [--images 24] [--clients 4] [--rounds 3]

Both apps run in this process on one pool with the result cache off, so every request is computed (with it on, the
second protocol would be answered from the first one's results). Each round sends the same distinct photos through
each protocol, in rotating order; the median images/s of each and their ratio (MT Photos / Immich) are printed.
CLIP is cn-clip ViT-B-16 from --models-dir when imported there, else the tests' tiny stand-in (labelled: then the
ratio weighs the protocols' own costs more); OCR is RapidOCR's real bundled models.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # bench/queue.py is not the stdlib's
sys.path.insert(0, str(_HERE.parent))

from cnai.settings import Settings  # noqa: E402
from cnai.wiring import build_gateway, build_mtphotos, build_pool  # noqa: E402

KEY = "bench"
IMMICH_ENTRIES = {
    "clip": {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}},
    "ocr": {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
                    "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}}}},
}
MT_ROUTES = {"clip": "/clip/img", "ocr": "/ocr"}


def clip_model_label(models_dir: Path) -> str:
    if (models_dir / "clip" / "ViT-B-16" / "config.json").is_file():
        return "cn-clip ViT-B-16"
    from inference.clip.export import import_checkpoint
    from tests.clip_fixtures import build_clip, save_official, tiny_vit
    config = tiny_vit(512)
    ckpt = save_official(build_clip(config, seed=3), models_dir / "clip_cn_tiny.pt")
    import_checkpoint(ckpt, "ViT-B-16", models_dir, model_config=config)
    return "tiny cn-clip stand-in"


def photos(n: int, task: str) -> list[bytes]:
    """Distinct JPEG previews: text lines for OCR, noise for CLIP."""
    from tests.conftest import render_text
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        if task == "ocr":
            img = render_text([f"发票 No.{i:04d}", "海边日落 Total 128"], width=720)
        else:
            img = Image.fromarray(rng.integers(0, 255, (360, 480, 3), np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def immich_request(session, base: str, task: str, data: bytes) -> None:
    form = aiohttp.FormData()
    form.add_field("entries", json.dumps(IMMICH_ENTRIES[task]))
    form.add_field("image", data, filename="blob", content_type="application/octet-stream")
    async with session.post(f"{base}/predict", data=form) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def mtphotos_request(session, base: str, task: str, data: bytes) -> None:
    form = aiohttp.FormData()
    form.add_field("file", data, filename="photo.jpg", content_type="image/jpeg")
    async with session.post(f"{base}{MT_ROUTES[task]}", data=form, headers={"api-key": KEY}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def throughput(send, session, base: str, task: str, images: list[bytes], clients: int) -> float:
    queue = list(images)

    async def client():
        while queue:
            await send(session, base, task, queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(images) / (time.perf_counter() - started)


async def main(args) -> None:
    models_dir = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp(prefix="cnai-bench-mt-"))
    clip_label = clip_model_label(models_dir)
    settings = Settings()
    settings.models_dir = models_dir
    settings.clip_model = "ViT-B-16"
    settings.upstream_ml_url = ""
    settings.result_cache_mb = 0  # every request computed: no protocol answered from the other's results
    settings.mtphotos_api_key = KEY
    if args.providers:
        settings.providers = args.providers.split(",")
    pool = build_pool(settings)
    errors = await pool.preload(["ocr", "clip-visual:ViT-B-16"])
    assert not any(errors.values()), errors
    immich_runner, immich = await serve(build_gateway(pool, settings).app())
    mt_runner, mt = await serve(build_mtphotos(pool, settings).app())
    print(f"{args.clients} clients, {args.images} photos per protocol and round, {args.rounds} rounds; "
          f"CLIP: {clip_label}; OCR: RapidOCR; providers: {','.join(settings.providers)}", flush=True)
    try:
        async with aiohttp.ClientSession() as session:
            for task in ("clip", "ocr"):
                images = photos(args.images, task)
                await immich_request(session, immich, task, images[0])  # warm both paths
                await mtphotos_request(session, mt, task, images[0])
                rates = {"immich": [], "mtphotos": []}
                sides = [("immich", immich_request, immich), ("mtphotos", mtphotos_request, mt)]
                for r in range(args.rounds):
                    for name, send, base in (sides if r % 2 == 0 else sides[::-1]):
                        rates[name].append(await throughput(send, session, base, task, images, args.clients))
                im, mtp = statistics.median(rates["immich"]), statistics.median(rates["mtphotos"])
                print(f"{task:5s} Immich /predict {im:8.1f} img/s   MT Photos {MT_ROUTES[task]:9s} {mtp:8.1f} img/s"
                      f"   ratio MT Photos / Immich {mtp / im:.2f}", flush=True)
    finally:
        await mt_runner.cleanup()
        await immich_runner.cleanup()
        await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", help="a models folder with clip/ViT-B-16 (else the tiny stand-in)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--providers", help="e.g. cuda,cpu (default: CNAI_PROVIDERS or cpu)")
    args = parser.parse_args()
    if args.images < 1 or args.clients < 1 or args.rounds < 1:
        parser.error("--images, --clients and --rounds must be at least 1")
    asyncio.run(main(args))
