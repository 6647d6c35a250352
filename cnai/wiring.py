"""Builds the parts from settings: one model pool, the task handlers, the gateway and the listener."""
from __future__ import annotations

import logging
from pathlib import Path

from front.app import Front, FrontConfig
from front.database import FrontDatabase
from gateway.app import Gateway, GatewayConfig
from gateway.immich_models import DEFAULT_CLIP_SERVE_AS, IMMICH_FACE_MODELS, serve_as_problem
from inference import defaults
from inference.ocr import OcrModel
from inference.pool import ModelPool
from inference.runtime import ModelMissingError, RuntimeOptions
from listener.tasks import ClipHandler, FaceHandler, OcrHandler
from listener.worker import Listener, ListenerConfig
from mtphotos.app import MtPhotos, MtPhotosConfig

from .metrics import ServiceMetrics
from .settings import Settings
from .status_source import StatusDatabase

log = logging.getLogger(__name__)

# cnai.clip.embedding is vector(512) (sql/results/schema/200_result_tables.sql), and only 512-d Immich names may
# be served as (Immich sizes smart_search by the name): the one CLIP size cnai stores and serves.
CLIP_DIM = 512


def runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(providers=settings.providers, intra_op_threads=settings.intra_op_threads,
                          cache_dir=settings.models_dir / ".trt-cache")


def build_pool(settings: Settings) -> ModelPool:
    pool = ModelPool(idle_unload_s=settings.idle_unload_s,
                     result_cache_bytes=int(settings.result_cache_mb * 2**20),
                     result_cache_ttl_s=settings.result_cache_ttl_s,
                     background_yield_s=settings.background_yield_s)
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

    for name in face_packs(settings):
        pool.register(f"face:{name}", _FaceFactory(name))
    return pool


def face_packs(settings: Settings) -> list[str]:
    """The face packs cnai may run: Immich's own names and the one CNAI_FACE_MODEL names."""
    return sorted({settings.face_model, *IMMICH_FACE_MODELS})


def task_model_keys(settings: Settings) -> dict[str, list[str]]:
    """The pool keys of the models each task needs, for every task (requested in CNAI_TASKS or not)."""
    return {"ocr": ["ocr"],
            "clip": [f"clip-visual:{settings.clip_model}", f"clip-textual:{settings.clip_model}"],
            "face": [f"face:{settings.face_model}"]}


def preload_keys(settings: Settings) -> list[str]:
    return [key for task, keys in task_model_keys(settings).items() if task in settings.tasks for key in keys]


def build_gateway(pool: ModelPool, settings: Settings, metrics: ServiceMetrics | None = None,
                  status: StatusDatabase | None = None) -> Gateway:
    """The gateway, with `/metrics` (the pool and its requests; the listener and queue when `metrics` has them) and
    `/status` (its queue, search and retry button through `status`, when a database is named).
    It runs its models through `metrics.pool`, which times them."""
    metrics = metrics or ServiceMetrics(pool)
    gateway = Gateway(metrics.pool, GatewayConfig(ocr_key="ocr", clip_model=settings.clip_model,
                                                  clip_serve_as=settings.clip_serve_as,
                                                  face_packs=face_packs(settings),
                                                  upstream_url=settings.upstream_ml_url),
                      metrics=metrics.page, status=status)
    metrics.gateway_requests = gateway.requests
    return gateway


def build_mtphotos(pool: ModelPool, settings: Settings, metrics: ServiceMetrics | None = None) -> MtPhotos:
    """MT Photos' AI API on the same pool (and, through `metrics.pool`, the same timings) as Immich's gateway, asking
    OCR and faces what the listener asks, so their results are shared too."""
    config = MtPhotosConfig(api_key=settings.mtphotos_api_key, clip_key=f"clip-visual:{settings.clip_model}",
                            clip_text_key=f"clip-textual:{settings.clip_model}",
                            face_key=f"face:{settings.face_model}", face_model=settings.face_model,
                            face_min_score=settings.face_min_score, ocr_key="ocr",
                            ocr_det_min_score=settings.ocr_det_min_score,
                            ocr_rec_min_score=settings.ocr_rec_min_score,
                            ocr_max_resolution=settings.ocr_max_resolution)
    mtphotos = MtPhotos(metrics.pool if metrics else pool, config, device=",".join(settings.providers))
    if metrics is not None:
        metrics.mtphotos_requests = mtphotos.requests
    return mtphotos


def clip_result_model(settings: Settings) -> str:
    """How cnai.clip.model names the embeddings of the configured CLIP model."""
    return f"cn-clip/{settings.clip_model}"


def front_start_problem(settings: Settings) -> str | None:
    """Why the front cannot run with these settings, or None."""
    if settings.front_port and not settings.immich_url:
        return "CNAI_FRONT_PORT needs CNAI_IMMICH_URL (Immich's base URL) to pass requests to"
    return None


def build_front(pool: ModelPool, settings: Settings, dsn: str) -> Front:
    """Immich's search endpoints, answered from cnai.search; the front door's reprocess buttons queue work for the
    models this install's handlers record."""
    config = FrontConfig(immich_url=settings.immich_url, clip_text_key=f"clip-textual:{settings.clip_model}",
                         clip_model=clip_result_model(settings), timeout_s=settings.front_timeout_s,
                         task_models=task_models(settings))
    return Front(pool, config, FrontDatabase(dsn, settings.front_timeout_s))


def clip_start_problem(pool: ModelPool, settings: Settings, serving: bool) -> str | None:
    """Why the service must not start with these CLIP settings, or None.

    A CLIP model of another size than 512 would fail every job after all its tries (cnai.clip is 512-d) and,
    served under a 512-d Immich name, would hand Immich vectors its column cannot hold. A missing model is no
    reason: its own jobs fail with a clear message while OCR and faces keep working.
    """
    problem = serve_as_problem(settings.clip_serve_as, CLIP_DIM)
    if problem:
        return (f"CNAI_CLIP_SERVE_AS: {problem}; list only {CLIP_DIM}-d names, such as the default "
                f"{','.join(DEFAULT_CLIP_SERVE_AS)}")
    if not serving and "clip" not in settings.tasks:
        return None
    for key in (f"clip-visual:{settings.clip_model}", f"clip-textual:{settings.clip_model}"):
        try:
            dim = pool.model(key).embed_dim
        except ModelMissingError:
            continue
        except Exception as e:  # an unreadable config fails its jobs with the reason, like a missing model
            log.warning("cannot tell the size of CLIP model %s: %s", settings.clip_model, e)
            continue
        if dim != CLIP_DIM:
            return (f"CLIP model {settings.clip_model} (CNAI_CLIP_MODEL) makes {dim}-d embeddings, but cnai stores "
                    f"and serves {CLIP_DIM}-d CLIP only (cnai.clip is vector({CLIP_DIM}), and Immich sizes "
                    f"smart_search by the model name it asks for): import a {CLIP_DIM}-d model, e.g. "
                    f"`cnai models import-clip CHECKPOINT --arch {defaults.CLIP_MODEL}`")
    return None


async def refuse_bad_clip_setup(pool: ModelPool, settings: Settings, serving: bool) -> None:
    """Stop the start-up with one line (exit code 1) when `clip_start_problem` finds a reason."""
    problem = clip_start_problem(pool, settings, serving)
    if problem:
        await pool.close()
        raise SystemExit(f"cnai: {problem}")


def clip_import_note(arch: str) -> str | None:
    """A note for `cnai models import-clip` when `arch` makes embeddings cnai cannot store or serve."""
    try:
        from inference.clip.export import arch_model_info
        dim = int(arch_model_info(arch)["embed_dim"])
    except Exception:  # noqa: BLE001 - the import itself reports what is wrong (no cn_clip, unknown arch)
        return None
    if dim == CLIP_DIM:
        return None
    return (f"note: {arch} makes {dim}-d embeddings; cnai serve / gateway / listen accept {CLIP_DIM}-d CLIP only "
            f"(cnai.clip is vector({CLIP_DIM})) and will refuse to start with it; {defaults.CLIP_MODEL} is the "
            f"{CLIP_DIM}-d Chinese-CLIP")


def build_handlers(settings: Settings, mirror_clip: bool = False) -> dict:
    """mirror_clip: let CLIP results fill Immich's smart_search too, in the batches where Immich's model allows it."""
    return {
        "ocr": OcrHandler("ocr", "ocr", model_name="rapidocr", det_min_score=settings.ocr_det_min_score,
                          rec_min_score=settings.ocr_rec_min_score, max_resolution=settings.ocr_max_resolution),
        "clip": ClipHandler("clip", f"clip-visual:{settings.clip_model}", model_name=clip_result_model(settings),
                            smart_search_names=tuple(settings.clip_serve_as) if mirror_clip else ()),
        "face": FaceHandler("face", f"face:{settings.face_model}", model_name=settings.face_model,
                            min_score=settings.face_min_score),
    }


def task_models(settings: Settings) -> dict[str, str]:
    """Each task's model name as its handler records it in cnai.task_run (what `cnai.queue_missing` compares)."""
    return {task: handler.model_name for task, handler in build_handlers(settings).items()}


def listener_config(settings: Settings) -> ListenerConfig:
    return ListenerConfig(tasks=settings.tasks, path_map=settings.path_map, batch_size=settings.batch_size,
                          concurrency=settings.concurrency, poll_interval_s=settings.poll_interval_s,
                          lease_s=settings.lease_s, max_attempts=settings.max_attempts,
                          backoff_base_s=settings.backoff_base_s, grace_s=settings.stop_grace_s,
                          prune_after_s=settings.prune_after_s)


def build_listener(dsn: str, pool: ModelPool, settings: Settings, mirror_clip: bool = False) -> Listener:
    return Listener(dsn, pool, build_handlers(settings, mirror_clip), listener_config(settings))
