"""The recorded Immich scene (tests/fixtures/immich/index.json) in cnai's test database: the same users and asset
ids, each photo's state, and cnai's OCR of the text in it; plus the front under test, wired as `cnai serve` wires
it, in front of an Immich API stand-in."""
from __future__ import annotations

import contextlib
import hashlib

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from cnai.settings import Settings
from cnai.wiring import build_front, build_gateway
from inference.defaults import CLIP_MODEL
from tests.immich_standin import ImmichStandIn, asset_state

STANDIN = ImmichStandIn()
USERS = STANDIN.index["users"]
ASSETS = {name: a["id"] for name, a in STANDIN.index["assets"].items()}
# never fetched with its exif while recording, so the stand-in has no DTO of it to give
NO_DTO = {"alice-upload"}


def creds(user: str, form: str = "bearer") -> dict:
    token = USERS[user]["credentials"][form]
    if form in ("api_key", "api_key_asset_read_only"):
        return {"x-api-key": token}
    return {"Authorization": f"Bearer {token}"}


async def seed_scene(db) -> None:
    for name, user in USERS.items():
        await db.execute('INSERT INTO "user" (id, email, name, "isAdmin") VALUES ($1, $2, $3, $4)',
                         user["id"], user["email"], user["name"], user["isAdmin"])
    for name, asset in STANDIN.index["assets"].items():
        visibility, trashed = asset_state(asset)
        await db.execute(
            """INSERT INTO asset (id, "ownerId", "originalPath", "originalFileName", checksum, visibility, status,
                                  "deletedAt")
               VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8 THEN now() END)""",
            asset["id"], USERS[asset["owner"]]["id"], f"/data/upload/{asset['originalFileName']}",
            asset["originalFileName"], hashlib.sha1(name.encode()).digest(), visibility,
            "trashed" if trashed else "active", trashed)
        if asset["text"] and name not in NO_DTO:
            await db.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, $2, '[]', 'test')",
                             asset["id"], "\n".join(asset["text"]))


def front_settings(immich_url: str, models_dir, **overrides) -> Settings:
    settings = Settings()
    settings.immich_url = immich_url
    settings.models_dir = models_dir
    settings.upstream_ml_url = ""
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


@contextlib.asynccontextmanager
async def front_client(pool, settings: Settings, dsn: str, door: bool = False):
    """A client of the gateway's app with the front's routes (as for a reverse proxy), or of the front door."""
    front = build_front(pool, settings, dsn)
    if door:
        app = front.door_app()
    else:
        app = build_gateway(pool, settings).app()
        front.add_search_routes(app)
    async with TestClient(TestServer(app)) as client:
        yield client


@contextlib.asynccontextmanager
async def running_standin(standin: ImmichStandIn | None = None):
    standin = standin or ImmichStandIn()
    async with TestServer(standin.app()) as server:
        yield standin, str(server.make_url("")).rstrip("/")


# Fixtures for the front's test modules (imported there by name); each module provides `scene`, `pool` and
# `models_dir`.
@pytest_asyncio.fixture
async def immich():
    """An Immich API stand-in on a real port: (the stand-in, its URL)."""
    async with running_standin() as standin_and_url:
        yield standin_and_url


@pytest_asyncio.fixture
async def client(scene, immich, pool, dsn, models_dir):
    """The gateway's app with the front's search routes, in front of the stand-in, on the seeded scene."""
    _, url = immich
    async with front_client(pool, front_settings(url, models_dir, clip_model=CLIP_MODEL), dsn) as c:
        yield c
