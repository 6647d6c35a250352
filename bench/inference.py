#!/usr/bin/env python
"""Inference benchmark: the bare model vs the same model through the pool, side by side in one run.

For each model: items/s of the bare model (its own run_batch, no pool) at its best batch size vs the pool with
1, 8 and 32 concurrent callers (ratio pool/bare); then the wait of an interactive request while a background
backfill saturates the same model, compared with one batch's duration.

Models: the real cn-clip ViT-B-16 architecture (random weights, built and imported once into --models-dir, which
takes a few minutes the first time; speed does not depend on the weights), RapidOCR's real bundled models, and a
face pack from --models-dir if one is there (buffalo_l), else the tiny stand-ins used by the tests (labelled).

    python bench/inference.py [--models-dir DIR] [--images N] [--providers cuda,cpu]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# run as a script: import the project, and don't let bench/queue.py shadow the standard library's queue
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from inference.clip import ClipTextual, ClipVisual  # noqa: E402
from inference.face import FaceModel, find_face_pack  # noqa: E402
from inference.ocr import OcrModel, OcrRequest  # noqa: E402
from inference.pool import ModelPool, Priority  # noqa: E402
from inference.runtime import RuntimeOptions  # noqa: E402


def ensure_vit_b_16(models_dir: Path) -> Path:
    target = models_dir / "clip" / "ViT-B-16"
    if (target / "config.json").is_file():
        return target
    import torch
    from cn_clip.clip.utils import create_model

    from inference.clip.export import import_checkpoint
    print("building a random-weight ViT-B-16 checkpoint in the official format and importing it (once)...",
          flush=True)
    torch.manual_seed(0)
    model = create_model("ViT-B-16@RoBERTa-wwm-ext-base-chinese")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "clip_cn_vit-b-16.pt"
        torch.save({"epoch": 1, "step": 1, "name": "random",
                    "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
        del model
        return import_checkpoint(ckpt, "ViT-B-16", models_dir)


def face_pack(models_dir: Path):
    """A real pack from the models dir if there is one; else the tests' tiny stand-ins (shapes and I/O names of
    buffalo_l, not its size), so the pool's overhead is still measured on real ONNX sessions."""
    try:
        return find_face_pack(models_dir, "buffalo_l"), "buffalo_l"
    except Exception:
        from tests.face_fixtures import build_detector, build_recogniser
        d = models_dir / "face" / "tiny-stand-in"
        d.mkdir(parents=True, exist_ok=True)
        build_detector(d / "det_10g.onnx")
        build_recogniser(d / "w600k_r50.onnx")
        return find_face_pack(models_dir, "tiny-stand-in"), "tiny stand-in"


def photos(n: int, size=(1440, 1080)) -> list[Image.Image]:
    rnd = np.random.default_rng(0)
    font = None
    for f in ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"):
        if Path(f).exists():
            font = ImageFont.truetype(f, 56)
    out = []
    for i in range(n):
        arr = (rnd.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)
        d = ImageDraw.Draw(img)
        d.rectangle((60, 60, 1100, 330), fill="white")
        d.text((90, 90), f"增值税发票 No.{i:05d}", font=font, fill="black")
        d.text((90, 200), "海边日落 Sunset 合计 128元", font=font, fill="black")
        out.append(img)
    return out


def bare_rate(model, items: list, batch: int) -> float:
    model.run_batch(items[:batch])  # warm-up
    t = time.perf_counter()
    for start in range(0, len(items), batch):
        model.run_batch(items[start:start + batch])
    return len(items) / (time.perf_counter() - t)


async def pool_rate(pool: ModelPool, key: str, items: list, callers: int) -> float:
    queue = list(items)

    async def caller():
        while queue:
            item = queue.pop()
            await pool.run(key, item)

    await pool.run(key, items[0])  # warm-up
    t = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(items) / (time.perf_counter() - t)


async def interactive_wait(pool: ModelPool, key: str, background_items: list, probe, probes: int,
                           probe_key: str | None = None) -> tuple[list[float], float]:
    """Latencies of interactive requests sent while a background flood keeps `key` saturated."""
    flood = [asyncio.create_task(pool.run(key, it, Priority.BACKGROUND)) for it in background_items]
    await asyncio.sleep(0.5)
    lat = []
    for _ in range(probes):
        t = time.perf_counter()
        await pool.run(probe_key or key, probe, Priority.INTERACTIVE)
        lat.append(time.perf_counter() - t)
        await asyncio.sleep(0.05)
    for f in flood:
        f.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    return lat, 0.0


def fmt(x: float) -> str:
    return f"{x:8.1f}"


async def bench_model(name: str, model_factory, items: list, batches: list[int], callers=(1, 8, 32)) -> dict:
    bare_model = model_factory()
    bare_model.load()
    rates = {b: bare_rate(bare_model, items, b) for b in batches}
    best_b = max(rates, key=rates.get)
    bare_model.unload()
    pool = ModelPool()
    pool.register(name, model_factory)
    await pool.preload([name])
    via_pool = {c: await pool_rate(pool, name, items, c) for c in callers}
    stats = pool.stats()[name]
    await pool.close()
    return {"name": name, "bare": rates, "best_batch": best_b, "pool": via_pool,
            "avg_batch": stats.items / max(stats.batches, 1)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "cnai-bench-models")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--providers", default="cpu")
    args = ap.parse_args()
    rt = RuntimeOptions(providers=args.providers.split(","))
    import onnxruntime as ort
    print(f"ONNX Runtime {ort.__version__}, providers {rt.providers}; {args.images} images of 1440x1080 "
          "(Immich's preview size)\n", flush=True)

    clip_dir = ensure_vit_b_16(args.models_dir)
    imgs = photos(args.images)
    texts = [f"海边日落的照片 {i}" if i % 2 else f"a photo of an invoice number {i}" for i in range(args.images * 4)]
    results = []
    results.append(await bench_model("clip-visual:ViT-B-16", lambda: ClipVisual(clip_dir, rt, max_batch=32), imgs,
                                     [1, 8, 16, 32]))
    results.append(await bench_model("clip-textual:ViT-B-16", lambda: ClipTextual(clip_dir, rt, max_batch=32), texts,
                                     [1, 8, 32]))
    ocr_items = [OcrRequest(im) for im in imgs[: max(8, args.images // 4)]]
    results.append(await bench_model("ocr", lambda: OcrModel(rt, max_batch=4), ocr_items, [1, 4], callers=(1, 8)))
    pack, pack_label = face_pack(args.models_dir)
    if pack_label == "buffalo_l":
        face_items = [(im, 0.7) for im in imgs]
    else:  # the stand-in "sees a face" in every bright 32-px cell: give it photos with three faces, not noise
        from tests.face_fixtures import BLUE, canvas
        face_items = [(Image.fromarray(canvas(1440, 1080, [(90 * (i % 8) + 45 * k, 180 * k + 90, 90, 90, BLUE)
                                                          for k in range(3)])), 0.7) for i in range(len(imgs))]
    results.append(await bench_model(f"face:{pack.name}", lambda: FaceModel(pack, rt, max_batch=8), face_items,
                                     [1, 8], callers=(1, 8, 32)))

    print(f"{'model':24s} {'bare best':>10s} {'@batch':>6s} " +
          " ".join(f"{'pool x' + str(c):>9s}" for c in (1, 8, 32)) +
          f" {'x8/bare8':>9s} {'x32/bare32':>10s} {'best/best':>9s}")
    for r in results:
        best = r["bare"][r["best_batch"]]
        cells = " ".join(f"{r['pool'][c]:9.1f}" if c in r["pool"] else f"{'-':>9s}" for c in (1, 8, 32))

        def same(n):
            b = r["bare"].get(n) or r["bare"].get(max(k for k in r["bare"] if k <= n))
            return f"{r['pool'][n] / b:.2f}" if n in r["pool"] else "-"
        print(f"{r['name']:24s} {best:10.1f} {r['best_batch']:6d} {cells} {same(8):>9s} {same(32):>10s} "
              f"{max(r['pool'].values()) / best:9.2f}")
    print(f"  face pack: {pack_label}")
    print("  items/s. bare: the model's own run_batch called in a loop, no pool; pool xN: N concurrent callers of one")
    print("  item each, batched by the pool. xN/bareN compares equal batch sizes (for OCR, bare at its largest batch).")
    for r in results:
        print(f"  {r['name']}: bare by batch " + ", ".join(f"{b}: {v:.1f}" for b, v in r["bare"].items()) +
              f"; pool average batch {r['avg_batch']:.1f}")

    # interactive priority under a saturated backfill
    pool = ModelPool()
    pool.register("v", lambda: ClipVisual(clip_dir, rt, max_batch=16))
    pool.register("t", lambda: ClipTextual(clip_dir, rt, max_batch=32))
    await pool.preload(["v", "t"])
    t = time.perf_counter()
    await pool.run_many("v", imgs[:16])
    batch_s = time.perf_counter() - t
    alone = []
    for _ in range(10):
        t = time.perf_counter()
        await pool.run("t", "海边日落", Priority.INTERACTIVE)
        alone.append(time.perf_counter() - t)
    text_lat, _ = await interactive_wait(pool, "v", imgs * 4, "海边日落", 10, probe_key="t")
    img_lat, _ = await interactive_wait(pool, "v", imgs * 4, imgs[0], 5)
    await pool.close()
    print("\ninteractive requests while a background image backfill saturates the visual model:")
    print(f"  one visual batch of 16 takes {batch_s * 1000:.0f} ms")
    print(f"  text embedding alone: p50 {statistics.median(alone) * 1000:.1f} ms")
    print(f"  text embedding under backfill: p50 {statistics.median(text_lat) * 1000:.1f} ms, "
          f"max {max(text_lat) * 1000:.1f} ms (own lane: shares only the CPU)")
    print(f"  image embedding (interactive) under backfill of the same model: p50 "
          f"{statistics.median(img_lat) * 1000:.0f} ms, max {max(img_lat) * 1000:.0f} ms "
          f"= {max(img_lat) / batch_s:.2f} batches (bound: the batch in flight + its own)")


if __name__ == "__main__":
    asyncio.run(main())
