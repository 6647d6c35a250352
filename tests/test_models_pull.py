"""`cnai models pull` and `cnai models list` against a local HTTP server: the real download code (Range requests,
resumes after a dropped connection, checksums, 404s) and the real installers (face pack zips and Immich's layout
unpacked and found by the service's face finder; a tiny cn-clip checkpoint in the official format converted)."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import pytest
from aiohttp import web

from models.catalogue import CATALOGUE, CHECKPOINT, MIRRORS, lookup
from models.download import DownloadError, client_session, download
from models.install import PullError, plan, pull
from tests.face_fixtures import build_detector, build_recogniser

REPO = Path(__file__).resolve().parents[1]


class FileServer:
    """Serves `files` (URL path → bytes) with Range support; records each request's Range header. `drop_after`
    (path → byte count) cuts the connection once after that many bytes; `ignore_range` answers 200 always."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        rng = request.headers.get("Range")
        self.requests.append((path, rng))
        if path not in self.files:
            raise web.HTTPNotFound()
        data = self.files[path]
        start = 0
        if rng and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_length = len(data) - start
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await resp.prepare(request)
        cut = self.drop_after.pop(path, None)
        if cut is not None:
            await resp.write(data[start:start + cut])
            request.transport.close()  # the connection drops mid-file
            return resp
        await resp.write(data[start:])
        await resp.write_eof()
        return resp


@pytest.fixture
async def server():
    fs = FileServer()
    app = web.Application()
    app.router.add_get("/{tail:.*}", fs.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fs.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield fs
    await runner.cleanup()


def payload(n: int = 300_000) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def face_zip(tmp_path: Path, inner: str = "") -> bytes:
    """A tiny pack in buffalo_l.zip's layout: the detector and recogniser at the top (or under `inner`/)."""
    det = build_detector(tmp_path / "src" / "det_10g.onnx")
    rec = build_recogniser(tmp_path / "src" / "w600k_r50.onnx")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in (det, rec):
            zf.write(f, f"{inner}{f.name}")
    return buf.getvalue()


async def run_cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cnai", *args, cwd=REPO, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    return proc.returncode, out.decode(), err.decode()


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code != 0
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


# -- the downloader --------------------------------------------------------------------------------------------

async def test_a_part_file_is_resumed_with_a_range_request(server, tmp_path):
    data = payload()
    server.files["/m/file.bin"] = data
    target = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:123_456])  # left by an interrupted run
    async with client_session("test") as s:
        got = await download(s, server.url + "/m/file.bin", target, progress=False)
    assert server.requests == [("/m/file.bin", "bytes=123456-")]
    assert target.read_bytes() == data
    assert got.sha256 == hashlib.sha256(data).hexdigest() and not got.sha256_checked
    assert not (tmp_path / "file.bin.part").exists()


async def test_a_dropped_connection_is_resumed_where_it_stopped(server, tmp_path):
    data = payload()
    server.files["/m/file.bin"] = data
    server.drop_after["/m/file.bin"] = 100_000
    target = tmp_path / "file.bin"
    async with client_session("test") as s:
        got = await download(s, server.url + "/m/file.bin", target, sha256=hashlib.sha256(data).hexdigest(),
                             retry_delay_s=0, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]
    assert target.read_bytes() == data and got.sha256_checked


async def test_a_server_that_ignores_range_gives_the_whole_file_again(server, tmp_path):
    data = payload()
    server.files["/m/file.bin"] = data
    server.ignore_range = True
    (tmp_path / "file.bin.part").write_bytes(b"x" * 5000)  # not a prefix of the file: must not be kept
    async with client_session("test") as s:
        await download(s, server.url + "/m/file.bin", tmp_path / "file.bin", progress=False)
    assert (tmp_path / "file.bin").read_bytes() == data


async def test_a_complete_part_file_is_finished_without_downloading_again(server, tmp_path):
    data = payload()
    server.files["/m/file.bin"] = data
    (tmp_path / "file.bin.part").write_bytes(data)
    async with client_session("test") as s:
        await download(s, server.url + "/m/file.bin", tmp_path / "file.bin", progress=False)
    assert server.requests == [("/m/file.bin", f"bytes={len(data)}-")]  # answered 416 with the total
    assert (tmp_path / "file.bin").read_bytes() == data


async def test_a_wrong_size_or_hash_is_refused_and_the_file_removed(server, tmp_path):
    data = payload()
    server.files["/m/file.bin"] = data
    async with client_session("test") as s:
        with pytest.raises(DownloadError, match="expected 999"):
            await download(s, server.url + "/m/file.bin", tmp_path / "a.bin", size=999, progress=False)
        with pytest.raises(DownloadError, match="SHA-256 is .* expected 0000"):
            await download(s, server.url + "/m/file.bin", tmp_path / "b.bin", sha256="0" * 64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- pull, as a person runs it ---------------------------------------------------------------------------------

async def test_pull_face_pack_installs_it_where_the_service_finds_it(server, tmp_path):
    server.files["/buffalo_l/buffalo_l.zip"] = face_zip(tmp_path)
    models = tmp_path / "models"
    env = {"CNAI_MODELS_DIR": str(models), "CNAI_MODEL_BASE_URL": server.url}
    code, out, err = await run_cli("models", "pull", "buffalo_l", env=env)
    assert code == 0, err
    assert "installed InsightFace buffalo_l" in out and "CNAI_FACE_MODEL=buffalo_l" in out
    assert "no published SHA-256, size checked" in err
    assert {p.name for p in (models / "face" / "buffalo_l").iterdir()} == {"det_10g.onnx", "w600k_r50.onnx"}
    assert not (models / ".downloads" / "buffalo_l").exists()
    assert [p.name for p in (models / "face").iterdir()] == ["buffalo_l"]  # no staging folder left

    code, out, err = await run_cli("models", "list", env=env)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("face  buffalo_l"))
    assert "512-d" in row and "servable" in row and str(models / "face" / "buffalo_l") in row
    assert "buffalo_l (CNAI_FACE_MODEL): installed, 512-d" in out
    assert "ViT-B-16 (CNAI_CLIP_MODEL): not installed: `cnai models pull ViT-B-16`" in out

    code, out, err = await run_cli("models", "pull", "buffalo_l", env=env)
    assert_one_line_error(code, err, "already installed", "--force")


async def test_pull_immich_layout_from_the_huggingface_mirror(server, tmp_path):
    build_detector(tmp_path / "det.onnx")
    build_recogniser(tmp_path / "rec.onnx")
    server.files["/antelopev2/detection/model.onnx"] = (tmp_path / "det.onnx").read_bytes()
    server.files["/antelopev2/recognition/model.onnx"] = (tmp_path / "rec.onnx").read_bytes()
    models = tmp_path / "models"
    code, out, err = await run_cli("models", "pull", "antelopev2", "--mirror", "huggingface",
                                   "--base-url", server.url, env={"CNAI_MODELS_DIR": str(models)})
    assert code == 0, err
    pack = models / "face" / "antelopev2"
    assert (pack / "detection" / "model.onnx").read_bytes() == (tmp_path / "det.onnx").read_bytes()
    assert (pack / "recognition" / "model.onnx").is_file()


async def test_pull_with_a_wrong_checksum_installs_nothing(server, tmp_path):
    server.files["/buffalo_l/buffalo_l.zip"] = face_zip(tmp_path)
    models = tmp_path / "models"
    code, out, err = await run_cli("models", "pull", "buffalo_l", "--sha256", "ab" * 32,
                                   env={"CNAI_MODELS_DIR": str(models), "CNAI_MODEL_BASE_URL": server.url})
    assert_one_line_error(code, err, "cnai models pull:", "SHA-256 is", "expected " + "ab" * 32,
                          "nothing was installed")
    assert not (models / "face").exists()
    assert not list((models / ".downloads").rglob("*.zip*"))


async def test_pull_of_a_missing_file_says_404(server, tmp_path):
    models = tmp_path / "models"
    code, out, err = await run_cli("models", "pull", "buffalo_s",
                                   env={"CNAI_MODELS_DIR": str(models), "CNAI_MODEL_BASE_URL": server.url})
    assert_one_line_error(code, err, "HTTP 404", f"{server.url}/buffalo_s/buffalo_s.zip")
    assert not (models / "face").exists()


async def test_pull_of_an_unknown_name_lists_the_catalogue(tmp_path):
    code, out, err = await run_cli("models", "pull", "ViT-X-99", env={"CNAI_MODELS_DIR": str(tmp_path)})
    assert_one_line_error(code, err, "ViT-X-99", "ViT-B-16", "buffalo_l")


async def test_a_zip_that_is_not_a_face_pack_is_not_installed(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("README.txt", "no models here")
    server.files["/buffalo_m/buffalo_m.zip"] = buf.getvalue()
    models = tmp_path / "models"
    code, out, err = await run_cli("models", "pull", "buffalo_m",
                                   env={"CNAI_MODELS_DIR": str(models), "CNAI_MODEL_BASE_URL": server.url})
    assert_one_line_error(code, err, "not a usable face pack")
    assert list((models / "face").iterdir()) == []
    assert not (models / ".downloads" / "buffalo_m").exists()


async def test_pull_clip_without_torch_says_what_to_install_before_downloading(server, tmp_path):
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named torch (hidden by the test)')\n")
    server.files["/ViT-B-16/clip_cn_vit-b-16.pt"] = b"never fetched"
    code, out, err = await run_cli("models", "pull", "ViT-B-16",
                                   env={"CNAI_MODELS_DIR": str(tmp_path / "models"), "CNAI_MODEL_BASE_URL": server.url,
                                        "PYTHONPATH": str(tmp_path / "shadow")})
    assert_one_line_error(code, err, "pip install 'cnai[convert]'")
    assert server.requests == []


async def test_pull_clip_converts_an_official_format_checkpoint(server, tmp_path):
    from tests.clip_fixtures import TINY_VIT, build_clip, save_official

    ckpt = save_official(build_clip(TINY_VIT), tmp_path / "clip_cn_vit-b-16.pt")
    data = ckpt.read_bytes()
    server.files["/ViT-B-16/clip_cn_vit-b-16.pt"] = data
    server.drop_after["/ViT-B-16/clip_cn_vit-b-16.pt"] = len(data) // 3
    models = tmp_path / "models"
    the_plan = plan(lookup("ViT-B-16"), "modelscope", server.url)
    pulled = await pull(the_plan, models, progress=False, clip_model_config=TINY_VIT, retry_delay_s=0,
                        sha256=hashlib.sha256(data).hexdigest())
    assert pulled.path == models / "clip" / "ViT-B-16"
    assert (pulled.path / "visual" / "model.onnx").is_file() and (pulled.path / "textual" / "model.onnx").is_file()
    assert [r for _, r in server.requests] == [None, f"bytes={len(data) // 3}-"]
    assert not (models / ".downloads" / "ViT-B-16").exists()

    code, out, err = await run_cli("models", "list", env={"CNAI_MODELS_DIR": str(models)})
    assert code == 0, err
    assert "ViT-B-16 (CNAI_CLIP_MODEL): installed, 32-d, not servable: cnai stores and serves 512-d CLIP only" in out


async def test_a_failed_conversion_leaves_no_model(server, tmp_path):
    server.files["/ViT-B-16/clip_cn_vit-b-16.pt"] = b"not a checkpoint" * 100
    models = tmp_path / "models"
    with pytest.raises(PullError, match="could not be converted"):
        await pull(plan(lookup("ViT-B-16"), None, server.url), models, progress=False)
    assert not (models / "clip").exists() or list((models / "clip").iterdir()) == []
    assert not (models / ".downloads" / "ViT-B-16").exists()  # a rerun fetches it again instead of reusing it


# -- the catalogue ---------------------------------------------------------------------------------------------

def test_catalogue_matches_cn_clip_and_the_mirrors():
    from inference.clip.export import ARCHES, arch_model_info

    clip = {e.name: e for e in CATALOGUE.values() if e.task == "clip"}
    assert set(clip) == set(ARCHES)
    for name, entry in clip.items():
        assert entry.embed_dim == arch_model_info(name)["embed_dim"]
        assert set(entry.sources) == set(MIRRORS)
        assert all(s.layout == CHECKPOINT for s in entry.sources.values())
    for entry in CATALOGUE.values():
        for source in entry.sources.values():
            for f in source.files:  # a hash is only ever one the publisher gave, and none publishes one
                assert f.sha256 is None and f.url.startswith("https://")
    assert lookup("vit-b-16").name == "ViT-B-16"
    note = plan(lookup("buffalo_l"), "modelscope").note
    assert note and "not on the modelscope mirror" in note
    with pytest.raises(PullError, match="unknown mirror"):
        plan(lookup("buffalo_l"), "nowhere")
