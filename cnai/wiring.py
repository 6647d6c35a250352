"""Builds the parts from settings: one model pool, the task handlers, the gateway and the listener."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from gateway.app import Gateway, GatewayConfig
from gateway.immich_models import IMMICH_DEFAULT_CLIP, IMMICH_FACE_MODELS
from gateway.protocol import clean_name
from inference.ocr import OcrModel
from inference.pool import ModelPool
from inference.runtime import RuntimeOptions
from listener.tasks import ClipHandler, FaceHandler, OcrHandler
from listener.worker import Listener, ListenerConfig

from .settings import Settings

log = logging.getLogger(__name__)


def runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(providers=settings.providers, intra_op_threads=settings.intra_op_threads,
                          cache_dir=settings.models_dir / ".trt-cache")


def build_pool(settings: Settings) -> ModelPool:
    pool = ModelPool(idle_unload_s=settings.idle_unload_s)
    rt = runtime_options(settings)
    pool.register("ocr", lambda: OcrModel(rt, max_batch=4))

    def clip_dir() -> Path:
        return settings.models_dir / "clip" / settings.clip_model

    def visual():
        from inference.clip import ClipVisual
        return ClipVisual(clip_dir(), rt)

    def textual():
        from inference.clip import ClipTextual
        return ClipTextual(clip_dir(), rt)

    pool.register(f"clip-visual:{settings.clip_model}", visual)
    pool.register(f"clip-textual:{settings.clip_model}", textual)

    class _FaceFactory:
        def __init__(self, name):
            self.name = name

        def __call__(self):
            from inference.face import FaceModel, find_face_pack
            return FaceModel(find_face_pack(settings.models_dir, self.name), rt)

    for name in {settings.face_model, *IMMICH_FACE_MODELS}:
        pool.register(f"face:{name}", _FaceFactory(name))
    return pool


def preload_keys(settings: Settings) -> list[str]:
    keys = []
    if "ocr" in settings.tasks:
        keys.append("ocr")
    if "clip" in settings.tasks:
        keys += [f"clip-visual:{settings.clip_model}", f"clip-textual:{settings.clip_model}"]
    if "face" in settings.tasks:
        keys.append(f"face:{settings.face_model}")
    return keys


def build_gateway(pool: ModelPool, settings: Settings) -> Gateway:
    return Gateway(pool, GatewayConfig(ocr_key="ocr", clip_model=settings.clip_model,
                                       clip_serve_as=settings.clip_serve_as,
                                       upstream_url=settings.upstream_ml_url))


async def immich_clip_model(conn) -> str:
    """The CLIP model Immich is configured to use (system-config JSON), or its default."""
    row = await conn.fetchval("SELECT value FROM system_metadata WHERE key = 'system-config'")
    if row:
        cfg = json.loads(row) if isinstance(row, str) else row
        name = ((cfg.get("machineLearning") or {}).get("clip") or {}).get("modelName")
        if name:
            return clean_name(name)
    return IMMICH_DEFAULT_CLIP


async def mirror_clip_to_immich(conn, settings: Settings) -> bool:
    """Fill smart_search too only when Immich's CLIP model is one our gateway answers with the same cn-clip model
    and the column has our dimension: never mix vectors of two models in one column."""
    name = await immich_clip_model(conn)
    if name not in settings.clip_serve_as:
        return False
    dim = await conn.fetchval(
        """SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass('smart_search')
            AND a.attname = 'embedding'""")
    return dim == 512


def build_handlers(settings: Settings, mirror_clip: bool = False) -> dict:
    return {
        "ocr": OcrHandler("ocr", "ocr", settings.ocr_det_min_score, settings.ocr_rec_min_score,
                          settings.ocr_max_resolution, model_name="rapidocr"),
        "clip": ClipHandler("clip", f"clip-visual:{settings.clip_model}", model_name=f"cn-clip/{settings.clip_model}",
                            mirror_to_smart_search=mirror_clip),
        "face": FaceHandler("face", f"face:{settings.face_model}", model_name=settings.face_model,
                            min_score=settings.face_min_score),
    }


def build_listener(dsn: str, pool: ModelPool, settings: Settings, mirror_clip: bool = False) -> Listener:
    config = ListenerConfig(tasks=settings.tasks, path_map=settings.path_map, batch_size=settings.batch_size,
                            concurrency=settings.concurrency, poll_interval_s=settings.poll_interval_s,
                            lease_s=settings.lease_s, backoff_base_s=settings.backoff_base_s,
                            prune_after_s=settings.prune_after_s)
    return Listener(dsn, pool, build_handlers(settings, mirror_clip), config)
