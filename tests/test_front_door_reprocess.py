"""The front door acts on the two Immich buttons that write nothing cnai's triggers can see: once Immich answers
"Regenerate thumbnail" (`POST /api/assets/jobs`) with a 2xx, each asset gets a reprocess request (the indexed tasks,
ahead of background work); once it answers "Jobs → Generate Thumbnails → All" (`PUT /api/jobs/thumbnailGeneration`,
force), every indexed task is queued for every asset in the background. Immich here is the recorded stand-in; cnai's
database is the real test database."""
from __future__ import annotations

import logging
import socket

import pytest_asyncio

from listener.task_names import DEFAULT_TASKS
from tests.conftest import wait_for
from tests.front_scene import ASSETS, creds, front_client, front_settings, running_standin, seed_scene
from tests.test_front_door import pool  # noqa: F401  (fixture)

REGENERATE = "regenerate-thumbnail"
INDEXED = DEFAULT_TASKS  # what a new database indexes: clip and ocr, not face (cnai.indexed_task)


@pytest_asyncio.fixture
async def door(db, pool, dsn, tmp_path):  # noqa: F811
    """The front door before the stand-in, on the seeded scene: (client, stand-in)."""
    await seed_scene(db)
    async with running_standin() as (standin, url):
        async with front_client(pool, front_settings(url, tmp_path), dsn, door=True) as client:
            yield client, standin


async def asset_job(client, user: str, name: str, *assets: str):
    return await client.post("/api/assets/jobs", json={"assetIds": [ASSETS[a] for a in assets], "name": name},
                             headers=creds(user))


async def thumbnail_job(client, force: bool):
    return await client.put("/api/jobs/thumbnailGeneration", json={"command": "start", "force": force},
                            headers=creds("admin"))


async def requests_of(db) -> dict[str, tuple[str, list[str]]]:
    """asset name -> (status, tasks) of each reprocess request."""
    names = {v: k for k, v in ASSETS.items()}
    rows = await db.fetch("SELECT asset_id::text, status, tasks FROM reprocess_request")
    return {names[r["asset_id"]]: (r["status"], sorted(r["tasks"])) for r in rows}


async def jobs_of(db) -> set[tuple[str, str, int]]:
    """(asset name, task, priority) of each queued job."""
    names = {v: k for k, v in ASSETS.items()}
    rows = await db.fetch("SELECT asset_id::text, task, priority FROM cnai.job WHERE state = 'queued'")
    return {(names[r["asset_id"]], r["task"], r["priority"]) for r in rows}


async def with_previews(db) -> None:
    """Every asset of the scene with a preview, as Immich has them; what the preview trigger queued is cleared, so
    only the door's work is left to see."""
    await db.execute("""INSERT INTO asset_file ("assetId", type, path)
                        SELECT id, 'preview', '/data/thumbs/' || id || '-preview.jpeg' FROM asset""")
    await db.execute("DELETE FROM cnai.job_intake")


async def test_regenerate_thumbnail_queues_the_indexed_tasks_for_each_asset_first(door, db):
    client, standin = door
    r = await asset_job(client, "alice", REGENERATE, "alice-invoice", "alice-beijing")
    assert r.status == 204
    assert await requests_of(db) == {"alice-invoice": ("pending", sorted(INDEXED)),
                                     "alice-beijing": ("pending", sorted(INDEXED))}
    assert await jobs_of(db) == {(a, t, 0) for a in ("alice-invoice", "alice-beijing") for t in INDEXED}
    assert [(r.method, r.path_qs) for r in standin.received] == [("POST", "/api/assets/jobs")]  # passed on as is

    # the other asset jobs: cnai's triggers see what Immich writes for them, the door adds nothing
    r = await asset_job(client, "alice", "refresh-faces", "alice-face")
    assert r.status == 204
    assert set(await requests_of(db)) == {"alice-invoice", "alice-beijing"}


async def test_what_immich_refuses_queues_nothing(door, db):
    client, _ = door
    r = await asset_job(client, "alice", REGENERATE, "dave-invoice")  # not hers: Immich's 400
    assert r.status == 400 and (await r.json())["message"] == "Not found or no asset.update access"
    assert await requests_of(db) == {} and await jobs_of(db) == set()
    r = await asset_job(client, "dave", REGENERATE, "dave-invoice")  # the same, by its owner
    assert r.status == 204
    assert await requests_of(db) == {"dave-invoice": ("pending", sorted(INDEXED))}


async def test_a_hidden_or_trashed_asset_does_not_drop_the_others(door, db, caplog):
    client, _ = door
    await db.execute("UPDATE asset SET visibility = 'hidden' WHERE id = $1", ASSETS["alice-receipt"])
    caplog.set_level(logging.INFO, logger="front.app")
    r = await asset_job(client, "alice", REGENERATE, "alice-receipt", "alice-invoice", "alice-trashed")
    assert r.status == 204  # Immich's answer: the owner may regenerate them
    assert await requests_of(db) == {"alice-invoice": ("pending", sorted(INDEXED))}
    assert await jobs_of(db) == {("alice-invoice", t, 0) for t in INDEXED}
    said = [rec.getMessage() for rec in caplog.records if "Regenerate thumbnail" in rec.getMessage()]
    assert len(said) == 1 and "queued 1 of 3" in said[0]
    assert "hidden" in said[0] and "trash" in said[0]


async def test_generate_thumbnails_all_queues_every_indexed_task_for_every_asset_in_the_background(door, db):
    client, _ = door
    await with_previews(db)
    r = await thumbnail_job(client, force=False)  # "Missing": Immich's new preview rows queue what they need
    assert r.status == 200
    assert await jobs_of(db) == set()

    r = await thumbnail_job(client, force=True)
    assert r.status == 200 and (await r.json())["queueStatus"] == {"isPaused": False, "isActive": False}
    worked_on = [name for name in ASSETS if name != "alice-trashed"]  # hidden and trashed assets are skipped

    async def all_queued(tasks=INDEXED):
        return await jobs_of(db) == {(a, t, 1) for a in worked_on for t in tasks}
    await wait_for(all_queued, timeout=30)
    assert await requests_of(db) == {}

    # once a listener with face has started, faces are indexed, and the button queues them too
    await db.execute("SELECT cnai.index_tasks('{face}')")

    async def pressed_and_faces_queued():
        # a press while the last one is still queueing is skipped (logged): press until one runs
        assert (await thumbnail_job(client, force=True)).status == 200
        return await all_queued(("clip", "face", "ocr"))
    await wait_for(pressed_and_faces_queued, timeout=30, interval=0.3)


async def test_cnai_database_down_leaves_immichs_answer(db, pool, tmp_path, caplog):  # noqa: F811
    await seed_scene(db)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    caplog.set_level(logging.INFO, logger="front.app")
    async with running_standin() as (_, url):
        async with front_client(pool, front_settings(url, tmp_path, front_timeout_s=2), dead_dsn,
                                door=True) as client:
            r = await asset_job(client, "alice", REGENERATE, "alice-invoice")
            assert r.status == 204
            assert any("did not queue" in rec.getMessage() and rec.levelno == logging.WARNING
                       for rec in caplog.records)
            caplog.clear()
            r = await thumbnail_job(client, force=True)
            assert r.status == 200

            async def warned():
                return any("Generate Thumbnails" in rec.getMessage() and rec.levelno == logging.WARNING
                           for rec in caplog.records)
            await wait_for(warned, timeout=30)
