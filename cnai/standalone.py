"""Standalone mode: photos dropped in a folder become Immich-style assets, so the triggers index them.

Each image file gets an `asset` row (owned by a local user) and a `preview` row in `asset_file` pointing at the
file itself. As in Immich's external libraries, a file is identified by its path, not its bytes: the same photo at
two paths is two assets, each deleted with its own file. A changed file (new size or mtime) updates its preview
row (re-indexing it); a removed file deletes its asset (and, by cascade, its results); an unchanged one is
neither read nor written, so a rescan costs a stat per file.

A new or changed file is imported once two looks, `settle_s` apart, saw the same size and mtime: a photo still being
copied in is indexed once, complete. A folder that is gone or empty while it has assets is taken for an unmounted
share (as Immich marks such files offline): its assets are kept, and removals resume once it has files again.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

from inference.images import DECODABLE_SUFFIXES
from listener.worker import root_is_missing

log = logging.getLogger(__name__)

LOCAL_USER_EMAIL = "cnai@localhost"
# Immich's external libraries: checksum = sha1("path:" + path), so the (owner, checksum) key is one row per path
PATH_CHECKSUM_ALGORITHM = "sha1-path"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# between the two looks at a new or changed file; a copy that stalls longer is imported, then imported again
SETTLE_S = 1.0


def is_image(path: Path) -> bool:
    # only what the decoder reads: other files would become assets whose every job fails
    return path.suffix.lower() in DECODABLE_SUFFIXES and not path.name.startswith(".")


def path_checksum(path: str) -> bytes:
    return hashlib.sha1(f"path:{path}".encode()).digest()


def modified_at(st: os.stat_result) -> datetime:
    """The file's mtime as Postgres stores it (microseconds), so a stored value compares equal."""
    return EPOCH + timedelta(microseconds=st.st_mtime_ns // 1000)


class WatchState:
    """What one watching process remembers between rescans: the size and mtime of each file when last seen
    imported (the asset records the mtime only, so a size change under an unchanged mtime is caught within a
    process), files waiting for their second look, whether the folder looks unmounted, and the problems already
    logged, so each is logged once rather than at every rescan."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        if settle_s < 0:
            raise ValueError(f"settle_s must be 0 or more seconds, got {settle_s}")
        self.settle_s = settle_s
        self.seen: dict[str, tuple[int, int]] = {}
        self.settling: dict[str, tuple[tuple[int, int], float]] = {}  # path -> (size, mtime) and when first seen so
        self.unmounted = False
        self.problems: dict[str, str] = {}
        self.ignored: set[str] = set()

    def settled(self, path: str, st: os.stat_result) -> bool:
        """Whether an earlier look, at least settle_s ago, saw this size and mtime (the file is not being written);
        otherwise this look is remembered for the next."""
        stamp, now = (st.st_size, st.st_mtime_ns), time.monotonic()
        first = self.settling.get(path)
        if first is not None and first[0] == stamp:
            if now - first[1] < self.settle_s:
                return False
            del self.settling[path]
            return True
        self.settling[path] = (stamp, now)
        return False

    def ignore(self, path: str) -> None:
        """A file that is not an image the decoder reads: logged once (at debug), so a person can find out why."""
        if path not in self.ignored:
            self.ignored.add(path)
            log.debug("ignoring %s: not an image cnai reads (%s)", path, ", ".join(sorted(DECODABLE_SUFFIXES)))

    def unchanged(self, path: str, st: os.stat_result, stored_mtime: datetime | None) -> bool:
        stamp = (st.st_size, st.st_mtime_ns)
        if stored_mtime != modified_at(st) or self.seen.get(path, stamp) != stamp:
            return False
        self.seen[path] = stamp
        return True

    def imported(self, path: str, st: os.stat_result) -> None:
        self.seen[path] = (st.st_size, st.st_mtime_ns)
        self.problems.pop(path, None)

    def forget(self, path: str) -> None:
        self.seen.pop(path, None)
        self.settling.pop(path, None)
        self.problems.pop(path, None)

    def mount_state(self, root: Path, missing: bool, assets: int) -> bool:
        """Whether `root` is to be taken for unmounted (gone or empty while it has assets); logs each change once."""
        if missing and assets and not self.unmounted:
            self.unmounted = True
            log.warning("watch folder %s is missing or empty, but %d asset(s) come from it: taking it for an "
                        "unmounted share and keeping them until it has files again (to remove them all, leave "
                        "any file in it, e.g. .keep)", root, assets)
        elif self.unmounted and not missing:
            self.unmounted = False
            log.warning("watch folder %s has files again: following its changes", root)
        return self.unmounted

    def report(self, path: str, problem: str) -> None:
        if self.problems.get(path) != problem:
            self.problems[path] = problem
            log.warning("cannot import %s: %s (retried at every rescan, logged once)", path, problem)


def asset_path(path: Path) -> str:
    """The path an asset is known by: absolute, but symlinks kept, since a file path is the asset's identity."""
    return os.path.abspath(path)


def scan_folder(root: Path, ignored: list[str] | None = None) -> tuple[dict[str, os.stat_result], dict[str, str]]:
    """Every image file under `root` with its stat (one per file), following symlinked folders but never round a
    loop, and what could not be read (path → reason); other files are added to `ignored`."""
    found: dict[str, os.stat_result] = {}
    problems: dict[str, str] = {}
    pending = [(str(root), frozenset())]
    while pending:
        folder, ancestors = pending.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in ancestors:
                continue  # a symlink back up the tree
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        except OSError as e:
            problems[folder] = e.strerror or str(e)
            continue
        inside = ancestors | {(st.st_dev, st.st_ino)}
        for entry in entries:
            try:
                if entry.is_dir():
                    pending.append((entry.path, inside))
                elif entry.is_file() and is_image(Path(entry.name)):
                    found[entry.path] = entry.stat()
                elif ignored is not None and entry.is_file():
                    ignored.append(entry.path)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems[entry.path] = e.strerror or str(e)
    return found, problems


async def local_user(conn: asyncpg.Connection) -> object:
    # read first: an upsert would rewrite the user row at every rescan
    return await conn.fetchval('SELECT id FROM "user" WHERE email = $1', LOCAL_USER_EMAIL) or await conn.fetchval(
        """INSERT INTO "user" (email, name) VALUES ($1, 'cnai') ON CONFLICT (email) DO UPDATE SET email = excluded.email
           RETURNING id""", LOCAL_USER_EMAIL)


async def import_file(conn: asyncpg.Connection, owner, path: Path, state: WatchState | None = None,
                      st: os.stat_result | None = None) -> object | None:
    """Create or refresh the asset for one file. Returns its id, or None if it is gone, could not be imported
    (logged once in `state`), or is new or changed and not yet settled (`state.settled`: call again after
    `state.settle_s`). A file whose size and mtime are unchanged is not written."""
    state = state or WatchState()
    key = asset_path(path)
    checksum = path_checksum(key)
    try:
        st = st or os.stat(key)
        if not stat.S_ISREG(st.st_mode):
            return None
        row = await conn.fetchrow('SELECT id, "fileModifiedAt" FROM asset WHERE "ownerId" = $1 AND checksum = $2',
                                  owner, checksum)
        if row and state.unchanged(key, st, row["fileModifiedAt"]):
            return row["id"]
        if not state.settled(key, st):
            return None
        with open(key, "rb"):  # an asset for a file nobody can read would only collect failed jobs
            pass
        mtime = modified_at(st)
        async with conn.transaction():
            asset_id = await conn.fetchval(
                """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum, "checksumAlgorithm",
                                      "isExternal", "fileCreatedAt", "fileModifiedAt", "localDateTime")
                   VALUES ($1, $2, $3, $4, $5, true, $6, $6, $6)
                   ON CONFLICT ("ownerId", checksum)
                   DO UPDATE SET "fileModifiedAt" = excluded."fileModifiedAt", "updatedAt" = now()
                   RETURNING id""", owner, key, os.path.basename(key), checksum, PATH_CHECKSUM_ALGORITHM, mtime)
            # as Immich does: one upsert per asset; an unchanged path still counts as a new preview
            await conn.execute(
                """INSERT INTO asset_file ("assetId", type, path, "isEdited") VALUES ($1, 'preview', $2, false)
                   ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path, "updatedAt" = now()""",
                asset_id, key)
    except FileNotFoundError:
        state.forget(key)
        return None
    except OSError as e:
        state.report(key, e.strerror or str(e))
        return None
    except asyncpg.PostgresError as e:
        state.report(key, str(e))
        return None
    state.imported(key, st)
    log.info("imported %s", key)
    return asset_id


async def remove_file(conn: asyncpg.Connection, owner, path: Path, state: WatchState | None = None) -> None:
    key = asset_path(path)
    if state:
        state.forget(key)
    deleted = await conn.execute('DELETE FROM asset WHERE "ownerId" = $1 AND checksum = $2',
                                 owner, path_checksum(key))
    if deleted != "DELETE 0":
        log.info("removed %s", key)


async def adopt_content_checksum(conn: asyncpg.Connection, asset_id, path: str, checksum: bytes,
                                 st: os.stat_result | None) -> datetime | None:
    """An asset imported by content checksum (before assets were one per path) takes its path's checksum. If its
    file still holds the bytes it was imported from, it records the file's mtime and keeps its results; otherwise
    the import that follows re-indexes it. Returns the mtime now recorded (None: left for that import)."""
    mtime = None
    if st is not None:
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, Path(path).read_bytes)
            mtime = modified_at(st) if hashlib.sha1(data).digest() == checksum else None
        except OSError:
            pass
    await conn.execute(
        """UPDATE asset SET checksum = $2, "checksumAlgorithm" = $3, "isExternal" = true,
                            "fileModifiedAt" = coalesce($4, "fileModifiedAt")
           WHERE id = $1""", asset_id, path_checksum(path), PATH_CHECKSUM_ALGORITHM, mtime)
    return mtime


async def sync_folder(conn: asyncpg.Connection, folder: Path, state: WatchState | None = None) -> None:
    """Make the local user's assets under `folder` match its image files: a new or changed file once it has
    settled (two looks `state.settle_s` apart, the second one here after a wait, if it was not taken before)."""
    state = state or WatchState()
    owner = await local_user(conn)
    root = folder.resolve()
    loop = asyncio.get_running_loop()
    ignored: list[str] = []
    missing = await loop.run_in_executor(None, root_is_missing, root)
    present, problems = await loop.run_in_executor(None, scan_folder, root, ignored)
    for path in ignored:
        state.ignore(path)
    for path, problem in problems.items():
        state.report(path, problem)
    known = {}
    for r in await conn.fetch('SELECT id, "originalPath", "fileModifiedAt", checksum, "checksumAlgorithm" '
                              'FROM asset WHERE "ownerId" = $1', owner):
        path = r["originalPath"]
        if root not in Path(path).parents:
            continue
        stored_mtime = r["fileModifiedAt"]
        if r["checksumAlgorithm"] != PATH_CHECKSUM_ALGORITHM:
            stored_mtime = await adopt_content_checksum(conn, r["id"], path, r["checksum"], present.get(path))
        known[path] = (r["id"], stored_mtime)
    if state.mount_state(root, missing, len(known)):
        return
    looked = []
    for path in sorted(present):
        st = present[path]
        if path in known and state.unchanged(path, st, known[path][1]):
            continue
        await import_file(conn, owner, Path(path), state, st)
        looked.append(path)
    if any(path in state.settling for path in looked):
        await asyncio.sleep(state.settle_s)
        await settle_files(conn, owner, state, looked)
    # a file that could not be read, or lies in a folder that could not be listed, may still be there
    unreadable = [Path(p) for p in problems]
    gone = [(path, asset_id) for path, (asset_id, _) in known.items()
            if path not in present and not any(u == Path(path) or u in Path(path).parents for u in unreadable)]
    if gone:
        await conn.execute("DELETE FROM asset WHERE id = ANY($1::uuid[])", [asset_id for _, asset_id in gone])
        for path, _ in gone:
            state.forget(path)
            log.info("removed %s", path)
    # a problem that went away is logged again if it comes back
    for path in set(state.problems) - set(problems) - set(present):
        del state.problems[path]


async def settle_files(conn: asyncpg.Connection, owner, state: WatchState, paths=None) -> None:
    """Look again at files waiting for their second look (those of `paths`, or all): import what settled."""
    for path in sorted(state.settling if paths is None else set(paths) & set(state.settling)):
        await import_file(conn, owner, Path(path), state)


async def watch_folder(dsn: str, folder: Path, stop: asyncio.Event, rescan_s: float = 60.0,
                       settle_s: float = SETTLE_S) -> None:
    """Import what is in `folder`, then follow changes. File events are hints, the folder is the truth: a full
    rescan runs once the watcher is up (closing the gap between the first scan and the watch) and every
    `rescan_s` after, so a missed event delays a photo, never loses it. While the folder looks unmounted it is
    rescanned every second, and watched afresh once it has files again (a watch on a mount point's folder sees
    nothing of a share mounted on it later)."""
    from watchfiles import awatch

    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    state = WatchState(settle_s)
    conn = await asyncpg.connect(dsn)
    loop = asyncio.get_running_loop()
    try:
        await sync_folder(conn, root, state)
        owner = await local_user(conn)
        log.info("watching %s for photos", root)
        while not stop.is_set():
            if state.unmounted:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    if not await loop.run_in_executor(None, root_is_missing, root):  # a stat, not a rescan
                        await sync_folder(conn, root, state)
                continue
            last_scan = None
            try:
                async for changes in awatch(root, stop_event=stop, debounce=500, recursive=True,
                                            rust_timeout=1000, yield_on_timeout=True):
                    if changes:
                        await _follow(conn, owner, root, state, changes)
                    elif last_scan is None or loop.time() - last_scan >= rescan_s:
                        await sync_folder(conn, root, state)
                        last_scan = loop.time()
                    if state.unmounted:
                        break  # watched afresh once it is back
                    await settle_files(conn, owner, state)
            except FileNotFoundError:  # the folder, with no assets from it, was removed before the watch began
                state.unmounted = True
    finally:
        await conn.close()


async def _follow(conn: asyncpg.Connection, owner, root: Path, state: WatchState, changes) -> None:
    # the event says which path to look at, the file system says what happened to it (a file replaced by a
    # rename may report "deleted" after "added" in one batch)
    for raw in sorted({raw for _, raw in changes}):
        path = Path(raw)
        if not is_image(path):
            if path.is_file():
                state.ignore(str(path))
            continue
        if os.path.exists(path):
            await import_file(conn, owner, path, state)
        elif await asyncio.get_running_loop().run_in_executor(None, root_is_missing, root):
            # every file gone at once: an unmount, or the folder removed; the rescan decides, keeping the assets
            await sync_folder(conn, root, state)
            if state.unmounted:
                return
        else:
            await remove_file(conn, owner, path, state)
