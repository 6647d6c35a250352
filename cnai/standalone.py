"""Standalone mode: photos dropped in a folder become Immich-style assets, so the triggers index them.

Each image file gets an `asset` row (owned by a local user) and a `preview` row in `asset_file` pointing at the
file itself, written the way Immich writes them. A changed file updates its preview row (re-indexing it); a
removed file deletes its asset (and, by cascade, its results).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

# Only what the decoder reads (PIL without plugins): HEIC, AVIF, TIFF, BMP or GIF files would become assets whose
# every job fails.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
LOCAL_USER_EMAIL = "cnai@localhost"


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


async def local_user(conn: asyncpg.Connection) -> object:
    return await conn.fetchval(
        """INSERT INTO "user" (email, name) VALUES ($1, 'cnai') ON CONFLICT (email) DO UPDATE SET email = excluded.email
           RETURNING id""", LOCAL_USER_EMAIL)


async def import_file(conn: asyncpg.Connection, owner, path: Path) -> object | None:
    """Create or refresh the asset for one file. Returns its id, or None if the file vanished."""
    path = path.resolve()
    try:
        data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
    except (FileNotFoundError, IsADirectoryError):
        return None
    checksum = hashlib.sha1(data).digest()
    async with conn.transaction():
        row = await conn.fetchrow('SELECT id, checksum FROM asset WHERE "originalPath" = $1 AND "ownerId" = $2',
                                  str(path), owner)
        if row and row["checksum"] == checksum:
            return row["id"]
        if row:
            asset_id = row["id"]
            await conn.execute('UPDATE asset SET checksum = $2, "updatedAt" = now() WHERE id = $1', asset_id, checksum)
        else:
            asset_id = await conn.fetchval(
                """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT ("ownerId", checksum) DO UPDATE SET "originalPath" = excluded."originalPath"
                   RETURNING id""", owner, str(path), path.name, checksum)
        # as Immich does: one upsert per asset; an unchanged path still counts as a new preview
        await conn.execute(
            """INSERT INTO asset_file ("assetId", type, path, "isEdited") VALUES ($1, 'preview', $2, false)
               ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path, "updatedAt" = now()""",
            asset_id, str(path))
    log.info("imported %s", path)
    return asset_id


async def remove_file(conn: asyncpg.Connection, owner, path: Path) -> None:
    deleted = await conn.execute('DELETE FROM asset WHERE "originalPath" = $1 AND "ownerId" = $2',
                                 str(path.resolve()), owner)
    if deleted != "DELETE 0":
        log.info("removed %s", path)


async def sync_folder(conn: asyncpg.Connection, folder: Path) -> None:
    owner = await local_user(conn)
    present = {p.resolve() for p in folder.rglob("*") if p.is_file() and is_image(p)}
    known = {Path(r["originalPath"]) for r in await conn.fetch(
        'SELECT "originalPath" FROM asset WHERE "ownerId" = $1', owner)}
    for path in sorted(present):
        await import_file(conn, owner, path)
    root = folder.resolve()
    for path in known - present:
        if root in path.parents:
            await remove_file(conn, owner, path)


async def watch_folder(dsn: str, folder: Path, stop: asyncio.Event, rescan_s: float = 60.0) -> None:
    """Import what is in `folder`, then follow changes. File events are hints, the folder is the truth: a full
    rescan runs once the watcher is up (closing the gap between the first scan and the watch) and every
    `rescan_s` after, so a missed event delays a photo, never loses it."""
    from watchfiles import Change, awatch

    folder.mkdir(parents=True, exist_ok=True)
    conn = await asyncpg.connect(dsn)
    try:
        await sync_folder(conn, folder)
        owner = await local_user(conn)
        log.info("watching %s for photos", folder)
        last_scan = None
        async for changes in awatch(folder, stop_event=stop, debounce=500, recursive=True,
                                    rust_timeout=1000, yield_on_timeout=True):
            now = asyncio.get_running_loop().time()
            if not changes:
                if last_scan is None or now - last_scan >= rescan_s:
                    await sync_folder(conn, folder)
                    last_scan = now
                continue
            for change, raw in sorted(changes, key=lambda c: c[1]):
                path = Path(raw)
                if not is_image(path):
                    continue
                try:
                    if change == Change.deleted:
                        await remove_file(conn, owner, path)
                    elif path.is_file():
                        await import_file(conn, owner, path)
                except asyncpg.PostgresError as e:
                    log.error("could not import %s: %s", path, e)
    finally:
        await conn.close()
