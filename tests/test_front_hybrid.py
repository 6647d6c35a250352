"""Text queries in Immich's search box: hybrid OCR + CLIP from cnai when cnai has its CLIP model and photos embedded
with it, Immich's own smart search otherwise. A tiny cn-clip imported through the real importer stands in for the
real weights."""
from __future__ import annotations

import pytest
import pytest_asyncio

from cnai.wiring import build_pool
from gateway.protocol import serialize_embedding
from inference.defaults import CLIP_MODEL
from inference.pool import Priority
from tests.clip_fixtures import build_clip, save_official, tiny_vit
from tests.front_scene import ASSETS, USERS, creds, front_settings, seed_scene
from tests.front_scene import client, immich  # noqa: F401 - fixtures

pytest.importorskip("cn_clip")

WEB_SMART = {"page": 1, "withExif": True, "visibility": "timeline", "language": "zh-CN"}
NAMES = {v: k for k, v in ASSETS.items()}
MODEL = f"cn-clip/{CLIP_MODEL}"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from inference.clip.export import import_checkpoint
    work = tmp_path_factory.mktemp("front-clip")
    config = tiny_vit(512)
    import_checkpoint(save_official(build_clip(config, seed=5), work / "tiny.pt"), CLIP_MODEL, work / "models",
                      model_config=config)
    return work / "models"


@pytest_asyncio.fixture(scope="module")
async def pool(models_dir):
    pool = build_pool(front_settings("", models_dir, clip_model=CLIP_MODEL))
    yield pool
    await pool.close()


async def embed(pool, text: str) -> str:
    return serialize_embedding(await pool.run(f"clip-textual:{CLIP_MODEL}", text, Priority.INTERACTIVE))


@pytest_asyncio.fixture
async def scene(db, pool):
    """alice's face photo has no text, but its embedding is the query's: only CLIP finds it. Her Beijing photo
    has the same vector from another model, which a cn-clip query must not be compared with."""
    await seed_scene(db)
    sunset = await embed(pool, "海边日落")
    await db.execute("INSERT INTO cnai.clip (asset_id, model, embedding) VALUES ($1, $2, $3::vector)",
                     ASSETS["alice-face"], MODEL, sunset)
    await db.execute("INSERT INTO cnai.clip (asset_id, model, embedding) VALUES ($1, 'cn-clip/other', $2::vector)",
                     ASSETS["alice-beijing"], sunset)
    for name in ("alice-invoice", "bob-invoice", "dave-invoice"):
        await db.execute("INSERT INTO cnai.clip (asset_id, model, embedding) VALUES ($1, $2, $3::vector)",
                         ASSETS[name], MODEL, await embed(pool, name))
    return db


async def test_text_query_is_hybrid_ocr_and_clip(client, scene, pool, immich):
    standin, _ = immich
    r = await client.post("/api/search/smart", json={**WEB_SMART, "query": "海边日落"}, headers=creds("alice"))
    assert r.status == 200
    got = [NAMES[i["id"]] for i in (await r.json())["assets"]["items"]]
    assert got[0] == "alice-face" and "alice-beijing" not in got and "dave-invoice" not in got
    assert set(got) == {"alice-face", "alice-invoice", "bob-invoice"}  # CLIP ranks every embedded photo
    r = await client.post("/api/search/smart", json={**WEB_SMART, "query": "发票"}, headers=creds("alice"))
    body = await r.json()
    rows = await scene.fetch(
        "SELECT asset_id FROM cnai.search('发票', $1::vector, $2::uuid[], visibilities => '{timeline}', "
        "clip_model => $3)", await embed(pool, "发票"), [USERS["alice"]["id"], USERS["bob"]["id"]], MODEL)
    assert [i["id"] for i in body["assets"]["items"]] == [str(r["asset_id"]) for r in rows]
    assert {"alice-receipt", "alice-invoice", "bob-invoice", "alice-face"} <= {NAMES[i["id"]] for i in
                                                                              body["assets"]["items"]}
    assert standin.posts() == []


async def test_without_embeddings_of_this_model_immich_answers(client, scene, immich):
    standin, _ = immich
    await scene.execute("UPDATE cnai.clip SET model = 'cn-clip/RN50'")
    rec = next(r for r in standin.recorded if r["request"]["situation"] == "alice-web-query")
    r = await client.post("/api/search/smart", json=rec["request"]["body"], headers=rec["request"]["headers"])
    assert r.status == 200 and await r.json() == rec["body"]
    assert [p.path_qs for p in standin.posts()] == ["/api/search/smart"]


@pytest.mark.parametrize("situation", ["alice-api-key-asset-read-only", "share-key-query"])
async def test_credentials_without_an_identity_get_immichs_search(client, immich, situation):
    standin, _ = immich
    rec = next(r for r in standin.recorded if r["request"]["situation"] == situation
               and r["request"]["path"] == "/api/search/smart")
    query = "&".join(f"{k}={v}" for k, v in rec["request"]["query"].items())
    r = await client.post("/api/search/smart" + (f"?{query}" if query else ""), json=rec["request"]["body"],
                          headers=rec["request"]["headers"])
    assert r.status == rec["status"] and await r.json() == rec["body"]
    assert len(standin.posts()) == 1
