"""Which assets and previews cnai works on: the ones Immich's own ML jobs would (the rules are written out at the
top of sql/triggers/code/120_triggers.sql). Real triggers on a real PostgreSQL; the listener test runs the real
listener with a stand-in OCR model that answers with the size of the image it was given."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from inference.ocr import OcrLine, OcrResult
from inference.pool import ModelPool
from listener.tasks import OcrHandler
from listener.worker import Listener, ListenerConfig
from tests.conftest import make_asset, make_user, wait_for


async def new_asset(db, owner, **columns):
    asset = await make_asset(db, owner, Path(f"/photos/{time.monotonic_ns()}.jpg"), with_preview=False)
    for column, value in columns.items():
        await db.execute(f'UPDATE asset SET "{column}" = $2 WHERE id = $1', asset, value)
    return asset


async def write_preview(db, asset, path: str = "/thumbs/p.jpeg", edited: bool = False, type_: str = "preview"):
    """As Immich writes a generated file: one upsert."""
    await db.execute("""INSERT INTO asset_file ("assetId", type, path, "isEdited") VALUES ($1, $2, $3, $4)
                        ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""",
                     asset, type_, path, edited)


async def intake(db, asset) -> int:
    return await db.fetchval("SELECT count(*) FROM cnai.job_intake WHERE asset_id = $1", asset)


async def jobs(db, asset) -> list[tuple[str, str]]:
    return [tuple(r) for r in await db.fetch("SELECT task, state FROM cnai.job WHERE asset_id = $1 ORDER BY task, state",
                                             asset)]


async def trash(db, asset):
    await db.execute("""UPDATE asset SET "deletedAt" = now(), status = 'trashed' WHERE id = $1""", asset)


async def restore(db, asset):
    await db.execute("""UPDATE asset SET "deletedAt" = NULL, status = 'active' WHERE id = $1""", asset)


async def set_visibility(db, asset, visibility: str):
    await db.execute("UPDATE asset SET visibility = $2 WHERE id = $1", asset, visibility)


async def test_only_the_unedited_preview_enqueues(db):
    owner = await make_user(db)
    asset = await new_asset(db, owner)
    await write_preview(db, asset, "/thumbs/a_preview_edited.jpeg", edited=True)
    await write_preview(db, asset, "/thumbs/a_thumbnail.webp", type_="thumbnail")
    assert await intake(db, asset) == 0
    await write_preview(db, asset, "/thumbs/a_preview.jpeg")
    assert await intake(db, asset) == 1
    # an edit later writes (or re-writes) the edited preview: Immich re-runs none of its ML for it
    await write_preview(db, asset, "/thumbs/a_preview_edited2.jpeg", edited=True)
    assert await intake(db, asset) == 1
    # one statement with several rows, as Immich's upsertFiles writes them: only the unedited previews count
    b, c = await new_asset(db, owner), await new_asset(db, owner)
    await db.execute("""INSERT INTO asset_file ("assetId", type, path, "isEdited")
                        SELECT a, 'preview', '/thumbs/x.jpeg', e FROM unnest($1::uuid[]) a, unnest('{f,t}'::bool[]) e""",
                     [b, c])
    assert (await intake(db, b), await intake(db, c)) == (1, 1)


async def test_hidden_and_trashed_assets_are_not_enqueued(db):
    owner = await make_user(db)
    hidden = await new_asset(db, owner, visibility="hidden")
    trashed = await new_asset(db, owner)
    await trash(db, trashed)
    archived = await new_asset(db, owner, visibility="archive")
    locked = await new_asset(db, owner, visibility="locked")
    for asset in (hidden, trashed, archived, locked):
        await write_preview(db, asset)
    assert await intake(db, hidden) == 0 and await intake(db, trashed) == 0
    # Immich's ML works on archived and locked assets (only its search hides locked ones)
    assert await intake(db, archived) == 1 and await intake(db, locked) == 1


@pytest.mark.parametrize("away", ["hidden", "trashed"])
async def test_an_asset_going_away_loses_its_queued_work_and_keeps_its_results(db, away):
    owner = await make_user(db)
    asset, other = await make_asset(db, owner, Path("/p/a.jpg")), await make_asset(db, owner, Path("/p/b.jpg"))
    await db.fetchval("SELECT cnai.take_intake()")
    claimed = await db.fetch("SELECT id, asset_id FROM cnai.claim_jobs('w', 10, '{ocr}', '1 minute')")
    [running] = [r["id"] for r in claimed if r["asset_id"] == asset]  # a listener is reading it now
    await db.execute("INSERT INTO cnai.job (asset_id, task, state, finished_at) VALUES ($1, 'face', 'done', now())",
                     asset)
    await db.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, '发票', '[]', 't')", asset)
    request = await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{clip}') RETURNING id",
                                asset)
    before_other = await jobs(db, other)

    if away == "hidden":
        await set_visibility(db, asset, "hidden")
    else:
        await trash(db, asset)

    left = await jobs(db, asset)
    assert ("clip", "queued") not in left and ("face", "queued") not in left
    assert ("face", "done") in left                                       # history stays
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE id = $1 AND state = 'running'", running) == 1
    assert await db.fetchval("SELECT text FROM cnai.ocr WHERE asset_id = $1", asset) == "发票"  # results stay
    status, error = await db.fetchrow("SELECT status, error FROM reprocess_request WHERE id = $1", request)
    assert status == "failed" and ("hidden" if away == "hidden" else "trash") in error
    assert await jobs(db, other) == before_other                          # nobody else's work


async def test_an_asset_coming_back_is_queued_again(db):
    owner = await make_user(db)
    hidden = await new_asset(db, owner, visibility="hidden")
    await write_preview(db, hidden)
    await set_visibility(db, hidden, "timeline")  # a live photo's video, unlinked
    assert await intake(db, hidden) == 1

    trashed = await make_asset(db, owner, Path("/p/t.jpg"))
    await db.execute("TRUNCATE cnai.job_intake")
    await trash(db, trashed)
    await set_visibility(db, trashed, "hidden")   # away either way: nothing to do
    await restore(db, trashed)                    # still hidden
    assert await intake(db, trashed) == 0
    await set_visibility(db, trashed, "timeline")
    assert await intake(db, trashed) == 1

    no_preview = await new_asset(db, owner)
    await trash(db, no_preview)
    await restore(db, no_preview)                 # its preview's own row will enqueue it
    assert await intake(db, no_preview) == 0


async def test_other_asset_updates_change_nothing(db):
    owner = await make_user(db)
    asset = await make_asset(db, owner, Path("/p/a.jpg"))
    await db.fetchval("SELECT cnai.take_intake()")
    before = await jobs(db, asset)
    await db.execute("""UPDATE asset SET "isFavorite" = true, "updatedAt" = now() WHERE id = $1""", asset)
    await set_visibility(db, asset, "archive")
    await set_visibility(db, asset, "locked")
    await db.execute("""UPDATE asset SET "deletedAt" = NULL WHERE id = $1""", asset)  # set, but unchanged
    assert await jobs(db, asset) == before and await intake(db, asset) == 0


async def test_job_preview_paths_names_the_preview_immichs_job_reads(db):
    owner = await make_user(db)
    edited = await new_asset(db, owner)
    await write_preview(db, edited, "/thumbs/e_preview.jpeg")
    await write_preview(db, edited, "/thumbs/e_preview_edited.jpeg", edited=True)
    only_edited = await new_asset(db, owner)
    await write_preview(db, only_edited, "/thumbs/o_preview_edited.jpeg", edited=True)
    hidden = await new_asset(db, owner, visibility="hidden")
    await write_preview(db, hidden)
    trashed = await new_asset(db, owner)
    await write_preview(db, trashed)
    await trash(db, trashed)
    gone = await new_asset(db, owner)
    await db.execute("DELETE FROM asset WHERE id = $1", gone)

    rows = {r["asset_id"]: (r["path"], r["skip_reason"]) for r in await db.fetch(
        "SELECT * FROM cnai.job_preview_paths($1)", [edited, only_edited, hidden, trashed, gone])}
    assert rows[edited] == ("/thumbs/e_preview.jpeg", None)
    assert rows[only_edited][0] is None and "no unedited preview" in rows[only_edited][1]
    assert rows[hidden][0] is None and "hidden" in rows[hidden][1]
    assert rows[trashed][0] is None and "trash" in rows[trashed][1]
    assert gone not in rows


async def test_reprocess_request_refuses_hidden_and_trashed_assets(db):
    owner = await make_user(db)
    hidden = await new_asset(db, owner, visibility="hidden")
    trashed = await new_asset(db, owner)
    await trash(db, trashed)
    for asset, why in ((hidden, "hidden"), (trashed, "in the trash")):
        with pytest.raises(asyncpg.CheckViolationError, match=why):
            await db.execute("INSERT INTO reprocess_request (asset_id) VALUES ($1)", asset)
    assert await db.fetchval("SELECT count(*) FROM cnai.job") == 0


class ImageSizeModel:
    """Stands in for OCR: 'reads' the size of the image it was given, so the test sees which preview that was."""
    key = "size"
    max_batch = 8

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def run_batch(self, items: list) -> list:
        return [OcrResult([OcrLine(f"{r.image.width}x{r.image.height}", [0, 0, 1, 0, 1, 1, 0, 1], 1.0, 1.0)], "size")
                for r in items]


async def test_the_listener_reads_the_unedited_preview_and_fails_skipped_assets_with_the_reason(db, dsn, photo_dir):
    owner = await make_user(db)
    unedited, edited = photo_dir / "a_preview.jpeg", photo_dir / "a_preview_edited.jpeg"
    Image.new("RGB", (40, 30), "white").save(unedited)
    Image.new("RGB", (20, 20), "white").save(edited)
    asset = await make_asset(db, owner, unedited)
    await write_preview(db, asset, str(edited), edited=True)
    hidden = await make_asset(db, owner, unedited)
    await set_visibility(db, hidden, "hidden")
    # queued before these rules existed, or by a backfill that does not know them
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'ocr')", hidden)

    pool = ModelPool()
    pool.register("size", ImageSizeModel)
    listener = Listener(dsn, pool, {"ocr": OcrHandler("ocr", "size", model_name="size")},
                        ListenerConfig(tasks=["ocr"], poll_interval_s=0.2, lease_s=5, backoff_base_s=0.1))
    task = asyncio.create_task(listener.run())
    try:
        await wait_for(lambda: db.fetchval("SELECT text FROM cnai.ocr WHERE asset_id = $1", asset), 30)
        await wait_for(lambda: db.fetchval("SELECT error FROM cnai.job WHERE asset_id = $1 AND state = 'failed'",
                                           hidden), 30)
    finally:
        listener.stop()
        await asyncio.wait_for(task, 30)
        await pool.close()
    assert await db.fetchval("SELECT text FROM cnai.ocr WHERE asset_id = $1", asset) == "40x30"
    error = await db.fetchval("SELECT error FROM cnai.job WHERE asset_id = $1 AND state = 'failed'", hidden)
    assert "hidden" in error
    assert await db.fetchval("SELECT count(*) FROM cnai.ocr WHERE asset_id = $1", hidden) == 0


async def test_the_triggers_work_for_a_writer_without_any_right_in_schema_cnai(pg_server):
    """Immich writes with its own role. Even where EXECUTE on cnai's functions is not granted to PUBLIC (a
    hardened server), its writes to asset_file and asset work, and the triggers still do their part."""
    from tests.test_admin import fresh_database
    role = f"immich_{time.monotonic_ns()}"
    async with fresh_database(pg_server) as dsn:
        db = await asyncpg.connect(dsn)
        try:
            await db.execute(f"""CREATE ROLE {role};
                                 GRANT USAGE ON SCHEMA public TO {role};
                                 GRANT SELECT, INSERT, UPDATE ON asset, asset_file TO {role};
                                 REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cnai FROM PUBLIC""")
            owner = await make_user(db)
            asset = await new_asset(db, owner)
            async with db.transaction():
                await db.execute(f"SET LOCAL ROLE {role}")
                await write_preview(db, asset)
            assert await intake(db, asset) == 1
            await db.fetchval("SELECT cnai.take_intake()")
            async with db.transaction():
                await db.execute(f"SET LOCAL ROLE {role}")
                await set_visibility(db, asset, "hidden")
            assert await jobs(db, asset) == []
            async with db.transaction():
                await db.execute(f"SET LOCAL ROLE {role}")
                await set_visibility(db, asset, "timeline")
            assert await intake(db, asset) == 1
        finally:
            await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
            await db.close()


async def test_an_asset_hidden_while_its_preview_waits_in_the_intake_gets_no_jobs(db):
    owner = await make_user(db)
    asset = await new_asset(db, owner)
    await write_preview(db, asset)
    assert await intake(db, asset) == 1
    await set_visibility(db, asset, "hidden")  # before any listener took the intake row
    await db.fetchval("SELECT cnai.take_intake()")
    assert await intake(db, asset) == 0 and await jobs(db, asset) == []
