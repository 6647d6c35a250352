"""Settings take Immich's model names as Immich writes them and keep them in the form the gateway compares."""
from __future__ import annotations

import pytest

from cnai.settings import Settings
from cnai.wiring import build_handlers, build_pool


async def test_immich_spellings_of_model_names_are_cleaned(monkeypatch):
    monkeypatch.setenv("CNAI_FACE_MODEL", "immich-app/buffalo_s")
    monkeypatch.setenv("CNAI_CLIP_SERVE_AS", " immich-app/ViT-B-16__openai , ViT-B-32::openai,")
    settings = Settings()
    assert settings.face_model == "buffalo_s"
    assert settings.clip_serve_as == ["ViT-B-16__openai", "ViT-B-32__openai"]
    pool = build_pool(settings)
    try:
        handler = build_handlers(settings)["face"]
        assert handler.model_key == "face:buffalo_s" and pool.has(handler.model_key)
    finally:
        await pool.close()


# Each documented model / gateway setting, from the environment to the object that acts on it (the listener's
# settings are checked the same way in tests/test_listener.py).
async def built(monkeypatch, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    return settings, build_pool(settings)


async def test_providers_and_threads_reach_every_model(monkeypatch, tmp_path):
    settings, pool = await built(monkeypatch, CNAI_PROVIDERS="cuda,cpu", CNAI_INTRA_OP_THREADS="3",
                                 CNAI_MODELS_DIR=str(tmp_path))
    try:
        for key in ("ocr", f"clip-visual:{settings.clip_model}", f"clip-textual:{settings.clip_model}"):
            runtime = pool.model(key).runtime
            assert (runtime.providers, runtime.intra_op_threads) == (["cuda", "cpu"], 3), key
    finally:
        await pool.close()


async def test_model_names_and_folder_reach_the_handlers_the_pool_and_the_gateway(monkeypatch, tmp_path):
    from cnai.wiring import build_gateway
    settings, pool = await built(monkeypatch, CNAI_MODELS_DIR=str(tmp_path), CNAI_CLIP_MODEL="my-clip",
                                 CNAI_FACE_MODEL="antelopev2", CNAI_UPSTREAM_ML_URL="http://ml:3003",
                                 CNAI_MODEL_IDLE_UNLOAD_S="90")
    try:
        handlers = build_handlers(settings)
        assert handlers["clip"].model_key == "clip-visual:my-clip"
        assert handlers["face"].model_key == "face:antelopev2"
        assert pool.model("clip-visual:my-clip").model_dir == tmp_path / "clip" / "my-clip"
        assert pool.idle_unload_s == 90
        config = build_gateway(pool, settings).config
        assert (config.clip_model, config.upstream_url) == ("my-clip", "http://ml:3003")
    finally:
        await pool.close()


async def test_score_thresholds_reach_the_jobs(monkeypatch, tmp_path):
    settings, pool = await built(monkeypatch, CNAI_OCR_MIN_DETECTION_SCORE="0.4",
                                 CNAI_OCR_MIN_RECOGNITION_SCORE="0.6", CNAI_OCR_MAX_RESOLUTION="1024",
                                 CNAI_FACE_MIN_SCORE="0.55")
    await pool.close()
    handlers = build_handlers(settings)
    ocr = handlers["ocr"].request(None)
    assert (ocr.det_min_score, ocr.rec_min_score, ocr.max_resolution) == (0.4, 0.6, 1024)
    assert handlers["face"].request(None) == (None, 0.55)


async def test_front_settings_reach_the_front(monkeypatch, tmp_path):
    from cnai.wiring import build_front
    settings, pool = await built(monkeypatch, CNAI_MODELS_DIR=str(tmp_path), CNAI_IMMICH_URL="http://immich:2283/",
                                 CNAI_FRONT_PORT="2283", CNAI_FRONT_TIMEOUT_S="4", CNAI_CLIP_MODEL="my-clip")
    try:
        assert settings.front_port == 2283
        front = build_front(pool, settings, "postgresql://cnai@db/immich")
        assert (front.config.immich_url, front.config.timeout_s) == ("http://immich:2283", 4)
        assert (front.config.clip_text_key, front.config.clip_model) == ("clip-textual:my-clip", "cn-clip/my-clip")
        assert (front.db.dsn, front.db.timeout_s) == ("postgresql://cnai@db/immich", 4)
    finally:
        await pool.close()


def test_immich_url_is_a_base_url(monkeypatch):
    monkeypatch.setenv("CNAI_IMMICH_URL", " http://immich-server:2283/ ")
    assert Settings().immich_url == "http://immich-server:2283"
    monkeypatch.setenv("CNAI_IMMICH_URL", "https://photos.example/immich")
    assert Settings().immich_url == "https://photos.example/immich"
    for bad, says in (("immich-server:2283", "must look like"), ("http://immich-server:2283/api", "without /api"),
                      ("ftp://immich", "must look like"), ("http://immich?x=1", "must look like")):
        monkeypatch.setenv("CNAI_IMMICH_URL", bad)
        with pytest.raises(SystemExit, match=says):
            Settings()
    monkeypatch.delenv("CNAI_IMMICH_URL")
    assert Settings().immich_url == "" and Settings().front_port == 0
    for name, bad in (("CNAI_FRONT_TIMEOUT_S", "0"), ("CNAI_FRONT_PORT", "70000")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SystemExit, match=name):
            Settings()
        monkeypatch.delenv(name)
