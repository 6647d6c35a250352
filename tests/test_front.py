"""Immich's search box answered by cnai: the front against an Immich API stand-in that replays what a real Immich
3.1.0 answered (tests/fixtures/immich), on the recorded scene in a real PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import aiohttp
import pytest
import pytest_asyncio

from cnai.wiring import build_pool
from inference.defaults import CLIP_MODEL
from tests.conftest import stop_process
from tests.front_scene import (ASSETS, NO_DTO, STANDIN, USERS, creds, front_client, front_settings, running_standin,
                               seed_scene)
from tests.front_scene import client, immich  # noqa: F401 - fixtures
from tests.immich_standin import ImmichStandIn

WEB_SMART = {"page": 1, "withExif": True, "visibility": "timeline", "language": "zh-CN"}
WEB_METADATA = {"page": 1, "withExif": True, "visibility": "timeline"}
NAMES = {v: k for k, v in ASSETS.items()}


def names(body) -> list[str]:
    return [NAMES[i["id"]] for i in body["assets"]["items"]]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("front-models")  # no CLIP model: text queries are Immich's


@pytest_asyncio.fixture(scope="module")
async def pool(models_dir):
    pool = build_pool(front_settings("", models_dir))
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def scene(db):
    await seed_scene(db)
    return db


async def cnai_ranking(db, query: str, owners: list[str], visibility: str = "timeline") -> list[str]:
    rows = await db.fetch("SELECT asset_id FROM cnai.search($1, NULL, $2::uuid[], visibilities => $3::text[])",
                          query, owners, [visibility])
    return [NAMES[str(r["asset_id"])] for r in rows]


async def search(client, path: str, body: dict, headers: dict):
    r = await client.post(path, json=body, headers=headers)
    return r.status, await r.json()


async def test_ocr_query_covers_the_caller_and_timeline_partners_only(client, scene, immich):
    """alice sees her photos and bob's (he shares with her, in her timeline); not carol's (shares, not in the
    timeline: Immich would let her open it, but not search it), not dave's; bob sees only his own (alice shares with
    him, not in his timeline). Ranked as cnai.search ranks, each item exactly as Immich's own search gives it."""
    standin, _ = immich
    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "query": "ocr:发票"}, creds("alice"))
    assert status == 200, body
    expected = await cnai_ranking(scene, "ocr:发票", [USERS["alice"]["id"], USERS["bob"]["id"]])
    assert names(body) == expected
    assert set(expected) == {"alice-invoice", "alice-receipt", "bob-invoice"}
    for item in body["assets"]["items"]:
        assert item == standin.search_item(item["id"], with_exif=True)
    assert body["albums"] == {"total": 0, "count": 0, "items": [], "facets": []}
    assert body["assets"]["total"] == body["assets"]["count"] == 3 and body["assets"]["nextPage"] is None
    assert body["assets"]["facets"] == []
    assert standin.posts() == []  # answered by cnai, not Immich

    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "query": "ocr:发票"}, creds("bob"))
    assert status == 200 and names(body) == ["bob-invoice"]


@pytest.mark.parametrize("query", ["OCR:发票", "ocr：发票", " Ocr： 发票 "])
async def test_ocr_prefix_any_case_and_full_width_colon(client, query):
    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "query": query}, creds("alice"))
    assert status == 200 and set(names(body)) == {"alice-invoice", "alice-receipt", "bob-invoice"}


async def test_metadata_ocr_filter_finds_one_character(client, immich):
    """The search bar's OCR mode: `北` finds alice's Beijing photo (Immich's own OCR search: 0 of 4), but not
    dave's, though his photo says 北京 too; no exif unless asked, as in Immich."""
    standin, _ = immich
    status, body = await search(client, "/api/search/metadata", {**WEB_METADATA, "ocr": "北"}, creds("alice"))
    assert status == 200 and names(body) == ["alice-beijing"]
    assert body["assets"]["items"][0] == standin.search_item(ASSETS["alice-beijing"], with_exif=True)
    mobile = {"ocr": "北京", "visibility": "timeline", "personIds": [], "page": 1, "size": 1000}
    status, body = await search(client, "/api/search/metadata", mobile, creds("alice", "api_key"))
    assert status == 200 and names(body) == ["alice-beijing"]
    assert "exifInfo" not in body["assets"]["items"][0]
    assert standin.posts() == []


async def test_visibility_archive_and_none(client, immich):
    standin, _ = immich
    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "visibility": "archive",
                                                               "query": "ocr:发票"}, creds("alice"))
    assert status == 200 and names(body) == ["alice-archived"]
    status, body = await search(client, "/api/search/smart", {"query": "ocr:发票"}, creds("alice"))
    assert status == 200 and set(names(body)) == {"alice-invoice", "alice-receipt", "bob-invoice", "alice-archived"}
    assert "exifInfo" not in body["assets"]["items"][0]
    # the locked folder was not even a candidate (Immich would have refused it, but cnai must not ask)
    assert not any(ASSETS["alice-locked"] in p.path_qs for p in standin.received)


async def test_locked_folder_only_with_an_elevated_session_and_only_ones_own(client, immich):
    """bob's locked photo says 发票 too, and bob is alice's timeline partner: it never shows (Immich's own search
    shows it to an elevated alice without a visibility; cnai does not copy that)."""
    standin, _ = immich
    locked = {"query": "ocr:发票", "visibility": "locked"}
    status, body = await search(client, "/api/search/smart", locked, creds("alice", "elevated_bearer"))
    assert status == 200 and names(body) == ["alice-locked"]
    status, body = await search(client, "/api/search/smart", {"query": "ocr:发票"},
                                creds("alice", "elevated_bearer"))
    assert status == 200
    assert set(names(body)) == {"alice-invoice", "alice-receipt", "bob-invoice", "alice-archived", "alice-locked"}
    assert standin.posts() == []
    # not elevated: Immich answers (its recorded 401), and cnai shows nothing of the locked folder
    status, body = await search(client, "/api/search/smart", {"query": "发票", "visibility": "locked"},
                                creds("alice"))
    assert status == 401 and body == {"message": "Elevated permission is required"}
    status, body = await search(client, "/api/search/metadata", {"ocr": "发票", "visibility": "locked"},
                                creds("alice"))
    assert status == 401 and body == {"message": "Elevated permission is required"}
    assert [p.path_qs for p in standin.posts()] == ["/api/search/smart", "/api/search/metadata"]


async def test_pages_follow_immichs_page_and_size(client, scene):
    ranking = await cnai_ranking(scene, "ocr:发票", [USERS["alice"]["id"], USERS["bob"]["id"]])
    pages = []
    for page in (1, 2, 3):
        status, body = await search(client, "/api/search/smart",
                                    {**WEB_SMART, "query": "ocr:发票", "size": 1, "page": page}, creds("alice"))
        assert status == 200 and body["assets"]["count"] == body["assets"]["total"] == 1
        assert body["assets"]["nextPage"] == (str(page + 1) if page < 3 else None)
        pages += names(body)
    assert pages == ranking
    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "query": "ocr:发票", "size": 2, "page": 2},
                                creds("alice"))
    assert names(body) == ranking[2:] and body["assets"]["nextPage"] is None
    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "query": "ocr:发票", "page": 4, "size": 1},
                                creds("alice"))
    assert status == 200 and body["assets"]["items"] == [] and body["assets"]["nextPage"] is None


@pytest.mark.parametrize("path, situation", [
    ("/api/search/smart", "alice-filters"),                  # dates, type, city: filters cnai does not apply
    ("/api/search/smart", "alice-filter-no-match"),          # isFavorite
    ("/api/search/smart", "alice-query-asset-id"),           # search by photo: Immich's
    ("/api/search/smart", "alice-web-query"),                # text without CLIP here: Immich's
    ("/api/search/smart", "alice-size-0"),                   # Immich says what is wrong
    ("/api/search/metadata", "alice-ocr-with-filter"),       # OCR with a file name filter
    ("/api/search/metadata", "alice-filename-only"),         # no OCR at all
    ("/api/search/metadata", "alice-page-0"),
])
async def test_what_cnai_does_not_answer_goes_to_immich_unchanged(client, immich, path, situation):
    standin, _ = immich
    rec = next(r for r in standin.recorded if r["request"]["situation"] == situation and r["request"]["path"] == path)
    r = await client.post(path, json=rec["request"]["body"], headers=rec["request"]["headers"])
    assert r.status == rec["status"] and await r.json() == rec["body"]
    [forwarded] = standin.posts()
    assert forwarded.path_qs == path
    assert forwarded.headers["Authorization"] == rec["request"]["headers"]["Authorization"]
    assert forwarded.headers["X-Forwarded-For"] == "127.0.0.1"
    assert json.loads(forwarded.body) == rec["request"]["body"]


@pytest.mark.parametrize("situation", ["bad-bearer", "logged-out-bearer", "bad-api-key", "no-credentials",
                                       "bad-cookie", "expired-share-key"])
async def test_bad_or_expired_credentials_get_immichs_401(client, immich, situation):
    standin, _ = immich
    rec = next(r for r in standin.recorded if r["request"]["situation"] == situation
               and r["request"]["path"] == "/api/users/me")
    path = "/api/search/smart?" + "&".join(f"{k}={v}" for k, v in rec["request"]["query"].items())
    r = await client.post(path, json={**WEB_SMART, "query": "ocr:发票"}, headers=rec["request"]["headers"])
    assert r.status == 401 and await r.json() == rec["body"]
    assert standin.posts() == [] and not any(p.path_qs.startswith("/api/assets/") for p in standin.received)


async def test_credentials_that_cannot_name_their_user_leave_the_search_to_immich(client, immich):
    """An API key with asset.read only may search in Immich but not read users/me; a shared link may not search
    without an album. cnai cannot learn whose photos they cover, so Immich answers, as recorded."""
    standin, _ = immich
    for situation in ("share-key-query-no-album",):
        rec = next(r for r in standin.recorded if r["request"]["situation"] == situation)
        r = await client.post(f"/api/search/metadata?key={rec['request']['query']['key']}",
                              json=rec["request"]["body"])
        assert r.status == rec["status"] == 400 and await r.json() == rec["body"]
    r = await client.post("/api/search/smart", json={**WEB_SMART, "query": "ocr:发票"},
                          headers=creds("alice", "api_key_asset_read_only"))
    assert r.status == 501  # the stand-in's "not recorded": what matters is that Immich was asked
    assert [p.path_qs for p in standin.posts()] == ["/api/search/metadata?key=" + STANDIN.index["shared_link"]["key"],
                                                   "/api/search/smart"]


async def test_immich_down_is_a_quick_502(scene, pool, dsn, models_dir):
    settings = front_settings(f"http://127.0.0.1:{closed_port()}", models_dir)
    async with front_client(pool, settings, dsn) as c:
        r = await asyncio.wait_for(c.post("/api/search/smart", json={**WEB_SMART, "query": "ocr:发票"},
                                          headers=creds("alice")), 30)
        assert r.status == 502 and "unreachable" in (await r.json())["message"]
        r = await asyncio.wait_for(c.post("/api/search/smart", json={**WEB_SMART, "query": "海边"},
                                          headers=creds("alice")), 30)
        assert r.status == 502  # forwarded: Immich cannot answer either


async def test_immich_that_hangs_is_a_502_after_the_timeout(scene, pool, dsn, models_dir):
    async with running_standin(ImmichStandIn(delay_s=120)) as (standin, url):
        async with front_client(pool, front_settings(url, models_dir, front_timeout_s=0.5), dsn) as c:
            r = await asyncio.wait_for(c.post("/api/search/smart", json={**WEB_SMART, "query": "ocr:发票"},
                                              headers=creds("alice")), 30)
            assert r.status == 502 and "within 0.5 s" in (await r.json())["message"]


async def test_cnai_database_down_is_a_quick_503(immich, pool, models_dir):
    standin, url = immich
    dead = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    async with front_client(pool, front_settings(url, models_dir), dead) as c:
        r = await asyncio.wait_for(c.post("/api/search/smart", json={**WEB_SMART, "query": "ocr:发票"},
                                          headers=creds("alice")), 30)
        body = await r.json()
        assert r.status == 503 and "cnai's database" in body["message"], body
        assert not any(p.path_qs.startswith("/api/assets/") for p in standin.received)


async def test_results_the_caller_may_not_read_are_left_out(client, scene, immich):
    """Immich has the last word on each result: a photo it refuses to the caller is left out. Here Immich's
    partner list shows carol in alice's timeline, but carol stopped sharing before the photos were asked for."""
    standin, _ = immich
    rec = next(r for r in standin.recorded if r["request"]["situation"] == "alice-shared-with")
    for partner in rec["body"]:
        partner["inTimeline"] = True
    standin.index["partners"] = [p for p in standin.index["partners"] if p["sharedBy"] != "carol"]
    standin.recorded = [r for r in standin.recorded if r["request"]["path"] != f"/api/assets/{ASSETS['carol-invoice']}"]
    status, body = await search(client, "/api/search/smart", {**WEB_SMART, "query": "ocr:卡罗尔"}, creds("alice"))
    assert status == 200 and names(body) == [] and body["assets"]["count"] == 0
    asked = [p.path_qs for p in standin.received if p.path_qs.startswith("/api/assets/")]
    assert asked == [f"/api/assets/{ASSETS['carol-invoice']}"]


def test_scene_is_complete():
    """Every photo the tests expect in an answer has a DTO in the recordings (else the stand-in says 501)."""
    for name, asset_id in ASSETS.items():
        if name not in NO_DTO | {"dave-invoice", "bob-locked"}:
            assert STANDIN.asset_dto(asset_id) is not None, name


async def test_text_query_without_the_clip_model_here_goes_to_immich(client, scene, immich):
    """Photos embedded with cnai's CLIP (by a listener elsewhere), but no CLIP text model on this machine."""
    standin, _ = immich
    await scene.execute("INSERT INTO cnai.clip (asset_id, model, embedding) VALUES ($1, $2, $3)",
                        ASSETS["alice-face"], f"cn-clip/{CLIP_MODEL}", "[" + ",".join(["0.04"] * 512) + "]")
    rec = next(r for r in standin.recorded if r["request"]["situation"] == "alice-web-query")
    r = await client.post("/api/search/smart", json=rec["request"]["body"], headers=rec["request"]["headers"])
    assert r.status == 200 and await r.json() == rec["body"]
    assert len(standin.posts()) == 1


def free_port() -> int:
    return closed_port()  # free now; the service binds it next


async def test_cnai_gateway_serves_the_front_and_its_door(scene, immich, dsn, tmp_path):
    """`cnai gateway` with CNAI_IMMICH_URL answers the searches on its port (for a reverse proxy), and with
    CNAI_FRONT_PORT opens the door on that port: Immich's API and web app there, the ML answer on the other."""
    standin, url = immich
    port, door = free_port(), free_port()
    env = {**os.environ, "CNAI_IMMICH_URL": url, "CNAI_FRONT_PORT": str(door), "CNAI_MODELS_DIR": str(tmp_path),
           "CNAI_PRELOAD": "0", "CNAI_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "cnai", "gateway", "--dsn", dsn, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{door}/api/server/ping") as r:
                        break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None, proc.stdout.read()
                    await asyncio.sleep(0.1)
            for base in (port, door):
                async with http.post(f"http://127.0.0.1:{base}/api/search/metadata", json={"ocr": "北京"},
                                     headers=creds("alice")) as r:
                    assert r.status == 200
                    assert [i["originalFileName"] for i in (await r.json())["assets"]["items"]] == ["alice-beijing.jpg"]
            async with http.get(f"http://127.0.0.1:{port}/") as r:
                assert await r.json() == {"message": "Immich ML"}
            async with http.get(f"http://127.0.0.1:{door}/api/users/me", headers=creds("bob")) as r:
                assert (await r.json())["email"] == "bob@example.com"
    finally:
        stop_process(proc, 30)
    assert standin.posts() == []


def test_a_front_door_needs_immichs_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CNAI_IMMICH_URL"}
    r = subprocess.run([sys.executable, "-m", "cnai", "gateway", "--dsn", "postgresql://x@127.0.0.1:1/x"],
                       env={**env, "CNAI_FRONT_PORT": "2283", "CNAI_MODELS_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "CNAI_FRONT_PORT needs CNAI_IMMICH_URL" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cnai", "gateway", "--dsn", "postgresql://x@127.0.0.1:1/x"],
                       env={**env, "CNAI_IMMICH_URL": "http://immich:2283/api", "CNAI_MODELS_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "without /api" in r.stderr
