"""Settings from the environment (CNAI_*), overridable by CLI flags."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from gateway.immich_models import DEFAULT_CLIP_SERVE_AS, IMMICH_DEFAULT_FACE
from gateway.protocol import clean_name
from inference import defaults
from listener.task_names import DEFAULT_TASKS, TASKS
from models.catalogue import DEFAULT_MIRROR


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _float(name: str, default: float) -> float:
    raw = _env(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}")


def _int(name: str, default: int) -> int:
    return int(_float(name, default))


def parse_immich_url(raw: str) -> str:
    """CNAI_IMMICH_URL: Immich's base URL as cnai reaches it, e.g. http://immich-server:2283 (no /api)."""
    raw = raw.strip().rstrip("/")
    if not raw:
        return ""
    url = URL(raw)
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise SystemExit(f"CNAI_IMMICH_URL must look like http://immich-server:2283, got {raw!r}")
    if url.path.rstrip("/").endswith("/api"):
        raise SystemExit(f"CNAI_IMMICH_URL is Immich's base URL, without /api: {str(url.parent)!r}, not {raw!r}")
    return raw


def parse_path_map(raw: str) -> list[tuple[str, Path]]:
    """CNAI_PATH_MAP: 'immich_prefix=local_dir[,immich_prefix=local_dir...]'."""
    pairs = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if "=" not in part:
            raise SystemExit(f"CNAI_PATH_MAP entry {part!r} must look like /usr/src/app/upload=/mnt/immich")
        remote, local = part.split("=", 1)
        pairs.append((remote.rstrip("/") or "/", Path(local)))
    return pairs


@dataclass
class Settings:
    dsn: str = field(default_factory=lambda: _env("CNAI_DSN"))
    models_dir: Path = field(default_factory=lambda: Path(
        _env("CNAI_MODELS_DIR") or Path.home() / ".local" / "share" / "cnai" / "models"))
    path_map: list[tuple[str, Path]] = field(default_factory=lambda: parse_path_map(_env("CNAI_PATH_MAP")))
    providers: list[str] = field(default_factory=lambda: [
        p.strip() for p in _env("CNAI_PROVIDERS", "cpu").split(",") if p.strip()])
    intra_op_threads: int = field(default_factory=lambda: _int("CNAI_INTRA_OP_THREADS", 0))
    # models
    clip_model: str = field(default_factory=lambda: _env("CNAI_CLIP_MODEL", defaults.CLIP_MODEL))
    # Immich CLIP names answered with our cn-clip model (512-d names only: Immich sizes its column by name),
    # written as Immich writes them or as its config holds them (immich-app/ViT-B-32__openai)
    clip_serve_as: list[str] = field(default_factory=lambda: [
        clean_name(n.strip()) for n in _env("CNAI_CLIP_SERVE_AS", ",".join(DEFAULT_CLIP_SERVE_AS)).split(",")
        if n.strip()])
    face_model: str = field(default_factory=lambda: clean_name(_env("CNAI_FACE_MODEL", IMMICH_DEFAULT_FACE).strip()))
    face_min_score: float = field(default_factory=lambda: _float("CNAI_FACE_MIN_SCORE", defaults.FACE_MIN_SCORE))
    # the listener asks what Immich's server asks by default, so its results match Immich's own
    ocr_det_min_score: float = field(default_factory=lambda: _float("CNAI_OCR_MIN_DETECTION_SCORE",
                                                                    defaults.OCR_DET_MIN_SCORE))
    ocr_rec_min_score: float = field(default_factory=lambda: _float("CNAI_OCR_MIN_RECOGNITION_SCORE",
                                                                    defaults.OCR_REC_MIN_SCORE_CONFIGURED))
    ocr_max_resolution: int = field(default_factory=lambda: _int("CNAI_OCR_MAX_RESOLUTION",
                                                                 defaults.OCR_MAX_RESOLUTION))
    preload: bool = field(default_factory=lambda: _env("CNAI_PRELOAD", "1") not in ("0", "false", "no"))
    idle_unload_s: float = field(default_factory=lambda: _float("CNAI_MODEL_IDLE_UNLOAD_S", 0))
    # `cnai models pull`: where models come from (official | huggingface | modelscope), or an in-house mirror
    model_mirror: str = field(default_factory=lambda: _env("CNAI_MODEL_MIRROR", DEFAULT_MIRROR).strip().lower())
    model_base_url: str = field(default_factory=lambda: _env("CNAI_MODEL_BASE_URL").strip())
    # results shared by the gateway and the listener (one inference per photo and task); 0 MB: off
    result_cache_mb: float = field(default_factory=lambda: _float("CNAI_RESULT_CACHE_MB", defaults.RESULT_CACHE_MB))
    result_cache_ttl_s: float = field(default_factory=lambda: _float("CNAI_RESULT_CACHE_TTL_S",
                                                                     defaults.RESULT_CACHE_TTL_S))
    # the longest a background batch waits for a person's request (a search) to finish; 0: never waits
    background_yield_s: float = field(default_factory=lambda: _float("CNAI_BACKGROUND_YIELD_S",
                                                                     defaults.BACKGROUND_YIELD_S))
    # gateway
    host: str = field(default_factory=lambda: _env("CNAI_HOST", "0.0.0.0"))
    port: int = field(default_factory=lambda: _int("CNAI_PORT", 3003))
    upstream_ml_url: str = field(default_factory=lambda: _env("CNAI_UPSTREAM_ML_URL"))
    # front: Immich's search box answered by cnai (on the gateway's port; the front door on its own)
    immich_url: str = field(default_factory=lambda: parse_immich_url(_env("CNAI_IMMICH_URL")))
    front_port: int = field(default_factory=lambda: _int("CNAI_FRONT_PORT", 0))  # 0: no front door
    front_timeout_s: float = field(default_factory=lambda: _float("CNAI_FRONT_TIMEOUT_S", 10.0))
    # MT Photos' AI API on its own port, only when a key is set (no default key: unset means off)
    mtphotos_api_key: str = field(default_factory=lambda: _env("CNAI_MTPHOTOS_API_KEY").strip())
    mtphotos_port: int = field(default_factory=lambda: _int("CNAI_MTPHOTOS_PORT", 8060))
    # listener
    tasks: list[str] = field(default_factory=lambda: [
        t.strip() for t in _env("CNAI_TASKS", ",".join(DEFAULT_TASKS)).split(",") if t.strip()])
    batch_size: int = field(default_factory=lambda: _int("CNAI_BATCH_SIZE", 16))
    concurrency: int = field(default_factory=lambda: _int("CNAI_CONCURRENCY", 2))
    poll_interval_s: float = field(default_factory=lambda: _float("CNAI_POLL_INTERVAL_S", 2.0))
    lease_s: float = field(default_factory=lambda: _float("CNAI_LEASE_S", 60.0))
    max_attempts: int = field(default_factory=lambda: _int("CNAI_MAX_ATTEMPTS", 5))
    backoff_base_s: float = field(default_factory=lambda: _float("CNAI_BACKOFF_BASE_S", 5.0))
    prune_after_s: float = field(default_factory=lambda: _float("CNAI_PRUNE_AFTER_S", 7 * 86400))
    # below Docker's default 10 s between SIGTERM and SIGKILL, so the batch in hand is handed back in time
    stop_grace_s: float = field(default_factory=lambda: _float("CNAI_STOP_GRACE_S", 8.0))

    def __post_init__(self) -> None:
        # a listener that claims nothing, or gives up before its first attempt, is a mistake: say so at start
        for name, value, least in (("CNAI_BATCH_SIZE", self.batch_size, 1), ("CNAI_CONCURRENCY", self.concurrency, 1),
                                   ("CNAI_MAX_ATTEMPTS", self.max_attempts, 1),
                                   ("CNAI_BACKOFF_BASE_S", self.backoff_base_s, 0),
                                   ("CNAI_STOP_GRACE_S", self.stop_grace_s, 0),
                                   ("CNAI_RESULT_CACHE_MB", self.result_cache_mb, 0),
                                   ("CNAI_BACKGROUND_YIELD_S", self.background_yield_s, 0)):
            if value < least:
                raise SystemExit(f"{name} must be at least {least}, got {value}")
        for name, value in (("CNAI_LEASE_S", self.lease_s), ("CNAI_POLL_INTERVAL_S", self.poll_interval_s),
                            ("CNAI_PRUNE_AFTER_S", self.prune_after_s), ("CNAI_FRONT_TIMEOUT_S", self.front_timeout_s),
                            ("CNAI_RESULT_CACHE_TTL_S", self.result_cache_ttl_s)):
            if value <= 0:
                raise SystemExit(f"{name} must be more than 0, got {value}")
        if not 0 <= self.front_port <= 65535:
            raise SystemExit(f"CNAI_FRONT_PORT must be a port number (or unset: no front door), got {self.front_port}")
        if not 1 <= self.mtphotos_port <= 65535:
            raise SystemExit(f"CNAI_MTPHOTOS_PORT must be a port number, got {self.mtphotos_port}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise SystemExit(f"CNAI_TASKS={','.join(self.tasks)!r}: name one or more of {', '.join(TASKS)}")
