"""Immich's own reprocess buttons re-run cnai's matching tasks (sql/triggers/code/130_immich_reruns.sql), and the
upload flow, which makes Immich write the same rows, queues nothing twice. Each button is replayed with the
statements a real Immich 3.1.0 ran for it (tests/fixtures/immich/reprocess.json), on a real PostgreSQL with the
real triggers; cnai's side runs the listener's own SQL and result writers (no models: the outputs are given)."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pytest

from cnai.settings import Settings
from cnai.wiring import build_handlers
from inference.ocr import OcrResult
from listener.queue import JobQueue
from tests.conftest import make_user, wait_for

RECORDING = json.loads((Path(__file__).parent / "fixtures" / "immich" / "reprocess.json").read_text())
VECTOR = "[" + ",".join(["0.03"] * 512) + "]"
WORKER = "test-listener"


def recorded(prefix: str) -> str:
    """The one statement Immich ran (in any recorded action) that starts with `prefix`, exactly as recorded."""
    found = {s for action in RECORDING for s in action["statements"] if s.startswith(prefix)}
    assert len(found) == 1, (prefix, found)
    return found.pop()


FACES_AT = recorded('insert into "asset_job_status" ("assetId", "facesRecognizedAt")')
OCR_AT = recorded('insert into "asset_job_status" ("assetId", "ocrAt")')
METADATA_AT = recorded('insert into "asset_job_status" ("assetId", "metadataExtractedAt")')
DUPLICATES_AT = recorded('insert into "asset_job_status" ("assetId", "duplicatesDetectedAt")')
SMART_SEARCH = recorded('insert into "smart_search"')
OCR_DELETE = recorded('with "deleted_ocr" as (delete from "asset_ocr" where "assetId" = $1), "deleted_search"')
OCR_SEARCH_BLANKED = recorded('update "ocr_search" set "text"')
FACES_RESET = recorded('delete from "asset_face"')
# Smart Search "All" empties smart_search and sets its dimension again, in two transactions (setDimensionSize)
CLIP_WIPE = [[recorded('delete from "smart_search"'),
              recorded('alter table "smart_search" drop constraint'),
              recorded('alter table "smart_search" add constraint')],
             [recorded("drop index if exists clip_index"),
              recorded('alter table "smart_search" alter column'),
              recorded("CREATE INDEX IF NOT EXISTS clip_index"),
              recorded('alter table "smart_search" drop constraint')]]
# recorded only in part (longer than the log kept): Immich's upsertFiles for a preview and its thumbnail
PREVIEW_FILES = """insert into "asset_file" ("assetId", "type", "path", "isEdited", "isProgressive", "isTransparent")
                   values ($1, 'preview', $2, false, false, false), ($1, 'thumbnail', $3, false, false, false)
                   on conflict ("assetId", "type", "isEdited") do update set "path" = "excluded"."path",
                     "isProgressive" = "excluded"."isProgressive", "isTransparent" = "excluded"."isTransparent\""""


class Immich:
    """Writes what Immich 3.1 writes, statement by statement, each in its own transaction as Immich does."""

    def __init__(self, db):
        self.db = db
        self.owner = None

    async def new_asset(self, **columns) -> uuid.UUID:
        if self.owner is None:
            self.owner = await make_user(self.db)
        asset = await self.db.fetchval(
            """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
               VALUES ($1, '/data/upload/' || gen_random_uuid() || '.jpg', 'p.jpg',
                       sha256(uuid_send(gen_random_uuid())))
               RETURNING id""", self.owner)
        for column, value in columns.items():
            await self.db.execute(f'UPDATE asset SET "{column}" = $2 WHERE id = $1', asset, value)
        return asset

    async def upload_until_previews(self, **columns) -> uuid.UUID:
        """An upload up to its generated files: metadata extracted, preview and thumbnail written."""
        asset = await self.new_asset(**columns)
        await self.db.execute(METADATA_AT, asset, now())
        await self.db.execute(PREVIEW_FILES, asset, f"/data/thumbs/{asset}_preview.jpeg",
                              f"/data/thumbs/{asset}_thumbnail.webp")
        return asset

    async def ml_after_upload(self, asset) -> None:
        """The three ML jobs queued after an upload's thumbnails, then duplicate detection."""
        await self.faces(asset)
        await self.ocr(asset)
        await self.smart_search(asset)
        await self.db.execute(DUPLICATES_AT, asset, now())

    async def faces(self, asset) -> None:
        await self.db.execute(FACES_AT, asset, now())

    async def ocr(self, asset) -> None:
        await self.db.execute(OCR_DELETE, asset, asset)  # the CTE of a photo without text
        await self.db.execute(OCR_AT, asset, now())

    async def smart_search(self, asset) -> None:
        await self.db.execute(SMART_SEARCH, asset, VECTOR)

    async def wipe_smart_search(self) -> None:
        for transaction in CLIP_WIPE:
            async with self.db.transaction():
                for statement in transaction:
                    await self.db.execute(statement)


def now() -> datetime:
    return datetime.now(timezone.utc)


async def cnai_catches_up(db, mirror: bool = True) -> int:
    """What a listener does: takes the intake, claims every queued job, then in one transaction completes the jobs
    and writes each result with the real task writers (CLIP mirrored to smart_search), which record the runs."""
    await db.fetchval("SELECT cnai.take_intake()")
    jobs = await db.fetch("SELECT * FROM cnai.claim_jobs($1, 1000, '{clip,face,ocr}', '1 minute')", WORKER)
    await cnai_writes(db, jobs, mirror)
    return len(jobs)


async def cnai_writes(db, jobs, mirror: bool = True) -> None:
    handlers = build_handlers(Settings(), mirror_clip=mirror)
    outputs = {"clip": [0.03] * 512, "face": [], "ocr": OcrResult([], "rapidocr")}
    async with db.transaction():
        completed = await JobQueue(WORKER, 60, 5, 1).complete(db, [j["id"] for j in jobs])
        for j in jobs:
            if j["id"] in completed:
                await handlers[j["task"]].write(db, j["asset_id"], None, outputs[j["task"]])


async def library(db, n: int = 3) -> tuple[Immich, list]:
    """n photos uploaded through Immich, processed by Immich's ML and by cnai: the state before any button."""
    await db.execute("DELETE FROM cnai.immich_wipe")  # no wipe so far (the table outlives the db fixture's TRUNCATE)
    immich = Immich(db)
    assets = [await immich.upload_until_previews() for _ in range(n)]
    await cnai_catches_up(db)
    for asset in assets:
        await immich.ml_after_upload(asset)
    assert await cnai_catches_up(db) == 0
    return immich, assets


async def last_job_id(db) -> int:
    return await db.fetchval("SELECT coalesce(max(id), 0) FROM cnai.job")


async def queued_since(db, since: int) -> set[tuple]:
    await db.fetchval("SELECT cnai.take_intake()")
    return {(r["asset_id"], r["task"]) for r in await db.fetch(
        "SELECT asset_id, task FROM cnai.job WHERE id > $1 AND state = 'queued'", since)}


def each(assets, *tasks) -> set[tuple]:
    return {(a, t) for a in assets for t in tasks}


@pytest.fixture(autouse=True)
async def faces_indexed(db):
    """These replay an install that indexes faces (a listener with face in CNAI_TASKS started once), so that every
    button has a cnai task to re-run; test_face_buttons_queue_nothing_where_faces_are_not_indexed drops it again."""
    await db.execute("SELECT cnai.index_tasks('{face}')")


@pytest.fixture
def warnings(db):
    """WARNINGs the server sends this connection (the triggers' way to report what they could not do)."""
    seen = []

    def collect(_conn, message):
        if message.severity in ("WARNING", "ERROR"):
            seen.append(message.message)

    db.add_log_listener(collect)
    yield seen
    db.remove_log_listener(collect)


# --- the upload flow -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cnai_at", ["intake", "queued", "running", "done", "done-mirrored", "done-not-mirrored"])
async def test_the_upload_flow_queues_each_task_once_whenever_immich_writes(db, warnings, cnai_at):
    """Immich's ML writes its rows after cnai saw the preview: before cnai took it in, while queued, running, or
    when done (its CLIP vector mirrored to smart_search, so Immich's upsert overwrites a row). Then a press of
    Refresh faces is one more face job."""
    immich = Immich(db)
    asset = await immich.upload_until_previews()
    held = []
    if cnai_at != "intake":
        await db.fetchval("SELECT cnai.take_intake()")
    if cnai_at != "intake" and cnai_at != "queued":
        held = await db.fetch("SELECT * FROM cnai.claim_jobs($1, 10, '{clip,face,ocr}', '1 minute')", WORKER)
    if cnai_at.startswith("done"):
        await cnai_writes(db, held, mirror=cnai_at == "done-mirrored")
    await immich.ml_after_upload(asset)

    await db.fetchval("SELECT cnai.take_intake()")
    per_task = dict(await db.fetch("SELECT task, count(*) FROM cnai.job WHERE asset_id = $1 GROUP BY task", asset))
    assert per_task == {"clip": 1, "face": 1, "ocr": 1}
    if cnai_at == "running":
        await cnai_writes(db, held)
    await cnai_catches_up(db)

    since = await last_job_id(db)
    await immich.faces(asset)
    assert await queued_since(db, since) == {(asset, "face")}
    assert warnings == []


# --- each button, as recorded ----------------------------------------------------------------------------------------

async def press_refresh_faces(immich, assets):
    await immich.faces(assets[0])


async def press_refresh_metadata(immich, assets):
    await immich.db.execute(METADATA_AT, assets[0], now())


async def press_regenerate_thumbnail(immich, assets):
    await immich.db.execute(OCR_SEARCH_BLANKED, "", assets[0])


async def press_smart_search_all(immich, assets):
    await immich.wipe_smart_search()
    for asset in assets:
        await immich.smart_search(asset)


async def press_ocr_all(immich, assets):
    await immich.db.execute(recorded('truncate "asset_ocr"'))
    await immich.db.execute(recorded('truncate "ocr_search"'))
    for asset in assets:
        await immich.ocr(asset)


async def press_face_reset(immich, assets):
    await immich.db.execute(FACES_RESET, "machine-learning")
    for asset in assets:
        await immich.faces(asset)


async def press_face_refresh(immich, assets):
    for asset in assets:
        await immich.faces(asset)


async def press_thumbnails_all(immich, assets):
    for asset in assets:
        await immich.db.execute(OCR_SEARCH_BLANKED, "", asset)


async def press_nothing_written(immich, assets):
    """Refused (another user's asset, a non-admin), or "Missing" with nothing missing: Immich writes nothing."""


async def press_smart_search_missing_one(immich, assets):
    await immich.db.execute('DELETE FROM smart_search WHERE "assetId" = $1', assets[1])  # as prepared
    await immich.smart_search(assets[1])


async def press_ocr_missing_one(immich, assets):
    await immich.db.execute('UPDATE asset_job_status SET "ocrAt" = NULL WHERE "assetId" = $1', assets[1])
    await immich.ocr(assets[1])


async def press_faces_missing_one(immich, assets):
    await immich.db.execute('UPDATE asset_job_status SET "facesRecognizedAt" = NULL WHERE "assetId" = $1', assets[1])
    await immich.faces(assets[1])


async def press_thumbnails_missing_one(immich, assets):
    await immich.db.execute("""DELETE FROM asset_file WHERE "assetId" = $1 AND type = 'preview'""", assets[1])
    await immich.db.execute(OCR_SEARCH_BLANKED, "", assets[1])
    await immich.db.execute(PREVIEW_FILES, assets[1], f"/data/thumbs/{assets[1]}_preview.jpeg",
                            f"/data/thumbs/{assets[1]}_thumbnail.webp")


# recorded action -> (how it is replayed on the library, what cnai queues: (asset indexes, tasks))
EVERY = (0, 1, 2)
BUTTONS = {
    "Asset menu: Regenerate thumbnail": (press_regenerate_thumbnail, (), ()),  # only a front door sees it
    "Asset menu: Regenerate thumbnail (photo without text)": (press_regenerate_thumbnail, (), ()),
    "Asset menu: Refresh faces": (press_refresh_faces, (0,), ("face",)),
    "Asset menu: Refresh metadata": (press_refresh_metadata, (), ()),
    "Asset menu on another user's asset": (press_nothing_written, (), ()),
    "Jobs: Smart Search All": (press_smart_search_all, EVERY, ("clip",)),
    "Jobs: Smart Search Missing": (press_nothing_written, (), ()),
    "Jobs: OCR All": (press_ocr_all, EVERY, ("ocr",)),
    "Jobs: OCR Missing": (press_nothing_written, (), ()),
    "Jobs: Face Detection Reset (All)": (press_face_reset, EVERY, ("face",)),
    "Jobs: Face Detection Refresh": (press_face_refresh, EVERY, ("face",)),
    "Jobs: Face Detection Missing": (press_nothing_written, (), ()),
    "Jobs: Generate Thumbnails All": (press_thumbnails_all, (), ()),  # only a front door sees it
    "Jobs: Generate Thumbnails Missing": (press_nothing_written, (), ()),
    "Jobs panel as a non-admin": (press_nothing_written, (), ()),
    # missing for Immich, not for cnai: cnai has its result, so nothing
    "Jobs: Smart Search Missing (one missing)": (press_smart_search_missing_one, (), ()),
    "Jobs: OCR Missing (one missing)": (press_ocr_missing_one, (), ()),
    "Jobs: Face Detection Missing (one missing)": (press_faces_missing_one, (), ()),
    # a new preview row: the preview trigger queues every indexed task, as for an upload (120_triggers.sql)
    "Jobs: Generate Thumbnails Missing (one missing)": (press_thumbnails_missing_one, (1,), ("clip", "face", "ocr")),
}


def test_every_recorded_button_is_replayed():
    recorded_actions = {a["action"] for a in RECORDING} - {"Upload (web upload button / mobile backup)"}
    assert recorded_actions == set(BUTTONS)


@pytest.mark.parametrize("action", sorted(BUTTONS))
async def test_each_button_queues_its_task_for_the_assets_immich_ran_it_on(db, warnings, action):
    press, which, tasks = BUTTONS[action]
    immich, assets = await library(db)
    since = await last_job_id(db)
    await press(immich, assets)
    assert await queued_since(db, since) == each([assets[i] for i in which], *tasks)
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE priority = 0") == 0  # background
    assert warnings == []
    # cnai's re-runs write their results (CLIP mirrored to smart_search): that queues nothing more
    await cnai_catches_up(db)
    assert await cnai_catches_up(db) == 0


@pytest.mark.parametrize("task, press", [("clip", press_smart_search_missing_one), ("ocr", press_ocr_missing_one),
                                         ("face", press_faces_missing_one)])
async def test_missing_queues_what_cnai_has_not_run_either(db, task, press):
    immich, assets = await library(db)
    await db.execute("DELETE FROM cnai.task_run WHERE asset_id = $1 AND task = $2", assets[1], task)
    since = await last_job_id(db)
    await press(immich, assets)
    assert await queued_since(db, since) == {(assets[1], task)}


async def test_a_button_joins_work_cnai_has_queued_or_running(db):
    immich, assets = await library(db)
    queued, running, idle = assets
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'face')", running)
    assert len(await db.fetch("SELECT cnai.claim_jobs('other', 10, '{face}', '1 minute')")) == 1
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'face')", queued)
    since = await last_job_id(db)
    await press_face_refresh(immich, assets)
    assert await queued_since(db, since) == {(idle, "face")}
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE task = 'face' AND state = 'queued'") == 2
    # a person asking for one of them lifts it ahead of the background work
    await db.execute("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{face}')", idle)
    assert await db.fetchval("SELECT priority FROM cnai.job WHERE asset_id = $1 AND state = 'queued'", idle) == 0


async def test_face_buttons_queue_nothing_where_faces_are_not_indexed(db, warnings):
    """cnai.face is read by nothing: where no listener indexes faces (the default), neither the upload flow nor
    Immich's face buttons make face jobs; its other buttons still re-run their tasks."""
    assert await db.fetchval("SELECT cnai.unindex_task('face')") == 0
    immich, assets = await library(db)
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE task = 'face'") == 0  # the upload flow
    for action in ("Asset menu: Refresh faces", "Jobs: Face Detection Reset (All)", "Jobs: Face Detection Refresh",
                   "Jobs: Generate Thumbnails Missing (one missing)", "Jobs: OCR All"):
        press, which, tasks = BUTTONS[action]
        since = await last_job_id(db)
        await press(immich, assets)
        assert await queued_since(db, since) == each([assets[i] for i in which], *(t for t in tasks if t != "face"))
        await cnai_catches_up(db)
    # Immich ran face detection on an asset it had not before (the "Missing" flow, an upload): nothing either
    await db.execute("DELETE FROM cnai.task_run WHERE asset_id = $1 AND task = 'face'", assets[1])
    since = await last_job_id(db)
    await press_faces_missing_one(immich, assets)
    assert await queued_since(db, since) == set()
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE task = 'face'") == 0
    assert warnings == []


# --- what must not re-run --------------------------------------------------------------------------------------------

async def test_hidden_and_trashed_assets_are_skipped(db, warnings):
    immich, assets = await library(db)
    hidden, trashed, shown = assets
    await db.execute("UPDATE asset SET visibility = 'hidden' WHERE id = $1", hidden)
    await db.execute("""UPDATE asset SET "deletedAt" = now(), status = 'trashed' WHERE id = $1""", trashed)
    since = await last_job_id(db)
    await press_face_refresh(immich, assets)
    await press_ocr_all(immich, assets)
    await press_smart_search_all(immich, assets)
    assert await queued_since(db, since) == each([shown], "clip", "face", "ocr")
    assert warnings == []


async def test_assets_deleted_by_immich_queue_nothing_and_raise_nothing(db, warnings):
    """Immich empties the trash: each asset's rows in smart_search and asset_job_status go by cascade. That is no
    re-run and no wipe, down to the last asset."""
    immich, assets = await library(db)
    since = await last_job_id(db)
    for asset in assets[:2]:
        await db.execute("DELETE FROM asset WHERE id = $1", asset)
    assert await db.fetchval("SELECT count(*) FROM cnai.immich_wipe") == 0
    await press_face_refresh(immich, assets[2:])  # the one left still re-runs
    assert await queued_since(db, since) == {(assets[2], "face")}
    await cnai_catches_up(db)
    await db.execute("DELETE FROM asset WHERE id = $1", assets[2])  # smart_search is empty now
    assert await db.fetchval("SELECT count(*) FROM cnai.immich_wipe") == 0
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'failed'") == 0
    assert warnings == []


async def test_cnai_mirroring_its_own_vectors_is_no_rerun(db):
    """cnai's listener writes smart_search too (the mirror). After Immich emptied smart_search, a mirrored vector
    looks like Immich's first write after the wipe; it is marked as cnai's and queues nothing."""
    immich, assets = await library(db)
    await immich.wipe_smart_search()
    since = await last_job_id(db)
    async with db.transaction():
        for asset in assets:
            assert await db.fetchval("SELECT cnai.mirror_to_smart_search($1, $2::vector, $3)", asset, VECTOR,
                                     ["ViT-B-32__openai"])
    assert await queued_since(db, since) == set()
    # the same write by Immich re-runs it (so the test above is not passing by accident)
    await immich.smart_search(assets[0])
    assert await queued_since(db, since) == {(assets[0], "clip")}


async def test_a_wipe_is_remembered_until_cnai_ran_again(db):
    """After Smart Search "All" emptied smart_search, Immich writes each asset again in its own statement: each is
    a re-run for cnai until cnai ran it again; a TRUNCATE (Immich changing CLIP models) is a wipe too; deleting
    some rows is not."""
    immich, assets = await library(db)
    first, second, third = assets
    await immich.wipe_smart_search()
    since = await last_job_id(db)
    await immich.smart_search(first)
    assert await queued_since(db, since) == {(first, "clip")}
    await cnai_catches_up(db)
    since = await last_job_id(db)
    await immich.smart_search(first)   # written again (say "All" resumed): cnai ran it since the wipe
    await immich.smart_search(second)  # Immich goes on
    await immich.smart_search(third)
    assert await queued_since(db, since) == each([second, third], "clip")
    await cnai_catches_up(db)

    since = await last_job_id(db)
    await db.execute('DELETE FROM smart_search WHERE "assetId" = $1', third)  # not emptied: no wipe
    await immich.smart_search(third)
    assert await queued_since(db, since) == set()
    await db.execute("TRUNCATE smart_search")
    await immich.smart_search(third)
    assert await queued_since(db, since) == {(third, "clip")}


async def test_a_failure_is_reported_and_never_raised_into_immich(db, warnings):
    immich, assets = await library(db)
    transaction = db.transaction()
    await transaction.start()
    try:
        # cnai's queue refuses new work (as a broken upgrade might): Immich's own statement still succeeds
        await db.execute("ALTER TABLE cnai.job ADD CONSTRAINT refuse_queued CHECK (state <> 'queued') NOT VALID")
        await immich.faces(assets[0])
        assert await db.fetchval('SELECT "facesRecognizedAt" IS NOT NULL FROM asset_job_status WHERE "assetId" = $1',
                                 assets[0])
        failed = await db.fetch("SELECT asset_id, task, error FROM cnai.job WHERE state = 'failed'")
        assert [(r["asset_id"], r["task"]) for r in failed] == [(assets[0], "face")]
        assert "trigger on asset_job_status" in failed[0]["error"] and "refuse_queued" in failed[0]["error"]
        assert any("refuse_queued" in w for w in warnings)
    finally:
        await transaction.rollback()


async def test_immich_deleting_an_asset_while_writing_its_ml_result_does_not_deadlock(db, dsn, warnings):
    """Immich's ML write holds the asset's asset_job_status row while Immich deletes the asset in another
    transaction, whose cascade waits on that row: the trigger must not then wait on the asset (a deadlock, which
    PostgreSQL would resolve by failing Immich's delete)."""
    immich, assets = await library(db)
    gone = assets[0]
    deleter = await asyncpg.connect(dsn)
    try:
        writing = db.transaction()
        await writing.start()
        await db.execute('SELECT FROM asset_job_status WHERE "assetId" = $1 FOR UPDATE', gone)
        delete = asyncio.create_task(deleter.execute("DELETE FROM asset WHERE id = $1", gone))
        await wait_for(lambda: db.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND pid = $1", deleter.get_server_pid()))
        await immich.faces(gone)  # Refresh faces, finishing now
        await writing.commit()
        assert await asyncio.wait_for(delete, 30) == "DELETE 1"
    finally:
        await deleter.close()
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1", gone) == 0
    assert warnings == []
