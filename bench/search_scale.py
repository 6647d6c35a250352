"""Search at scale: `ocr:` and hybrid latency of cnai.search over a large synthetic library, 1 and 8 clients.

    python bench/search_scale.py [--docs 1000000] [--owners 10] [--clients 8] [--seconds 20] [--limit 100]
                                 [--shared-buffers 4GB] [--zhparser-control-path DIR]

In a scratch database on the embedded server: --docs photos of --owners users, each with an OCR text drawn from a
Chinese character-and-word frequency model (Zipf over a frequency-ordered character list and a list of words seen on
signs and receipts, with digits and Latin words; lengths as in a real library: many photos with no text, most under
40 characters, a tail of long receipts and screenshots) and a 512-d CLIP vector (clustered, unit length). The texts
are copied in as text, so cnai.ocr's generated token column computes on the server, as it does for the listener's
writes; Immich 3.1's own OCR search table (ocr_search: its tokenizeForSearch tokens, trigram index) gets the same
texts. The indexes (the definitions migrate created) are built after the load and timed, and their sizes printed.
The server gets --shared-buffers, as an operator of a library this size would give it.

Then each query class runs through cnai.search(query, embedding, ARRAY[owner], --limit), a page as Immich's search
asks for it, on connections past their sixth call (so asyncpg's prepared statements use PostgreSQL's generic plan,
as a long-lived service's do): first one client alone, then --clients at once for --seconds. Prints p50/p95/p99 per
class and against the targets (ocr: p95 <= 50 ms, hybrid p95 <= 100 ms), and, beside the lone client's figures,
Immich 3.1's own OCR query (search_quality.py's copy of it) on the same texts. A very common character (的, 店) is
the hard case: it matches a large share of the library. Last, how much of a hybrid page is the same as with each
branch taken twice as deep (what cnai.search did before it took one page's depth).

The figures above are of bigrams alone (cnai.zh_words = off). Where zhparser is usable (on the embedded server, a
build reached through --zhparser-control-path or CNAI_ZHPARSER_CONTROL_PATH, as search_quality.py takes it), its word
index is built with the others and timed, and the same classes run again with words on: cnai+zhparser.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import random
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/queue.py shadows `queue`
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import numpy as np  # noqa: E402

from cnai.db import migrate  # noqa: E402
from cnai.embedded import EmbeddedServer, scratch_folder  # noqa: E402


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


# Immich 3.1's OCR search, as search_quality.py reads it from Immich's source
_quality = _bench_module("search_quality")
immich_tokenize, IMMICH_OCR_SEARCH = _quality.immich_tokenize, _quality.IMMICH_OCR_SEARCH

# Characters in order of frequency in modern written Chinese (the most common ~500), then shop and sign characters
CHARS = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过"
    "家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从现因开些长把"
    "但让动已意高工两情文新方本实外当最理问力手全及知部现内起被点正体机想回合电重样间走美向道通做已比位市产业"
    "关门物次别信提因并由给吃店号路车站价元费街区楼场银行医院药饭面茶酒菜肉鸡鱼米水票单付收款超购东西南北京"
    "海江湖山广州深圳杭成都武汉安津苏宁重庆华新民人口出入停洗手间厕所禁止吸烟欢迎光临营业时间周末日月星期"
    "号码电话地址请勿注意安全小心滑免费优惠折扣会员卡积分送买半价特价新品上市热卖推荐招牌套餐外卖打包堂食"
)
WORDS = [
    "欢迎光临", "营业时间", "发票", "增值税", "收银员", "合计", "找零", "现金", "微信支付", "支付宝", "会员卡",
    "牛肉面", "小笼包", "奶茶", "咖啡", "火锅", "烧烤", "麻辣烫", "米线", "饺子", "包子", "豆浆", "油条", "炒饭",
    "停车场", "出口", "入口", "洗手间", "电梯", "楼梯", "禁止吸烟", "小心地滑", "注意安全", "请勿触摸",
    "地铁", "火车站", "机场", "公交", "出租车", "高铁", "售票处", "候车室", "检票口", "站台",
    "北京", "上海", "广州", "深圳", "南京", "杭州", "成都", "武汉", "西安", "重庆", "人民路", "中山路", "解放路",
    "银行", "医院", "药店", "超市", "便利店", "书店", "酒店", "宾馆", "饭店", "餐厅", "理发店", "水果店",
    "优惠", "折扣", "特价", "新品", "热卖", "推荐", "套餐", "外卖", "打包", "第二杯半价", "买一送一", "满减",
    "订单号", "交易记录", "付款成功", "确认收货", "查看物流", "联系客服", "申请退款", "通知", "公告", "物业",
]
LATIN = ["ATM", "WiFi", "KFC", "OPEN", "EXIT", "VIP", "5G", "USB", "iPhone", "Taxi", "Hotel", "Coffee", "B2", "T3"]

# query classes: (class, queries); all are drawn from the model above, so each finds something
OCR_QUERIES = [
    ("very common char", ["的", "店"]),
    ("common char", ["车", "茶"]),
    ("rare char", ["滑", "宁"]),
    ("2-char word", ["发票", "奶茶"]),
    ("3-4 char word", ["牛肉面", "营业时间"]),
    ("multi-word", ["发票 北京", "奶茶 半价"]),
    ("Latin/digits", ["ATM", "WiFi 5G"]),
    ("no match", ["龘"]),
]
HYBRID_QUERIES = ["海边日落", "奶茶", "的", "发票"]
DIM = 512


def text_model(rng: np.random.Generator):
    """Tokens and their probabilities: Zipf over characters and words, some digits and Latin, separators."""
    chars = list(dict.fromkeys(CHARS))
    numbers = [str(n) for n in rng.integers(0, 100000, 300)] + [f"¥{n}.00" for n in range(1, 200)]
    groups = [(chars, 0.50, 1.0), (WORDS, 0.25, 1.0), (LATIN, 0.02, 1.0), (numbers, 0.08, 0.0),
              ([" ", "\n"], 0.15, 0.0)]
    tokens, probs = [], []
    for items, share, exponent in groups:
        w = 1.0 / np.arange(1, len(items) + 1) ** exponent
        tokens += items
        probs.append(share * w / w.sum())
    return np.array(tokens, dtype=object), np.concatenate(probs)


def doc_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Characters of OCR text per photo: 40% none, most of the rest under 40, 5% long receipts and screenshots."""
    kind = rng.random(n)
    short = np.minimum(rng.lognormal(2.3, 0.7, n), 40)
    medium = rng.uniform(40, 200, n)
    long = rng.uniform(200, 1500, n)
    return np.where(kind < 0.40, 0, np.where(kind < 0.85, short, np.where(kind < 0.95, medium, long))).astype(int)


def make_texts(n: int, rng: np.random.Generator, tokens: np.ndarray, probs: np.ndarray) -> list[str]:
    lengths = doc_lengths(n, rng)
    token_len = np.array([len(t) for t in tokens])
    avg = float((token_len * probs).sum())
    stream = rng.choice(len(tokens), size=int(lengths.sum() / avg * 1.2) + 100, p=probs)
    cum = np.cumsum(token_len[stream])
    ends = np.searchsorted(cum, np.cumsum(lengths), side="left")
    out, start = [], 0
    for end, length in zip(ends, lengths):
        end = int(end) + (1 if length else 0)
        out.append("".join(tokens[stream[start:end]]).strip() if length else "")
        start = end
    return out


def encode_vector(v) -> bytes:
    """pgvector's binary form: dimensions, an unused word, then big-endian float32s."""
    arr = np.asarray(v, dtype=">f4")
    return struct.pack(">HH", arr.shape[0], 0) + arr.tobytes()


async def vector_codec(conn) -> None:
    await conn.set_type_codec("vector", schema="public", format="binary", encoder=encode_vector,
                              decoder=lambda b: np.frombuffer(b[4:], dtype=">f4"))


async def load(dsn: str, docs: int, owners: int, seed: int, with_clip: bool, workers: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    conn = await asyncpg.connect(dsn)
    timings: dict[str, float] = {}
    try:
        users = [await conn.fetchval("""INSERT INTO "user" (email) VALUES ($1) RETURNING id""", f"u{i}@scale")
                 for i in range(owners)]
        t = time.monotonic()
        await conn.execute(
            """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum, "fileCreatedAt")
               SELECT ($1::uuid[])[1 + g % $3], '/scale/' || g || '.jpg', g || '.jpg', sha256(g::text::bytea),
                      timestamptz '2015-01-01' + g * interval '5 minutes'
                 FROM generate_series(1, $2) g""", users, docs, owners)
        timings["assets"] = time.monotonic() - t
        ids = [r[0] for r in await conn.fetch("SELECT id FROM asset ORDER BY \"originalPath\"")]
        # indexes go after the load (faster, and their build time is one of the figures)
        index_defs = {f'{r["schemaname"]}.{r["indexname"]}': r["indexdef"] for r in await conn.fetch(
            "SELECT schemaname, indexname, indexdef FROM pg_indexes WHERE indexname IN ('ocr_search_keys', "
            "'clip_embedding', 'idx_ocr_search_text', 'ocr_word_keys')")}
        for name in index_defs:
            await conn.execute(f"DROP INDEX {name}")
    finally:
        await conn.close()

    tokens, probs = text_model(rng)
    t = time.monotonic()
    texts = make_texts(docs, rng, tokens, probs)
    timings["generate texts (client)"] = time.monotonic() - t
    chunk = 20_000

    async def copy_ocr(part: int) -> None:
        c = await asyncpg.connect(dsn)
        try:
            for lo in range(part * chunk, docs, chunk * workers):
                rows = [(ids[i], texts[i], "[]", "scale") for i in range(lo, min(lo + chunk, docs))]
                await c.copy_records_to_table("ocr", schema_name="cnai", records=rows,
                                              columns=["asset_id", "text", "lines", "model"])
                # Immich's OCR job writes ocr_search only for a photo with text
                await c.copy_records_to_table("ocr_search", columns=["assetId", "text"], records=[
                    (ids[i], " ".join(immich_tokenize(texts[i]))) for i in range(lo, min(lo + chunk, docs)) if texts[i]])
        finally:
            await c.close()

    t = time.monotonic()
    await asyncio.gather(*(copy_ocr(p) for p in range(workers)))
    timings["copy OCR text (server tokenizes)"] = time.monotonic() - t
    lengths = np.array([len(x) for x in texts])

    if with_clip:
        centroids = rng.standard_normal((1000, DIM)).astype(np.float32)

        async def copy_clip(part: int) -> None:
            c = await asyncpg.connect(dsn)
            await vector_codec(c)
            local = np.random.default_rng(seed + 1 + part)
            try:
                for lo in range(part * chunk, docs, chunk * workers):
                    hi = min(lo + chunk, docs)
                    v = centroids[local.integers(0, len(centroids), hi - lo)] + \
                        0.7 * local.standard_normal((hi - lo, DIM)).astype(np.float32)
                    v /= np.linalg.norm(v, axis=1, keepdims=True)
                    await c.copy_records_to_table("clip", schema_name="cnai", columns=["asset_id", "model",
                                                                                       "embedding"],
                                                  records=[(ids[lo + k], "scale", v[k]) for k in range(hi - lo)])
            finally:
                await c.close()

        t = time.monotonic()
        await asyncio.gather(*(copy_clip(p) for p in range(workers)))
        timings["copy CLIP vectors"] = time.monotonic() - t

    conn = await asyncpg.connect(dsn)
    sizes = {}
    try:
        await conn.execute("SET maintenance_work_mem = '8GB'")  # HNSW's graph of a million vectors fits
        await conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
        for name, ddl in index_defs.items():
            if name == "cnai.clip_embedding" and not with_clip:
                continue
            t = time.monotonic()
            await conn.execute(ddl)
            timings[f"build index {name}"] = time.monotonic() - t
            sizes[name] = await conn.fetchval("SELECT pg_relation_size($1::regclass)", name)
        t = time.monotonic()
        await conn.execute("VACUUM ANALYZE asset")
        await conn.execute("VACUUM ANALYZE cnai.ocr")
        await conn.execute("VACUUM ANALYZE ocr_search")
        if with_clip:
            await conn.execute("VACUUM ANALYZE cnai.clip")
        timings["vacuum analyze"] = time.monotonic() - t
        for table in ("cnai.ocr", "cnai.clip", "asset", "ocr_search"):
            sizes[table] = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
    finally:
        await conn.close()
    return {"users": users, "timings": timings, "sizes": sizes, "lengths": lengths}


SEARCH = "SELECT asset_id FROM cnai.search($1, $2::text::vector, ARRAY[$3::uuid], $4)"
IMMICH_TIMEOUT_S = 30


def percentiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return (xs[0],) * 3 if xs else (float("nan"),) * 3
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return statistics.median(xs), q[94], q[98]


async def measure(dsn: str, users: list, limit: int, clients: int, seconds: float, rounds: int, seed: int,
                  with_clip: bool, words: bool = False, beside: bool = True) -> tuple:
    """words: with zhparser's words (cnai.zh_words on) or bigrams alone; beside: also Immich's own query and the
    bound's and hybrid depth's costs."""
    rng = random.Random(seed)
    vec = np.random.default_rng(seed + 99).standard_normal(DIM)
    emb = "[" + ",".join(f"{x:.6f}" for x in vec / np.linalg.norm(vec)) + "]"
    work = [(cls, "ocr:" + q, None) for cls, qs in OCR_QUERIES for q in qs]
    if with_clip:
        work += [("hybrid", q, emb) for q in HYBRID_QUERIES]
    pool = await asyncpg.create_pool(dsn, min_size=clients, max_size=clients,
                                     server_settings={"cnai.zh_words": "on" if words else "off"})
    try:
        async def warm(conn, k: int):
            # past the sixth call: the generic plan a long-lived connection settles on; each user's matches read
            # once at least, as a server that has been answering for a while has them in memory
            for i in range(6):
                for _cls, q, e in work:
                    await conn.fetch(SEARCH, q, e, users[(k * 6 + i) % len(users)], limit)
        conns = [await pool.acquire() for _ in range(clients)]
        await asyncio.gather(*(warm(c, k) for k, c in enumerate(conns)))
        matches = {q: await conns[0].fetchval(
            "SELECT count(*) FROM cnai.ocr o WHERE o.owner_id = $2 AND o.tokens @@ cnai.zh_tsquery($1)",
            q[4:], users[0]) for _cls, q, e in work if e is None} if beside else {}

        alone: dict[str, list[float]] = {}
        for _ in range(rounds):
            for cls, q, e in work:
                t = time.perf_counter()
                await conns[0].fetch(SEARCH, q, e, rng.choice(users), limit)
                alone.setdefault(cls, []).append((time.perf_counter() - t) * 1000)
        # Immich's own OCR search, same queries and page: a trigram scan that grows with the library, so fewer runs,
        # each cut off after IMMICH_TIMEOUT_S (counted as that long)
        immich: dict[str, list[float]] = {}
        await conns[0].execute(f"SET statement_timeout = '{IMMICH_TIMEOUT_S}s'")
        for _ in range(min(rounds, 2) if beside else 0):
            for cls, q, e in work:
                if e is None:
                    t = time.perf_counter()
                    try:
                        await conns[0].fetch(IMMICH_OCR_SEARCH, " ".join(immich_tokenize(q[4:])),
                                             [rng.choice(users)], limit)
                    except asyncpg.QueryCanceledError:
                        pass
                    immich.setdefault(cls, []).append((time.perf_counter() - t) * 1000)
        await conns[0].execute("RESET statement_timeout")
        overlap = await hybrid_page_overlap(conns[0], users, limit, seed) if with_clip and beside else []
        bounded = await bounded_page_overlap(conns[0], users, limit) if beside else {}

        together: dict[str, list[float]] = {}
        done = 0
        stop = time.monotonic() + seconds

        async def client(conn, k: int):
            nonlocal done
            local = random.Random(seed + k)
            while time.monotonic() < stop:
                cls, q, e = local.choice(work)
                t = time.perf_counter()
                await conn.fetch(SEARCH, q, e, local.choice(users), limit)
                together.setdefault(cls, []).append((time.perf_counter() - t) * 1000)
                done += 1
        await asyncio.gather(*(client(c, k) for k, c in enumerate(conns)))
        for c in conns:
            await pool.release(c)
    finally:
        await pool.close()
    return alone, immich, together, done, matches, overlap, bounded


async def bounded_page_overlap(conn, users: list, limit: int) -> dict[str, float]:
    """For several-word queries: results a page shares with ranking every match (cnai.ocr_candidates unbounded),
    on average over 4 users."""
    queries = ["发票 北京", "奶茶 半价", "WiFi 5G", "发票 半价", "咖啡 优惠", "地铁 出口", "北京 上海", "银行 ATM"]
    shared = {}
    for q in queries:
        counts = []
        for user in users[:4]:
            page = {r[0] for r in await conn.fetch(SEARCH, "ocr:" + q, None, user, limit)}
            async with conn.transaction():
                await conn.execute("SET LOCAL cnai.ocr_candidates = 100000000")
                every = {r[0] for r in await conn.fetch(SEARCH, "ocr:" + q, None, user, limit)}
            # a user with nothing to find misses nothing
            counts.append(len(page & every) / len(every) if every else 1.0)
        shared[q] = statistics.mean(counts)
    return shared


async def hybrid_page_overlap(conn, users: list, limit: int, seed: int) -> list[int]:
    """For each hybrid query and a few users and embeddings: results a page shares with the same fusion of branches
    taken twice as deep (what cnai.search took before)."""
    await conn.execute("""
        CREATE OR REPLACE FUNCTION pg_temp.fused(q text, e vector, owners uuid[], lim integer, depth integer)
        RETURNS SETOF uuid LANGUAGE sql AS $$
          SELECT coalesce(o.asset_id, c.asset_id)
            FROM cnai.search_ocr(q, owners, depth) o FULL JOIN cnai.search_clip(e, owners, depth) c USING (asset_id)
           ORDER BY coalesce(1.0 / (60 + o.ocr_rank), 0) + coalesce(1.0 / (60 + c.clip_rank), 0) DESC, 1 LIMIT lim
        $$""")
    vectors = np.random.default_rng(seed + 7).standard_normal((3, DIM))
    shared = []
    for q in HYBRID_QUERIES:
        for k, v in enumerate(vectors):
            emb = "[" + ",".join(f"{x:.6f}" for x in v / np.linalg.norm(v)) + "]"
            page = [r[0] for r in await conn.fetch(SEARCH, q, emb, users[k % len(users)], limit)]
            deeper = [r[0] for r in await conn.fetch("SELECT * FROM pg_temp.fused($1, $2::text::vector, "
                                                     "ARRAY[$3::uuid], $4, $5)", q, emb, users[k % len(users)],
                                                     limit, 2 * limit)]
            shared.append(len(set(page) & set(deeper)))
    return shared


async def bound_setting(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT cnai.ocr_candidates()")
    finally:
        await conn.close()


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


async def loaded_before(dsn: str) -> list | None:
    """The users of a library an earlier run loaded into --data-dir, if any."""
    conn = await asyncpg.connect(dsn)
    try:
        users = [r[0] for r in await conn.fetch("""SELECT id FROM "user" WHERE email LIKE 'u%@scale' ORDER BY email""")]
        photos = await conn.fetchval("SELECT count(*) FROM cnai.ocr")
    finally:
        await conn.close()
    return (users, photos) if users else None


async def zhparser_state(dsn: str) -> tuple[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return tuple(await conn.fetchrow("SELECT state, detail FROM cnai.zhparser_state()"))
    finally:
        await conn.close()


def print_targets(together: dict, clients: int) -> None:
    ocr_all = [x for cls, xs in together.items() if cls != "hybrid" for x in xs]
    checks = [("ocr: p95 (all classes)", percentiles(ocr_all)[1], 50.0)]
    checks += [(f"ocr: p95 {cls}", percentiles(xs)[1], 50.0) for cls, xs in together.items() if cls != "hybrid"]
    if "hybrid" in together:
        checks.append(("hybrid p95", percentiles(together["hybrid"])[1], 100.0))
    print(f"\ntargets, {clients} clients at once:")
    for name, value, target in checks:
        print(f"  {name:32s} {value:8.1f} ms  target <= {target:.0f} ms  {value / target:5.2f}x of target  "
              f"{'met' if value <= target else 'MISSED'}")


def print_latencies(alone: dict, together: dict, clients: int, immich: dict | None = None,
                    matches: dict | None = None) -> None:
    """p50/p95/p99 per class, one client alone and `clients` at once; where given, Immich's own query beside and
    each query's matches for user 1 in brackets."""
    beside = f"   {'Immich p50':>10s} {'p95':>7s}" if immich is not None else ""
    print(f"{'class':34s} {'1 client: p50':>14s} {'p95':>7s} {'p99':>7s}{beside}   "
          f"{f'{clients} clients: p50':>15s} {'p95':>7s} {'p99':>7s}")
    for cls in alone:
        a, b = percentiles(alone[cls]), percentiles(together.get(cls, []))
        label = cls
        if matches and cls != "hybrid":
            label += f" ({', '.join(str(matches['ocr:' + q]) for c, qs in OCR_QUERIES if c == cls for q in qs)})"
        if immich is not None:
            beside = (f"   {percentiles(immich[cls])[0]:10.1f} {percentiles(immich[cls])[1]:7.1f}" if cls in immich
                      else f"   {'':10s} {'':7s}")
        print(f"{label:34s}"[:34] + f" {a[0]:14.1f} {a[1]:7.1f} {a[2]:7.1f}{beside}   "
              f"{b[0]:15.1f} {b[1]:7.1f} {b[2]:7.1f}")


async def run(args, dsn: str) -> None:
    # zhparser, where a build is given, is created by the migration; its functions then name their library
    control_path = (f"?extension_control_path=$system:{args.zhparser_control_path.resolve()}"
                    if args.zhparser_control_path else "")
    await migrate(dsn + control_path, standalone=True)
    before = await loaded_before(dsn)
    if before:  # the search's code is re-applied by migrate above; the data and its indexes are the earlier run's
        users, photos = before
        print(f"reusing the library loaded earlier in {args.data_dir}: {photos:,} photos of {len(users)} users")
    else:
        t = time.monotonic()
        loaded = await load(dsn, args.docs, args.owners, args.seed, not args.no_clip)
        users, lengths = loaded["users"], loaded["lengths"]
        print(f"{args.docs:,} photos of {args.owners} users loaded in {time.monotonic() - t:.0f} s; OCR text lengths: "
              f"{np.mean(lengths == 0):.0%} none, {np.mean((lengths > 0) & (lengths <= 40)):.0%} 1-40 chars, "
              f"{np.mean(lengths > 40):.0%} longer (max {lengths.max()}), mean {lengths.mean():.1f}")
        for step, secs in loaded["timings"].items():
            print(f"  {step:34s} {secs:8.1f} s")
        for name, size in loaded["sizes"].items():
            print(f"  size of {name:26s} {mib(size)}")
    state, detail = await zhparser_state(dsn)
    print(f"zhparser: {state}: {detail}")

    alone, immich, together, done, matches, overlap, bounded = await measure(
        dsn, users, args.limit, args.clients, args.seconds, args.rounds, args.seed, not args.no_clip)
    print(f"\ncnai.search (bigrams alone), page of {args.limit}, one user of {len(users)} "
          f"(matches for user 1 in brackets); Immich 3.1's own OCR query beside it; ms")
    print_latencies(alone, together, args.clients, immich, matches)
    print(f"{args.clients} clients: {done / args.seconds:.1f} searches/s over {args.seconds:.0f} s")
    bound = await bound_setting(dsn)
    print(f"several words, cnai.ocr_candidates = {bound}: share of a page that ranking every match gives: "
          + ", ".join(f"{q} {v:.0%}" for q, v in bounded.items()))
    if overlap:
        print(f"hybrid: a page shares {statistics.mean(overlap):.1f} of its {args.limit} results (min {min(overlap)}) "
              f"with branches taken twice as deep ({len(overlap)} searches)")
    print_targets(together, args.clients)

    if state == "used":
        z_alone, _, z_together, z_done, *_ = await measure(
            dsn, users, args.limit, args.clients, args.seconds, args.rounds, args.seed, not args.no_clip,
            words=True, beside=False)
        print("\ncnai+zhparser (words on), the same searches; ms")
        print_latencies(z_alone, z_together, args.clients)
        print(f"{args.clients} clients: {z_done / args.seconds:.1f} searches/s over {args.seconds:.0f} s")
        print_targets(z_together, args.clients)


def set_shared_buffers(server: EmbeddedServer, size: str) -> None:
    async def alter():
        conn = await asyncpg.connect(server.dsn())
        try:
            await conn.execute(f"ALTER SYSTEM SET shared_buffers = '{size}'")
        finally:
            await conn.close()
    asyncio.run(alter())
    server.stop()  # shared_buffers takes a restart
    server.start()
    print(f"server: shared_buffers {size}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--owners", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the concurrent clients run")
    ap.add_argument("--rounds", type=int, default=10, help="runs of each query by the lone client")
    ap.add_argument("--limit", type=int, default=100, help="page size asked of cnai.search (Immich's: 100)")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--no-clip", action="store_true", help="OCR only: no vectors, no hybrid")
    ap.add_argument("--data-dir", type=Path, help="keep the scratch server and its library here, to measure again "
                                                  "without loading (default: a temporary folder)")
    ap.add_argument("--shared-buffers", default="4GB", help="the server's shared_buffers (default: 4GB)")
    ap.add_argument("--zhparser-control-path", type=Path, default=os.environ.get("CNAI_ZHPARSER_CONTROL_PATH"),
                    help="a zhparser build for the embedded server: the folder holding extension/zhparser.control "
                         "(PostgreSQL 18's extension_control_path; default: $CNAI_ZHPARSER_CONTROL_PATH)")
    args = ap.parse_args(argv)
    if args.zhparser_control_path and not (args.zhparser_control_path / "extension" / "zhparser.control").is_file():
        ap.error(f"--zhparser-control-path: no extension/zhparser.control in {args.zhparser_control_path}")
    for name in ("docs", "owners", "clients", "rounds", "limit"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    logging.basicConfig(level=logging.WARNING)

    with scratch_folder("cnai-bench-scale-") as tmp:
        server = EmbeddedServer(args.data_dir or tmp / "pg")
        server.start()
        try:
            set_shared_buffers(server, args.shared_buffers)
            asyncio.run(run(args, server.dsn()))
        finally:
            server.stop() if args.data_dir else server.destroy()


if __name__ == "__main__":
    main()
