"""Settings take Immich's model names as Immich writes them and keep them in the form the gateway compares."""
from __future__ import annotations

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
