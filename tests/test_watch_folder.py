"""The watch folder on a real PostgreSQL: one asset per file path, rescans that only stat, problems logged once."""
from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from pathlib import Path

from PIL import Image

from cnai.standalone import import_file, local_user, remove_file, sync_folder, watch_folder
from inference.images import DECODABLE_SUFFIXES, decode_image
from tests.conftest import wait_for


def photo_bytes(color: str, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(out, fmt)
    return out.getvalue()


async def assets(db) -> dict[str, object]:
    return {r["originalPath"]: r["id"] for r in await db.fetch('SELECT id, "originalPath" FROM asset')}


async def previews(db) -> dict[str, object]:
    return {r["path"]: r["assetId"] for r in await db.fetch(
        """SELECT "assetId", path FROM asset_file WHERE type = 'preview'""")}


async def footprint(db):
    """Every row the import writes, by row version (xmin changes on any write, even one that changes no value),
    and the intake rows the asset_file trigger appends for every preview written."""
    asset_rows = [tuple(r) for r in await db.fetch('SELECT id, xmin::text, "originalPath" FROM asset ORDER BY id')]
    file_rows = [tuple(r) for r in await db.fetch('SELECT id, xmin::text, path FROM asset_file ORDER BY id')]
    return asset_rows, file_rows, await db.fetchval("SELECT count(*) FROM cnai.job_intake")


def keep_mtime(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_same_photo_at_two_paths_is_two_assets_that_rescans_leave_alone(db, photo_dir):
    data = photo_bytes("red")
    (photo_dir / "sub").mkdir()
    a, b = photo_dir / "a.jpg", photo_dir / "sub" / "b.jpg"
    a.write_bytes(data)
    b.write_bytes(data)

    await sync_folder(db, photo_dir)
    found = await previews(db)
    assert set(found) == {str(a), str(b)}
    assert len(set(found.values())) == 2
    assert await assets(db) == found  # each asset's preview is its own file
    first = await footprint(db)
    assert first[2] == 2

    for _ in range(2):
        await sync_folder(db, photo_dir)
        assert await footprint(db) == first


async def test_deleting_one_copy_removes_only_its_asset(db, photo_dir):
    data = photo_bytes("green")
    paths = [photo_dir / f"{name}.jpg" for name in ("a", "b", "c")]
    for p in paths:
        p.write_bytes(data)
    await sync_folder(db, photo_dir)
    ids = await assets(db)
    assert len(set(ids.values())) == 3
    a, b, c = (str(p) for p in paths)

    paths[1].unlink()
    await sync_folder(db, photo_dir)  # a rescan notices
    assert await assets(db) == {a: ids[a], c: ids[c]}

    paths[2].unlink()
    await remove_file(db, await local_user(db), paths[2])  # as the watcher does on the event
    assert await assets(db) == {a: ids[a]}
    assert await previews(db) == {a: ids[a]}


async def test_rescan_reads_no_file_whose_size_and_mtime_are_unchanged(db, photo_dir):
    """Each sync_folder call here starts with no memory, as after a restart: the asset's stored mtime decides."""
    for color in ("red", "green", "blue"):
        (photo_dir / f"{color}.jpg").write_bytes(photo_bytes(color))
    await sync_folder(db, photo_dir)
    first = await footprint(db)
    assert first[2] == 3

    # other bytes, same size and mtime: a rescan that read files would re-index it; one that stats does not
    green = photo_dir / "green.jpg"
    data = bytearray(green.read_bytes())
    data[len(data) // 2] ^= 0xFF
    keep_mtime(green, bytes(data))
    await sync_folder(db, photo_dir)
    assert await footprint(db) == first

    # a new mtime is a change: that one file is re-indexed, nothing else is written
    st = green.stat()
    os.utime(green, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    await sync_folder(db, photo_dir)
    assets_now, files_now, intake_now = await footprint(db)
    green_id = (await assets(db))[str(green)]
    assert intake_now == first[2] + 1
    assert [r for r in files_now if r not in first[1]] == [
        r for r in files_now if r[2] == str(green)]
    stored = await db.fetchval('SELECT "fileModifiedAt" FROM asset WHERE id = $1', green_id)
    assert stored.timestamp() == green.stat().st_mtime_ns // 1000 / 1e6


async def test_size_change_under_the_same_mtime_is_seen_by_the_same_process(db, photo_dir):
    from cnai.standalone import WatchState

    state = WatchState()
    photo = photo_dir / "p.jpg"
    photo.write_bytes(photo_bytes("red"))
    await sync_folder(db, photo_dir, state)
    before = await footprint(db)
    keep_mtime(photo, photo_bytes("red", "PNG"))
    await sync_folder(db, photo_dir, state)
    after = await footprint(db)
    assert after[2] == before[2] + 1
    assert after[1] != before[1]


async def test_unreadable_file_is_logged_once_not_at_every_rescan(db, photo_dir, caplog):
    from cnai.standalone import WatchState

    loop = photo_dir / "loop.jpg"
    loop.symlink_to(loop.name)  # stat fails with ELOOP, even for root (who reads any file)
    good = photo_dir / "good.jpg"
    good.write_bytes(photo_bytes("blue"))
    state = WatchState()
    with caplog.at_level(logging.WARNING, logger="cnai.standalone"):
        for _ in range(3):
            await sync_folder(db, photo_dir, state)
        assert await import_file(db, await local_user(db), loop, state) is None  # an event for it
    logged = [r.getMessage() for r in caplog.records if "loop.jpg" in r.getMessage()]
    assert len(logged) == 1 and "symbolic links" in logged[0], logged
    assert list(await assets(db)) == [str(good)]


async def test_only_files_the_decoder_reads_become_assets(db, photo_dir):
    made = {}
    for name, fmt, color in (("a.jpg", "JPEG", "red"), ("b.JPEG", "JPEG", "blue"), ("c.png", "PNG", "red"),
                             ("d.webp", "WEBP", "red"), ("e.gif", "GIF", "red"), ("f.tif", "TIFF", "red"),
                             ("g.bmp", "BMP", "red")):
        made[name] = photo_bytes(color, fmt)
    made["h.heic"] = b"\x00\x00\x00\x18ftypheic"
    expected = {"a.jpg", "b.JPEG", "c.png", "d.webp"}
    if ".avif" in DECODABLE_SUFFIXES:  # this Pillow reads AVIF itself
        made["i.avif"] = photo_bytes("red", "AVIF")
        expected.add("i.avif")
    made[".hidden.jpg"] = made["a.jpg"]
    for name, data in made.items():
        (photo_dir / name).write_bytes(data)
    await sync_folder(db, photo_dir)
    imported = await assets(db)
    assert {Path(p).name for p in imported} == expected
    for path in imported:
        decode_image(Path(path).read_bytes())


async def test_assets_imported_by_content_checksum_are_adopted_without_reindexing(db, photo_dir):
    """Assets written before one asset per path (checksum = sha1 of the bytes) keep their ids and results."""
    owner = await local_user(db)
    kept, edited, gone = photo_dir / "kept.jpg", photo_dir / "edited.jpg", photo_dir / "gone.jpg"
    kept.write_bytes(photo_bytes("red"))
    edited.write_bytes(photo_bytes("green"))
    ids = {}
    for path, indexed_bytes in ((kept, kept.read_bytes()), (edited, photo_bytes("blue")), (gone, b"gone")):
        ids[str(path)] = await db.fetchval(
            """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
               VALUES ($1, $2, $3, $4) RETURNING id""", owner, str(path), path.name,
            hashlib.sha1(indexed_bytes).digest())
        await db.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', $2)""",
                         ids[str(path)], str(path))
    before = await footprint(db)

    await sync_folder(db, photo_dir)
    assert await assets(db) == {str(kept): ids[str(kept)], str(edited): ids[str(edited)]}
    assert {r["checksumAlgorithm"] for r in await db.fetch('SELECT "checksumAlgorithm" FROM asset')} == {"sha1-path"}
    _, files_now, intake_now = await footprint(db)
    assert intake_now == before[2] + 1  # the edited one only
    kept_file = [r for r in before[1] if r[2] == str(kept)]
    assert kept_file and kept_file[0] in files_now
    after = await footprint(db)
    await sync_folder(db, photo_dir)
    assert await footprint(db) == after


async def test_symlinked_folders_are_scanned_as_the_watcher_sees_them(db, photo_dir):
    real = photo_dir / "real"
    real.mkdir()
    (real / "x.jpg").write_bytes(photo_bytes("red"))
    (photo_dir / "link").symlink_to(real, target_is_directory=True)
    (real / "up").symlink_to(photo_dir, target_is_directory=True)  # a loop the scan must not follow round

    await sync_folder(db, photo_dir)
    found = await assets(db)
    assert set(found) == {str(real / "x.jpg"), str(photo_dir / "link" / "x.jpg")}
    first = await footprint(db)
    # an event for the file through the link finds its asset, and the rescan keeps it
    assert await import_file(db, await local_user(db), photo_dir / "link" / "x.jpg") == found[
        str(photo_dir / "link" / "x.jpg")]
    await sync_folder(db, photo_dir)
    assert await footprint(db) == first


async def test_watcher_trusts_the_file_system_over_the_event(dsn, db, photo_dir):
    """A photo deleted and written again within one debounce arrives as "deleted" and "added" in one batch, in
    no set order: the watcher keeps the asset because the file is there."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_folder(dsn, photo_dir, stop, rescan_s=3600))
    photo, marker = photo_dir / "x.jpg", photo_dir / "zz.jpg"  # the marker sorts last in a batch

    async def imported(path: Path):
        return (await assets(db)).get(str(path))
    try:
        photo.write_bytes(photo_bytes("red"))
        asset_id = await wait_for(lambda: imported(photo), timeout=30)
        photo.unlink()
        photo.write_bytes(photo_bytes("blue", "PNG"))
        marker.write_bytes(photo_bytes("green"))
        await wait_for(lambda: imported(marker), timeout=30)
        assert await assets(db) == {str(photo): asset_id, str(marker): await imported(marker)}
        stored = await db.fetchval('SELECT "fileModifiedAt" FROM asset WHERE id = $1', asset_id)
        assert stored.timestamp() == photo.stat().st_mtime_ns // 1000 / 1e6  # the new file's

        photo.unlink()
        await wait_for(lambda: _gone(db, photo), timeout=30)
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 30)


async def _gone(db, path: Path) -> bool:
    return str(path) not in await assets(db)


async def test_a_photo_caught_half_written_is_imported_once_complete(db, photo_dir):
    """The first look finds half a photo; it grows before the second look, so it waits: one import, of the whole
    file (before, the half file was indexed, then the whole one again)."""
    from cnai.standalone import WatchState

    state = WatchState(settle_s=1.0)
    photo, data = photo_dir / "p.jpg", photo_bytes("red")
    photo.write_bytes(data[: len(data) // 2])
    first_sync = asyncio.create_task(sync_folder(db, photo_dir, state))
    await wait_for(lambda: _looked_at(state, photo), timeout=30)  # the first look is taken; the second waits
    with photo.open("ab") as f:
        f.write(data[len(data) // 2:])
    await first_sync
    assert await assets(db) == {}
    await sync_folder(db, photo_dir, state)
    assert list(await assets(db)) == [str(photo)]
    assert (await footprint(db))[2] == 1  # one preview written: one import
    stored = await db.fetchval('SELECT "fileModifiedAt" FROM asset')
    assert stored.timestamp() == photo.stat().st_mtime_ns // 1000 / 1e6


async def _looked_at(state, path: Path) -> bool:
    return str(path) in state.settling


async def test_an_emptied_or_vanished_folder_keeps_its_assets_until_files_return(db, tmp_path, caplog):
    """An unmounted share looks like an empty folder (or none): its assets are kept, said once; a folder with
    files again follows its changes, so a file removed meanwhile goes then."""
    from cnai.standalone import WatchState

    folder = tmp_path / "share"
    folder.mkdir()
    paths = [folder / f"{c}.jpg" for c in ("red", "green")]
    for p in paths:
        p.write_bytes(photo_bytes(p.stem))
    state = WatchState(settle_s=0.05)
    await sync_folder(db, folder, state)
    ids = await assets(db)
    assert set(ids) == {str(p) for p in paths}

    kept = {p: p.read_bytes() for p in paths}
    with caplog.at_level(logging.WARNING, logger="cnai.standalone"):
        for p in paths:
            p.unlink()
        await sync_folder(db, folder, state)  # empty, as a mount point with nothing mounted
        assert await assets(db) == ids
        folder.rmdir()
        await sync_folder(db, folder, state)  # gone
        await sync_folder(db, folder, state)
        assert await assets(db) == ids
        folder.mkdir()
        paths[0].write_bytes(kept[paths[0]])  # back, without the green one
        await sync_folder(db, folder, state)
    warned = [r.getMessage() for r in caplog.records if "share" in r.getMessage()]
    assert len(warned) == 2 and "missing or empty" in warned[0] and "files again" in warned[1], warned
    assert await assets(db) == {str(paths[0]): ids[str(paths[0])]}

    # a single file removed from a folder that still has files is removed as before
    (folder / "other.jpg").write_bytes(photo_bytes("blue"))
    await sync_folder(db, folder, state)
    paths[0].unlink()
    await sync_folder(db, folder, state)
    assert list(await assets(db)) == [str(folder / "other.jpg")]


async def test_watcher_keeps_the_assets_of_a_folder_emptied_at_once(dsn, db, photo_dir, caplog):
    """Every file of the folder deleted in one go (the events of an unmount, or of the folder's removal): the
    watcher keeps the assets, and follows the folder again once photos are back."""
    stop = asyncio.Event()
    paths = [photo_dir / f"{c}.jpg" for c in ("red", "green")]
    for p in paths:
        p.write_bytes(photo_bytes(p.stem))
    with caplog.at_level(logging.WARNING, logger="cnai.standalone"):
        watcher = asyncio.create_task(watch_folder(dsn, photo_dir, stop, rescan_s=3600, settle_s=0.2))
        try:
            await wait_for(lambda: _count(db, 2), timeout=30)
            ids = await assets(db)
            for p in paths:
                p.unlink()
            await wait_for(lambda: _logged(caplog, "missing or empty"), timeout=30)
            assert await assets(db) == ids
            back = photo_dir / "back.jpg"
            back.write_bytes(photo_bytes("blue"))
            await wait_for(lambda: _count(db, 1), timeout=30)  # the others' files are gone: now they go
            assert list(await assets(db)) == [str(back)]
            newer = photo_dir / "newer.jpg"  # and it goes on following the folder
            newer.write_bytes(photo_bytes("red"))
            await wait_for(lambda: _count(db, 2), timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 30)


async def _count(db, n: int) -> bool:
    return len(await assets(db)) == n


async def _logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)
