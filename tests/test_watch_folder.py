"""The watch folder on a real PostgreSQL: one asset per file path, rescans that only stat, problems logged once."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from cnai.standalone import sync_folder
from inference.images import decode_image


def photo_bytes(color: str, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(out, fmt)
    return out.getvalue()


async def assets(db) -> dict[str, object]:
    return {r["originalPath"]: r["id"] for r in await db.fetch('SELECT id, "originalPath" FROM asset')}


async def test_only_files_the_decoder_reads_become_assets(db, photo_dir):
    made = {}
    for name, fmt, color in (("a.jpg", "JPEG", "red"), ("b.JPEG", "JPEG", "blue"), ("c.png", "PNG", "red"),
                             ("d.webp", "WEBP", "red"), ("e.gif", "GIF", "red"), ("f.tif", "TIFF", "red"),
                             ("g.bmp", "BMP", "red")):
        made[name] = photo_bytes(color, fmt)
    made["h.heic"] = made["i.avif"] = b"\x00\x00\x00\x18ftypheic"
    made[".hidden.jpg"] = made["a.jpg"]
    for name, data in made.items():
        (photo_dir / name).write_bytes(data)
    await sync_folder(db, photo_dir)
    imported = await assets(db)
    assert {Path(p).name for p in imported} == {"a.jpg", "b.JPEG", "c.png", "d.webp"}
    for path in imported:
        decode_image(Path(path).read_bytes())
