"""End to end at full size: a random-weight ViT-B-16 checkpoint in the official format, imported and served.

Real weights cannot be downloaded here; random ones exercise the same graph, shapes, sizes and loading code.
Marked `slow` so it can be deselected (`-m "not slow"`), but it runs by default.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from inference.clip import ClipTextual, ClipVisual, find_clip_model
from inference.clip.export import ExportError, import_checkpoint
from tests.clip_fixtures import sample_images

pytest.importorskip("cn_clip")

TEXTS = ["一只可爱的小猫", "a photo of a dog", "北京天安门广场的夜景，灯火辉煌！", ""]


@pytest.mark.slow
def test_vit_b_16_end_to_end(tmp_path):
    import torch
    from cn_clip.clip.utils import create_model

    t0 = time.monotonic()
    torch.manual_seed(0)
    # cn-clip's own constructor for the released ViT-B-16 (fp16 weights, like the published file).
    model = create_model("ViT-B-16@RoBERTa-wwm-ext-base-chinese")
    ckpt = tmp_path / "clip_cn_vit-b-16.pt"
    torch.save({"epoch": 1, "step": 1, "name": "random",
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    del model
    t_ckpt = time.monotonic()

    models = tmp_path / "models"
    with pytest.raises(ExportError, match="It looks like ViT-B-16: pass --arch ViT-B-16"):
        import_checkpoint(ckpt, "RN50", models)
    # through the command a person runs
    env = {**os.environ, "CNAI_MODELS_DIR": str(models)}
    done = subprocess.run([sys.executable, "-m", "cnai", "models", "import-clip", str(ckpt), "--arch", "ViT-B-16"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CNAI_CLIP_MODEL=ViT-B-16" in done.stdout
    model_dir = models / "clip" / "ViT-B-16"
    t_import = time.monotonic()
    assert model_dir == find_clip_model(models, "ViT-B-16") == models / "clip" / "ViT-B-16"

    visual, textual = ClipVisual(model_dir), ClipTextual(model_dir)
    assert visual.embed_dim == textual.embed_dim == 512
    images = sample_images()
    img = np.stack(visual.run_batch(images))
    txt = np.stack(textual.run_batch(TEXTS))
    assert img.shape == (len(images), 512) and txt.shape == (len(TEXTS), 512)
    assert img.dtype == txt.dtype == np.float32
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-4)

    # Against cn-clip's own loader, run as cn-clip runs it.
    from cn_clip.clip import image_transform, tokenize

    ref = create_model("ViT-B-16@RoBERTa-wwm-ext-base-chinese",
                       torch.load(ckpt, map_location="cpu")).float().eval()
    with torch.no_grad():
        ri = ref.encode_image(torch.stack([image_transform(224)(im) for im in images[:2]])).numpy()
        rt = ref.encode_text(tokenize(TEXTS)).numpy()
    ri /= np.linalg.norm(ri, axis=1, keepdims=True)
    rt /= np.linalg.norm(rt, axis=1, keepdims=True)
    assert (img[:2] * ri).sum(1).min() >= 0.999
    assert (txt * rt).sum(1).min() >= 0.999
    # and the gateway serves it under an Immich CLIP name
    served = asyncio.run(_predict_text(models, "海边日落"))
    assert float(served @ textual.run_batch(["海边日落"])[0]) > 0.9999
    print(f"\nViT-B-16: checkpoint {t_ckpt - t0:.0f}s, import+verify {t_import - t_ckpt:.0f}s, "
          f"total {time.monotonic() - t0:.0f}s")


async def _predict_text(models, text: str) -> np.ndarray:
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    from cnai.settings import Settings
    from cnai.wiring import build_gateway, build_pool

    settings = Settings()
    settings.models_dir = models
    settings.clip_model = "ViT-B-16"
    pool = build_pool(settings)
    try:
        async with TestClient(TestServer(build_gateway(pool, settings).app())) as client:
            form = aiohttp.FormData()
            form.add_field("entries", json.dumps({"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}))
            form.add_field("text", text)
            r = await client.post("/predict", data=form)
            assert r.status == 200, await r.text()
            return np.array(json.loads((await r.json())["clip"]), dtype=np.float32)
    finally:
        await pool.close()
