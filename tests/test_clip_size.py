"""cnai stores and serves 512-d CLIP only: a CLIP model of another size, or a served Immich name of another size,
stops `cnai serve` / `gateway` / `listen` at start with one line; a missing model does not."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from cnai.embedded import _free_port
from cnai.settings import Settings
from cnai.wiring import build_pool, clip_import_note, clip_start_problem
from inference.clip import ClipTextual, ClipVisual
from tests.clip_fixtures import build_clip, save_official, tiny_vit
from tests.conftest import stop_process

pytest.importorskip("cn_clip")


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    """Two tiny official-format models through the real importer: one 768-d (like ViT-L-14), one 512-d."""
    from inference.clip.export import import_checkpoint
    work = tmp_path_factory.mktemp("clip-sizes")
    for name, dim in (("wide-768", 768), ("tiny-512", 512)):
        config = tiny_vit(dim)
        ckpt = save_official(build_clip(config, seed=dim), work / f"{name}.pt")
        import_checkpoint(ckpt, name, work / "models", model_config=config)
    return work / "models"


def service_env(models_dir, **env) -> dict:
    return {**os.environ, "CNAI_MODELS_DIR": str(models_dir), "CNAI_UPSTREAM_ML_URL": "", **env}


def start_gateway(env: dict) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnai", "gateway", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, port


def refused(env: dict) -> str:
    """Run `cnai gateway`, expect it to stop by itself with an error, and return its last stderr line."""
    proc, _ = start_gateway(env)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None), (out, err)
    assert "Traceback" not in err, err
    assert "listening" not in out, out
    return err.strip().splitlines()[-1]


def test_gateway_refuses_a_768d_model_with_one_line(clip_models):
    line = refused(service_env(clip_models, CNAI_CLIP_MODEL="wide-768"))
    assert line.startswith("cnai: CLIP model wide-768 (CNAI_CLIP_MODEL) makes 768-d embeddings"), line
    assert "512-d CLIP only" in line and "--arch ViT-B-16" in line


def test_gateway_refuses_a_served_name_of_another_size(clip_models):
    line = refused(service_env(clip_models, CNAI_CLIP_MODEL="tiny-512",
                               CNAI_CLIP_SERVE_AS="ViT-B-32__openai,ViT-L-14__openai"))
    assert line.startswith("cnai: CNAI_CLIP_SERVE_AS: Immich sizes ViT-L-14__openai at 768-d"), line


def test_gateway_starts_with_a_512d_model(clip_models):
    proc, port = start_gateway(service_env(clip_models, CNAI_CLIP_MODEL="tiny-512"))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    assert r.read() == b"pong"
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.3)
    finally:
        stop_process(proc, 30)


def settings_for(models_dir, clip_model: str, tasks=("clip", "ocr", "face"), serve_as=None) -> Settings:
    s = Settings()
    s.models_dir = models_dir
    s.clip_model = clip_model
    s.tasks = list(tasks)
    if serve_as is not None:
        s.clip_serve_as = serve_as
    return s


async def check(settings: Settings, serving: bool) -> str | None:
    pool = build_pool(settings)
    try:
        return clip_start_problem(pool, settings, serving)
    finally:
        await pool.close()


async def test_what_the_start_check_refuses(clip_models, tmp_path):
    # the listener stores 512-d only; a listener not doing CLIP does not care
    assert "768-d" in await check(settings_for(clip_models, "wide-768"), serving=False)
    assert await check(settings_for(clip_models, "wide-768", tasks=["ocr"]), serving=False) is None
    assert "768-d" in await check(settings_for(clip_models, "wide-768", tasks=["ocr"]), serving=True)
    assert await check(settings_for(clip_models, "tiny-512"), serving=True) is None
    # a missing model fails its own jobs, it does not stop the service
    assert await check(settings_for(tmp_path, "ViT-B-16"), serving=True) is None
    # served names: every one must be a 512-d name Immich knows
    unknown = await check(settings_for(clip_models, "tiny-512", serve_as=["ViT-B-32__openai", "my-model"]), False)
    assert unknown.startswith("CNAI_CLIP_SERVE_AS: 'my-model' is not a CLIP model Immich knows"), unknown
    wide = await check(settings_for(tmp_path, "ViT-B-16", serve_as=["XLM-Roberta-Large-Vit-B-16Plus"]), True)
    assert "640-d" in wide
    assert await check(settings_for(clip_models, "tiny-512", serve_as=[]), True) is None


def test_load_checks_the_graph_against_the_config(clip_models, tmp_path):
    # a config that claims 512 over a 768-d graph: the model refuses to load rather than write the wrong size
    lying = tmp_path / "clip" / "lying"
    shutil.copytree(clip_models / "clip" / "wide-768", lying)
    cfg = json.loads((lying / "config.json").read_text(encoding="utf-8"))
    (lying / "config.json").write_text(json.dumps({**cfg, "embed_dim": 512}), encoding="utf-8")
    for cls in (ClipVisual, ClipTextual):
        model = cls(lying)
        with pytest.raises(ValueError, match=r"returns 768-d embeddings .* says embed_dim 512"):
            model.load()
        assert not model.loaded
    good = ClipVisual(clip_models / "clip" / "wide-768")
    good.load()
    assert good.embed_dim == 768


def test_import_clip_notes_archs_cnai_cannot_serve(tmp_path):
    assert clip_import_note("ViT-B-16") is None
    for arch, dim in (("ViT-L-14", 768), ("ViT-L-14-336", 768), ("ViT-H-14", 1024), ("RN50", 1024)):
        note = clip_import_note(arch)
        assert note.startswith(f"note: {arch} makes {dim}-d embeddings") and "512-d CLIP only" in note, note
    # through the command: the note comes before the (here failing: a tiny checkpoint is no ViT-L-14) export
    ckpt = save_official(build_clip(tiny_vit(512)), tmp_path / "tiny.pt")
    run = subprocess.run([sys.executable, "-m", "cnai", "models", "import-clip", str(ckpt), "--arch", "ViT-L-14"],
                         env=service_env(tmp_path / "models"), capture_output=True, text=True, timeout=300)
    assert any(line.startswith("note: ViT-L-14 makes 768-d embeddings") for line in run.stderr.splitlines()), \
        run.stderr
