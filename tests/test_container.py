"""The CPU image and compose.yml, built and run for real: scripts/build-images makes the image (base from Debian's
packages, wheels built here), compose runs it beside a stand-in of Immich's compose project (its `database` and
`immich-server` services, its .env), and one photo with Chinese text goes through to `cnai.search`.

Skips, saying why, where Docker can't be used (not installed, or dockerd not running and not startable as root).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

import sql as sql_files
from tests.conftest import render_text, wait_for, wait_until

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "container"
IMAGE = "cnai:test"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _run(cmd, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _docker_answers() -> bool:
    try:
        return _run(["docker", "info"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A usable Docker: the running dockerd, or one this fixture starts (as root) and stops afterwards."""
    if not shutil.which("docker"):
        pytest.skip("docker is not installed (as root, scripts/setup --test installs docker.io)")
    started = None
    if not _docker_answers():
        if os.geteuid() != 0:
            pytest.skip("dockerd is not running, and only root may start it")
        if not shutil.which("dockerd"):
            pytest.skip("dockerd is not installed (as root, scripts/setup --test installs docker.io)")
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log, "w") as out:
            started = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _docker_answers():
            if started.poll() is not None or time.monotonic() > deadline:
                started.terminate()
                pytest.skip(f"dockerd did not start: {log.read_text()[-1500:]}")
            time.sleep(0.5)
    yield
    if started:
        started.terminate()
        try:
            started.wait(60)
        except subprocess.TimeoutExpired:
            started.kill()


@pytest.fixture(scope="module")
def compose_command(docker) -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the compose plugin is installed")


@pytest.fixture(scope="module")
def image(docker) -> str:
    """The CPU image, as CI builds it; the base image and the wheelhouse are reused from .cache/ when there."""
    base_known = _run(["docker", "image", "inspect", "cnai-base:bookworm"]).returncode == 0
    if not (base_known or (ROOT / ".cache/base/bookworm.tar").exists() or shutil.which("mmdebstrap")):
        pytest.skip("no base image and no mmdebstrap to make one (as root, scripts/setup --test installs it)")
    built = _run([str(ROOT / "scripts" / "build-images"), "--tag", IMAGE], timeout=1200,
                 env={**os.environ, "PYTHON": sys.executable})
    assert built.returncode == 0, built.stdout[-5000:] + built.stderr[-5000:]
    return IMAGE


class Project:
    """compose.yml over the Immich stand-in, in a project folder with Immich's .env, as a user runs it."""

    def __init__(self, command: list[str], folder: Path, image: str):
        self.name = f"cnaitest{secrets.token_hex(4)}"
        self.folder = folder
        self.upload = folder / "library"  # Immich's UPLOAD_LOCATION
        self.upload.mkdir(parents=True)
        for path in (folder, self.upload):
            path.chmod(0o755)  # readable by the image's non-root user, as Immich's folders are
        # a password that would break a URL: compose.yml passes it beside the URL, not in it
        self.password = "p@ss:w/rd%" + secrets.token_hex(4)
        (folder / ".env").write_text(
            f"UPLOAD_LOCATION={self.upload}\nDB_USERNAME=postgres\nDB_PASSWORD={self.password}\n"
            f"DB_DATABASE_NAME=immich\nCNAI_IMAGE={image}\nSTANDIN_DIR={STANDIN}\nCNAI_TASKS=ocr\n")
        self.base = [*command, "--project-directory", str(folder), "-p", self.name,
                     "-f", str(STANDIN / "immich-standin.yml"), "-f", str(ROOT / "compose.yml")]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = _run([*self.base, *args], timeout=timeout)
        if check:
            assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def inspect(self, service: str, template: str) -> str:
        return _run(["docker", "inspect", "-f", template, self.container(service)]).stdout.strip()

    async def connect(self) -> asyncpg.Connection:
        host, port = self("port", "database", "5432").stdout.strip().rsplit(":", 1)

        async def connected():
            try:
                return await asyncpg.connect(host=host, port=int(port), user="postgres", password=self.password,
                                             database="immich")
            except (OSError, asyncpg.PostgresError):
                return None
        return await wait_for(connected, timeout=60, interval=0.5)

    def preview(self, owner: uuid.UUID, asset: uuid.UUID, in_container_root: str, lines: list[str]) -> str:
        """Writes a preview where Immich keeps it; returns the path Immich's server writes in asset_file."""
        relative = Path("thumbs") / str(owner) / str(asset)[:2] / str(asset)[2:4] / f"{asset}_preview.jpeg"
        target = self.upload / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        for folder in [target.parent, *target.parent.parents]:
            if folder == self.upload:
                break
            folder.chmod(0o755)
        render_text(lines).save(target, quality=90)
        target.chmod(0o644)
        return f"{in_container_root}/{relative}"


@pytest.fixture
def project(compose_command, image, tmp_path):
    p = Project(compose_command, tmp_path / "immich", image)
    yield p
    p("down", "-v", "--remove-orphans", "-t", "20", check=False)


async def add_photo(conn, owner: uuid.UUID, project: Project, immich_root: str, lines: list[str]) -> uuid.UUID:
    """A photo as Immich's server adds it: the preview on disk, then its asset and asset_file rows."""
    asset = uuid.uuid4()
    path = project.preview(owner, asset, immich_root, lines)
    await conn.execute("""INSERT INTO asset (id, "ownerId", "originalPath", "originalFileName", checksum)
                          VALUES ($1, $2, $3, 'photo.jpg', $4)""", asset, owner, path, secrets.token_bytes(20))
    await conn.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', $2)
                          ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""", asset, path)
    return asset


async def test_image_runs_beside_immich_and_indexes_a_photo(project):
    try:
        project("up", "-d", "cnai")  # and the database it depends on
        conn = await project.connect()
        try:
            # a brand-new Immich: its server hasn't made its tables yet; cnai waits, it doesn't exit and restart
            wait_until(lambda: "Waiting for Immich to create its tables" in project("logs", "--no-color").stdout, 120,
                       "cnai to wait for Immich's tables")
            assert project.inspect("cnai", "{{.State.Running}} {{.RestartCount}}") == "true 0"
            for m in sql_files.migrations(include_standalone=True):
                if m.id.startswith(sql_files.STANDALONE_PART + "/"):
                    await conn.execute(m.sql())  # Immich's first start

            wait_until(lambda: project.inspect("cnai", "{{.State.Health.Status}}") == "healthy", 180,
                       "cnai to be healthy (its /ping)")
            assert await conn.fetchval("SELECT count(*) FROM cnai.migration") > 0  # migrated at start

            # Immich's server reaches cnai at the URL compose.yml gives it, over the project's network
            ping = project("run", "--rm", "--no-deps", "immich-server", "-c",
                           "import os, urllib.request; url = os.environ['IMMICH_MACHINE_LEARNING_URL']; "
                           "print(url, urllib.request.urlopen(url + '/ping', timeout=10).read().decode())")
            assert ping.stdout.split()[-2:] == ["http://cnai:3003", "pong"], ping.stdout + ping.stderr

            # a non-root service that can read Immich's files and not change them
            probe = project("exec", "-T", "cnai", "sh", "-c", "id -u; touch /mnt/immich/probe", check=False)
            assert probe.stdout.split()[0] != "0"
            assert probe.returncode != 0 and "Read-only file system" in probe.stderr

            owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('owner@test') RETURNING id""")
            other = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('other@test') RETURNING id""")
            invoice = await add_photo(conn, owner, project, "/data", ["增值税发票", "Invoice 2024"])
            # an install still on Immich's old mount writes the old in-container path
            receipt = await add_photo(conn, owner, project, "/usr/src/app/upload", ["购物收据"])

            async def found(query: str, owners: list):
                return [r["asset_id"] for r in await conn.fetch(
                    "SELECT asset_id FROM cnai.search($1, NULL, $2::uuid[])", query, owners)]
            assert await wait_for(lambda: found("ocr:发票", [owner]), timeout=180, interval=0.5) == [invoice]
            assert await wait_for(lambda: found("ocr:收据", [owner]), timeout=60, interval=0.5) == [receipt]
            assert await found("ocr:发票", [other]) == []
        finally:
            await conn.close()

        again = project("run", "--rm", "--no-deps", "cnai", "migrate")
        assert "up to date" in again.stdout, again.stdout + again.stderr
        project("stop", "-t", "30", "cnai")
        assert project.inspect("cnai", "{{.State.ExitCode}}") == "0"  # a clean stop on SIGTERM
    except BaseException:
        print(project("logs", "--no-color", "--tail", "200", check=False).stdout)  # shown with the failure
        raise
