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
