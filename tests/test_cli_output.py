"""Output made for people: failure reasons that group, files the watcher skips or cannot index explained (the
matched part of a photo's text is cnai.ocr_snippet's, tested in test_search.py and through `cnai search` in
test_cli_embedded.py)."""
from __future__ import annotations

import logging

import pytest

from cnai.standalone import sync_folder
from listener.errors import PermanentJobError
from listener.worker import read_preview
from tests.conftest import make_user, run_cnai


def test_unreadable_image_reason_names_no_memory_address_and_is_the_same_for_every_file(photo_dir):
    reasons = []
    for name in ("a.jpg", "b.jpg"):
        path = photo_dir / name
        path.write_bytes(b"this is not a jpeg at all" * 20)
        with pytest.raises(PermanentJobError) as e:
            read_preview(path).decode()
        message = str(e.value)
        assert "0x" not in message and "BytesIO" not in message, message
        assert str(path) in message  # the file is still named, after the reason
        reasons.append(message.split(" — ")[0])
    assert reasons[0] == reasons[1] and reasons[0].startswith("not a readable image")


async def test_status_groups_failures_by_reason_and_names_the_files(db, dsn, photo_dir):
    owner = await make_user(db)
    errors = []
    for name in ("one.jpg", "two.jpg", "three.jpg"):
        path = photo_dir / name
        path.write_bytes(b"\x00not an image" * 10)
        try:
            read_preview(path).decode()
        except PermanentJobError as e:
            errors.append((path, str(e)))
    for path, error in errors:
        asset = await db.fetchval(
            """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
               VALUES ($1, $2, $3, sha256(convert_to($2, 'UTF8'))) RETURNING id""", owner, str(path), path.name)
        await db.execute("INSERT INTO cnai.job (asset_id, task, state, attempts, error, finished_at) "
                         "VALUES ($1, 'ocr', 'failed', 1, $2, now())", asset, error)
    out = await run_cnai("status", "--dsn", dsn)
    grouped = out.split("failed, by reason")[1].split("recent failures:")[0]
    assert len([ln for ln in grouped.splitlines() if "not a readable image" in ln]) == 1, out
    assert "     3  ocr   not a readable image" in grouped, out
    recent = out.split("recent failures:")[1]
    for path, _ in errors:
        assert str(path) in recent, out  # each file that failed is named, with why


async def test_ignored_files_are_logged_once_at_debug(db, photo_dir, caplog):
    (photo_dir / "notes.txt").write_text("not a photo")
    caplog.set_level(logging.DEBUG, logger="cnai.standalone")
    from cnai.standalone import WatchState
    state = WatchState()
    for _ in range(3):
        await sync_folder(db, photo_dir, state)
    said = [r for r in caplog.records if "notes.txt" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG, [r.getMessage() for r in said]
    assert await db.fetchval("SELECT count(*) FROM asset") == 0
