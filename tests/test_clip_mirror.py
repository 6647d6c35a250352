"""Mirroring CLIP results to Immich's smart_search is decided per batch, inside the transaction that writes them:
Immich's CLIP model can change while cnai runs (and Immich then resizes smart_search), and whatever happens to
smart_search never costs the cnai.clip write. Each test runs on a database of its own, as it changes Immich's tables."""
from __future__ import annotations

import json

import asyncpg
import pytest
import pytest_asyncio

from cnai.db import migrate
from cnai.wiring import build_handlers
from tests.clip_fixtures import sample_images
from tests.conftest import make_asset, make_user, running_listener, wait_for
from tests.test_clip_jobs import clip_pool, clip_settings, models_dir  # noqa: F401  (fixtures)
from tests.test_clip_jobs import smart_search_mirror_ok
from tests.test_migrations import fresh_dsn  # noqa: F401  (fixture)

pytest.importorskip("cn_clip")


@pytest_asyncio.fixture
async def mirror_db(fresh_dsn):  # noqa: F811
    await migrate(fresh_dsn, standalone=True)
    conn = await asyncpg.connect(fresh_dsn)
    yield fresh_dsn, conn
    await conn.close()


async def set_immich_clip_model(conn, name: str) -> None:
    await conn.execute("""INSERT INTO system_metadata (key, value) VALUES ('system-config', $1::jsonb)
                          ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                       json.dumps({"machineLearning": {"clip": {"enabled": True, "modelName": name}}}))


class Photos:
    """Adds photos as Immich would, and waits for the listener to finish their CLIP job."""

    def __init__(self, conn, photo_dir):
        self.conn, self.dir, self.n, self.owner = conn, photo_dir, 0, None

    async def add_and_wait(self):
        if self.owner is None:
            self.owner = await make_user(self.conn)
        images = sample_images()
        path = self.dir / f"{self.n}.png"
        images[self.n % len(images)].save(path)
        self.n += 1
        asset = await make_asset(self.conn, self.owner, path)
        await wait_for(lambda: self.conn.fetchval(
            "SELECT state = 'done' FROM cnai.job WHERE asset_id = $1 AND task = 'clip'", asset), timeout=60)
        return asset

    async def where(self, asset) -> tuple[bool, bool]:
        """(in cnai.clip, in smart_search)"""
        in_clip = await self.conn.fetchval("SELECT count(*) = 1 FROM cnai.clip WHERE asset_id = $1", asset)
        in_immich = await self.conn.fetchval(
            """SELECT CASE WHEN to_regclass('public.smart_search') IS NULL THEN false
                      ELSE cnai_test_in_smart_search($1) END""", asset)
        return in_clip, in_immich


async def define_smart_search_probe(conn) -> None:
    # plpgsql resolves the table when it runs, so the probe still works after smart_search is dropped
    await conn.execute("""
        CREATE FUNCTION cnai_test_in_smart_search(p uuid) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN RETURN EXISTS (SELECT FROM public.smart_search WHERE "assetId" = p); END $$""")


async def test_a_model_change_in_immich_stops_and_resumes_mirroring_while_listening(
        mirror_db, clip_pool, models_dir, photo_dir):  # noqa: F811
    dsn, conn = mirror_db
    await define_smart_search_probe(conn)
    photos = Photos(conn, photo_dir)
    await set_immich_clip_model(conn, "ViT-B-32__openai")  # one our gateway answers with cn-clip
    async with running_listener(dsn, clip_pool, clip_settings(models_dir), mirror_clip=True, stop_timeout=30):
        first = await photos.add_and_wait()
        assert await photos.where(first) == (True, True)

        # Immich switches to a model we do not answer (same dimension: Immich only empties smart_search)
        await set_immich_clip_model(conn, "XLM-Roberta-Large-Vit-B-32")
        await conn.execute("DELETE FROM smart_search")
        second = await photos.add_and_wait()
        assert await photos.where(second) == (True, False)

        await set_immich_clip_model(conn, "immich-app/ViT-B-16__openai")  # and back to one we answer
        third = await photos.add_and_wait()
        assert await photos.where(third) == (True, True)
    assert await conn.fetchval("SELECT count(*) FROM cnai.task_run WHERE task = 'clip'") == 3


async def test_a_failing_or_resized_smart_search_never_costs_the_clip_result(
        mirror_db, clip_pool, models_dir, photo_dir):  # noqa: F811
    dsn, conn = mirror_db
    await define_smart_search_probe(conn)
    photos = Photos(conn, photo_dir)
    async with running_listener(dsn, clip_pool, clip_settings(models_dir), mirror_clip=True,
                                stop_timeout=30) as listener:
        clip_handler = listener.handlers["clip"]
        assert await photos.where(await photos.add_and_wait()) == (True, True)

        # the first step of Immich's resize: smart_search emptied, and a check for the new dimension added while
        # the column is still vector(512), so our checks pass and the write itself fails
        await conn.execute("""DELETE FROM smart_search;
                              ALTER TABLE smart_search ADD CONSTRAINT dim_size_constraint
                                CHECK (array_length(embedding::real[], 1) = 640)""")
        during_resize = await photos.add_and_wait()
        assert await photos.where(during_resize) == (True, False)
        assert clip_handler.smart_search_failures >= 1

        # the second step: the column becomes vector(640); we see it and leave smart_search alone
        await conn.execute("""DROP INDEX clip_index;
                              ALTER TABLE smart_search ALTER COLUMN embedding TYPE vector(640);
                              ALTER TABLE smart_search DROP CONSTRAINT dim_size_constraint""")
        failures = clip_handler.smart_search_failures
        resized = await photos.add_and_wait()
        assert await photos.where(resized) == (True, False)
        assert clip_handler.smart_search_failures == failures

        await conn.execute("DROP TABLE smart_search")
        without_table = await photos.add_and_wait()
        assert await photos.where(without_table) == (True, False)
    assert await conn.fetchval("SELECT count(*) FROM cnai.job WHERE task = 'clip' AND state <> 'done'") == 0
    assert await conn.fetchval("SELECT count(*) FROM cnai.clip") == 4


async def test_the_decision_is_made_once_per_transaction(mirror_db, models_dir, photo_dir):  # noqa: F811
    """A batch's writes share one settle transaction: Immich's configuration is read at its first CLIP write and
    holds for the rest of it; the next transaction reads it again."""
    dsn, conn = mirror_db
    other = await asyncpg.connect(dsn)
    try:
        handler = build_handlers(clip_settings(models_dir), mirror_clip=True)["clip"]
        owner = await make_user(conn)
        assets = [await make_asset(conn, owner, photo_dir / f"{i}.png", with_preview=False) for i in range(3)]
        vector = [1.0] + [0.0] * 511
        async with conn.transaction():
            await handler.write(conn, assets[0], None, vector)
            await set_immich_clip_model(other, "ViT-L-14__openai")  # committed by another session mid-batch
            await handler.write(conn, assets[1], None, vector)
        assert await smart_search_mirror_ok(conn, clip_settings(models_dir)) is False
        async with conn.transaction():
            await handler.write(conn, assets[2], None, vector)
        mirrored = {r[0] for r in await conn.fetch('SELECT "assetId" FROM smart_search')}
        assert mirrored == {assets[0], assets[1]}
        assert await conn.fetchval("SELECT count(*) FROM cnai.clip") == 3
    finally:
        await other.close()
