"""What Immich's search box costs through cnai's front, over `cnai.search` alone, same data, same run.

    python bench/front.py [--assets 5000] [--matches 300] [--size 100] [--runs 30]

One user's library of `--assets` photos with OCR text, `--matches` of them holding the query word. Each round runs,
in rotating order: `cnai.search` as the front calls it (one page of `--size` + 1, on one warm connection), and
`POST /api/search/smart {"query": "ocr:…"}` through the front on a real socket (the caller's identity and partners
from Immich's API, cnai.search, then each result's DTO from Immich's API, `--size` of them). Immich is a stand-in in
this process that answers at once with a recorded 3.1.0 DTO (tests/fixtures/immich), so the ratio is the front's
own cost; a real Immich adds the time of its own users/me, partners and asset lookups. Prints the median of each and
their ratio (and the same for a page of 10).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnai.db import migrate  # noqa: E402
from cnai.embedded import scratch_server  # noqa: E402
from cnai.settings import Settings  # noqa: E402
from cnai.wiring import build_front, build_pool  # noqa: E402
from front.database import SEARCH  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "immich"
TOKEN = "bench-token"


def recorded(path: str) -> dict:
    return json.loads((FIXTURES / path).read_text())["body"]


def immich_stand_in(user: dict) -> web.Application:
    """users/me, partners and assets/{id} as Immich 3.1.0 answered them, for one user and any asset id."""
    asset = recorded("assets-id/alice-owned.json")
    me = dict(recorded("users-me/alice-bearer.json"), id=user["id"])
    owner = dict(asset["owner"], id=user["id"])
    auth = f"Bearer {TOKEN}"

    async def users_me(request):
        if request.headers.get("Authorization") != auth:
            return web.json_response({"message": "Invalid user token"}, status=401)
        return web.json_response(me)

    async def partners(request):
        return web.json_response([])

    async def one_asset(request):
        return web.json_response(dict(asset, id=request.match_info["id"], ownerId=user["id"], owner=owner))

    app = web.Application()
    app.router.add_get("/api/users/me", users_me)
    app.router.add_get("/api/partners", partners)
    app.router.add_get("/api/assets/{id}", one_asset)
    return app


async def seed(dsn: str, assets: int, matches: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        user = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('bench@example.com') RETURNING id""")
        await conn.execute("""INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                              SELECT $1, '/photos/' || g || '.jpg', g || '.jpg', sha256(g::text::bytea)
                                FROM generate_series(1, $2) g""", user, assets)
        # every `assets // matches`-th photo holds the word, in text of varied length so ranks differ
        await conn.execute("""INSERT INTO cnai.ocr (asset_id, text, lines, model)
                              SELECT id, CASE WHEN n % $1 = 0 THEN '增值税发票 ' ELSE '' END
                                         || repeat('收据 金额 ', (1 + n % 7)::int) || md5(id::text), '[]', 'bench'
                                FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM asset) a""",
                           max(1, assets // matches))
        for table in ("asset", "cnai.ocr"):
            await conn.execute(f"VACUUM ANALYZE {table}")
        return str(user)
    finally:
        await conn.close()


async def timed(fn) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def measure(dsn: str, front_url: str, user: str, size: int, runs: int) -> tuple[float, float, int]:
    conn = await asyncpg.connect(dsn)
    body = {"page": 1, "withExif": True, "visibility": "timeline", "query": "ocr:发票", "size": size}
    found = 0
    try:
        async with aiohttp.ClientSession() as http:
            async def direct():
                await conn.fetch(SEARCH, "ocr:发票", None, [user], size + 1, 0, ["timeline"], None, None)

            async def through_front():
                nonlocal found
                async with http.post(front_url + "/api/search/smart", json=body,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    answer = await r.json()
                    assert r.status == 200, answer
                    found = answer["assets"]["count"]

            for warm in (direct, through_front):
                await warm()
            sides = {"direct": [], "front": []}
            for i in range(runs):
                order = [("direct", direct), ("front", through_front)]
                for name, fn in order[i % 2:] + order[:i % 2]:
                    sides[name].append(await timed(fn))
    finally:
        await conn.close()
    return statistics.median(sides["direct"]), statistics.median(sides["front"]), found


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", type=int, default=5000)
    ap.add_argument("--matches", type=int, default=300)
    ap.add_argument("--size", type=int, default=100, help="page size (Immich's smart search default: 100)")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with scratch_server("cnai-bench-front-") as server:
        dsn = server.dsn()
        await migrate(dsn, standalone=True)
        user = await seed(dsn, args.assets, args.matches)
        immich = web.AppRunner(immich_stand_in({"id": user}), access_log=None)
        await immich.setup()
        await web.TCPSite(immich, "127.0.0.1", 0).start()
        immich_port = immich.addresses[0][1]

        settings = Settings()
        settings.immich_url = f"http://127.0.0.1:{immich_port}"
        settings.models_dir = server.data_dir.parent / "models"  # the scratch folder: no models
        pool = build_pool(settings)
        front = build_front(pool, settings, dsn)
        door = web.AppRunner(front.door_app(), access_log=None)
        await door.setup()
        await web.TCPSite(door, "127.0.0.1", 0).start()
        front_url = f"http://127.0.0.1:{door.addresses[0][1]}"
        try:
            print(f"{args.assets} photos, {args.matches} with the word; {args.runs} rounds each, medians")
            for size in sorted({args.size, 10}):
                direct, through, found = await measure(dsn, front_url, user, size, args.runs)
                print(f"page of {size:4d} ({found} results): cnai.search {direct * 1000:7.2f} ms   "
                      f"front {through * 1000:7.2f} ms   front / cnai.search = {through / direct:5.1f}x")
        finally:
            await door.cleanup()
            await immich.cleanup()
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
