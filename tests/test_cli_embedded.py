"""The README's first command, for real: `cnai serve --embedded --watch DIR`, then drop a photo and search it."""
from __future__ import annotations

import os
import re
import subprocess
import sys


from cnai.embedded import EmbeddedServer, _free_port
from tests.conftest import render_text, stop_process, wait_for_ping, wait_until


def cnai(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnai", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_watch_search_reprocess(embedded_home):
    data, photos, models = embedded_home / "data", embedded_home / "photos", embedded_home / "models"
    port = _free_port()
    env = {**os.environ, "CNAI_MODELS_DIR": str(models), "CNAI_POLL_INTERVAL_S": "0.5"}
    db = ["--embedded", "--data-dir", str(data)]
    photos.mkdir()
    render_text(["已有的照片"]).save(photos / "before.jpg", quality=90)  # there before the service starts
    serve = subprocess.Popen([sys.executable, "-m", "cnai", "serve", *db, "--watch", str(photos), "--port", str(port)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_ping(serve, port)
        render_text(["增值税发票", "Invoice 2024"]).save(photos / "receipt.jpg", quality=90)
        render_text(["海边日落"]).save(photos / "sunset.png")

        def found():
            r = cnai("search", *db, "ocr:发票", env=env)
            return r.stdout if "receipt.jpg" in r.stdout else None
        out = wait_until(found, 120, "the photo to be indexed")
        assert "sunset.png" not in out
        sunset = wait_until(lambda: "sunset.png" in cnai("search", *db, "ocr:日落", env=env).stdout, 60, "sunset")
        assert sunset
        assert "before.jpg" in cnai("search", *db, "ocr:已有", env=env).stdout

        status = cnai("status", *db, env=env)
        assert status.returncode == 0
        # one OCR job per photo: the watcher imports a photo once it is completely written
        assert "results: ocr 3," in status.stdout, status.stdout
        assert re.search(r"ocr\s+done\s+3\b", status.stdout), status.stdout
        # no CLIP/face models here: those tasks fail with a reason naming the missing file; OCR was unaffected
        wait_until(lambda: "model file not found" in cnai("status", *db, env=env).stdout, 60, "clip failure")

        top = cnai("search", *db, "ocr:发票", "--limit", "1", env=env)
        header, columns, *rows = top.stdout.strip().splitlines()
        assert top.returncode == 0 and "1 match(es)" in header and "score" in columns and len(rows) == 1, top
        rank, score, asset_id, path, _, matched = rows[0].split(maxsplit=5)
        assert rank == "1" and float(score) > 0 and path.endswith("receipt.jpg") and "[发票]" in matched, rows
        again = cnai("reprocess", *db, asset_id, "--task", "ocr", "--timeout", "60", env=env)
        assert again.returncode == 0 and f"asset {asset_id}" in again.stdout and ": done" in again.stdout, again

        (photos / "receipt.jpg").unlink()
        wait_until(lambda: "receipt.jpg" not in cnai("search", *db, "ocr:发票", env=env).stdout, 30,
                   "the deleted photo to leave the results")
    finally:
        stop_process(serve, 60)
    assert serve.returncode == 0, serve.stdout.read()[-3000:]


def test_reprocess_cli_reports_outcome_and_bad_input(embedded_home):
    data = embedded_home / "data"
    env = {**os.environ, "CNAI_MODELS_DIR": str(embedded_home / "models")}
    db = ["--embedded", "--data-dir", str(data)]
    r = cnai("migrate", *db, env=env)
    assert r.returncode == 0 and "applied" in r.stdout
    r = cnai("migrate", *db, env=env)
    assert "up to date" in r.stdout
    r = cnai("reprocess", *db, "00000000-0000-0000-0000-000000000000", "--no-wait", env=env)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = cnai("reprocess", *db, "not-a-uuid", "--no-wait", env=env)
    assert r.returncode != 0 and "cnai reprocess" in r.stderr


def test_backfill_queues_only_what_lacks_results(embedded_home):
    import asyncio

    import asyncpg

    data = embedded_home / "data"
    env = {**os.environ, "CNAI_MODELS_DIR": str(embedded_home / "models")}
    db = ["--embedded", "--data-dir", str(data)]
    assert cnai("migrate", *db, env=env).returncode == 0

    async def setup():
        conn = await asyncpg.connect(EmbeddedServer(data).dsn())
        try:
            owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('b@test') RETURNING id""")
            ids = []
            for i in range(3):
                a = await conn.fetchval("""INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                                           VALUES ($1, $2, 'x.jpg', $3) RETURNING id""", owner, f"/p/{i}.jpg",
                                        bytes([i]))
                await conn.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', $2)""",
                                   a, f"/p/{i}.jpg")
                ids.append(a)
            await conn.execute("DELETE FROM cnai.job")  # as if the work had been done and pruned
            # OCR ran on the first with the install's model, on the second with another one
            await conn.execute("INSERT INTO cnai.task_run (asset_id, task, model) VALUES ($1, 'ocr', 'rapidocr')",
                               ids[0])
            await conn.execute("INSERT INTO cnai.task_run (asset_id, task, model) VALUES ($1, 'ocr', 'old-ocr')",
                               ids[1])
        finally:
            await conn.close()

    async def queued(task):
        conn = await asyncpg.connect(EmbeddedServer(data).dsn())
        try:
            return await conn.fetchval("SELECT count(*) FROM cnai.job WHERE task = $1 AND state = 'queued'", task)
        finally:
            await conn.close()

    asyncio.run(setup())
    r = cnai("backfill", *db, "--task", "ocr", env=env)
    assert r.returncode == 0 and "ocr: queued 2" in r.stdout, r.stdout + r.stderr
    assert asyncio.run(queued("ocr")) == 2
    r = cnai("backfill", *db, "--task", "ocr", "--force", env=env)
    assert "ocr: queued 1" in r.stdout  # the two already queued coalesce; the one with a result joins
    assert asyncio.run(queued("ocr")) == 3 and asyncio.run(queued("clip")) == 0


def test_doctor_checks_the_triggers_and_reports_each_problem_once(pg_server, tmp_path):
    import asyncio

    import asyncpg

    from tests.test_admin import fresh_database

    env = {**os.environ, "CNAI_MODELS_DIR": str(tmp_path), "CNAI_TASKS": "ocr"}  # OCR's models ship with it

    async def scenario():
        async with fresh_database(pg_server) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('d@test') RETURNING id""")
                asset = await conn.fetchval("""INSERT INTO asset ("ownerId", "originalPath", "originalFileName",
                                               checksum) VALUES ($1, '/p/a.jpg', 'a.jpg', 'x') RETURNING id""", owner)
                await conn.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', '/p/a.jpg')""",
                                   asset)
                healthy = await asyncio.to_thread(cnai, "doctor", "--dsn", dsn, env=env)
                await conn.execute("ALTER TABLE asset_file DISABLE TRIGGER cnai_enqueue_preview_insert")
                broken = await asyncio.to_thread(cnai, "doctor", "--dsn", dsn, env=env)
            finally:
                await conn.close()
            return healthy, broken

    healthy, broken = asyncio.run(scenario())
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "PROBLEM" not in healthy.stdout
    assert re.search(r"ok\s+enqueue via cnai_enqueue_preview_insert: inserting it anew as \S+ queued the preview",
                     healthy.stdout), healthy.stdout
    assert broken.returncode != 0
    about_it = [line for line in broken.stdout.splitlines() if "cnai_enqueue_preview_insert" in line]
    assert len(about_it) == 1 and "PROBLEM" in about_it[0] and "disabled" in about_it[0], broken.stdout
    assert broken.stdout.count("PROBLEM") == 1, broken.stdout


def test_search_cli_searches_every_user_or_the_ones_named(pg_server):
    import asyncio

    import asyncpg

    from tests.test_admin import fresh_database

    async def scenario():
        async with fresh_database(pg_server) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                for email in ("a@test", "b@test"):
                    owner = await conn.fetchval('INSERT INTO "user" (email) VALUES ($1) RETURNING id', email)
                    asset = await conn.fetchval(
                        """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                           VALUES ($1, $2, 'x.jpg', $3) RETURNING id""", owner, f"/photos/{email}.jpg", email.encode())
                    await conn.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, '发票', '[]', 't')",
                                       asset)
            finally:
                await conn.close()
            return [await asyncio.to_thread(cnai, "search", "--dsn", dsn, "ocr:发票", *args, env=dict(os.environ))
                    for args in ((), ("--user", "b@test"), ("--user", "nobody@test"))]

    everyone, bob, unknown = asyncio.run(scenario())
    assert "/photos/a@test.jpg" in everyone.stdout and "/photos/b@test.jpg" in everyone.stdout
    assert "/photos/b@test.jpg" in bob.stdout and "/photos/a@test.jpg" not in bob.stdout
    assert unknown.returncode != 0 and "nobody@test" in unknown.stderr
