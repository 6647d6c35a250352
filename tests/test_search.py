"""cnai.search and the built-in CJK tokenizer, on a real PostgreSQL (results written directly, no models)."""
from __future__ import annotations

import json
import random

import asyncpg
import pytest

from tests.conftest import make_asset, make_user
from pathlib import Path


async def add_ocr(db, owner, text: str, **asset_cols):
    asset = await make_asset(db, owner, Path(f"/photos/{random.random()}.jpg"), with_preview=False)
    for col, value in asset_cols.items():
        await db.execute(f'UPDATE asset SET "{col}" = $2 WHERE id = $1', asset, value)
    await db.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, $2, '[]', 'test')", asset, text)
    return asset


async def add_clip(db, asset, vec):
    await db.execute("INSERT INTO cnai.clip (asset_id, model, embedding) VALUES ($1, 'test', $2::vector)",
                     asset, "[" + ",".join(map(str, vec)) + "]")


async def ids(db, query, emb=None, owners=None, lim=100, offset=0):
    return [r["asset_id"] for r in await db.fetch("SELECT asset_id FROM cnai.search($1, $2::vector, $3, $4, $5)",
                                                  query, emb, owners, lim, offset)]


def unit(i: int, dim: int = 512, noise: float = 0.0, seed: int = 0):
    rnd = random.Random(seed)
    v = [rnd.gauss(0, noise) for _ in range(dim)]
    v[i] += 1.0
    return v


async def test_tokenizer_bigrams_unigrams_words(db):
    tokens = await db.fetchval("SELECT cnai.zh_tsvector('增值税发票 No.128 Hello')::text")
    for t in ("'增'", "'增值'", "'值税'", "'税发'", "'发票'", "'票'", "'no'", "'128'", "'hello'"):
        assert t in tokens
    assert await db.fetchval("SELECT cnai.zh_tsquery('')") is None
    assert await db.fetchval("SELECT cnai.zh_tsquery('  ，。！ ')") is None


@pytest.mark.parametrize("query", ["a&", "'\"", "ocr:", "hello world", "(!)", "x:*", "\\", "a <-> b", "发票 | 身份证"])
async def test_hostile_queries_never_error(db, query):
    owner = await make_user(db)
    await add_ocr(db, owner, "hello world 发票")
    await ids(db, query)
    await ids(db, "ocr:" + query)


async def test_one_and_two_character_queries_and_phrases(db):
    owner = await make_user(db)
    a = await add_ocr(db, owner, "中关村延庆")
    b = await add_ocr(db, owner, "村里的关系")
    assert set(await ids(db, "ocr:中")) == {a}
    assert set(await ids(db, "ocr:关")) == {a, b}
    assert await ids(db, "ocr:中关") == [a]
    assert await ids(db, "ocr:中关村") == [a]
    assert await ids(db, "ocr:关村") == [a]
    assert await ids(db, "ocr:村关") == []        # characters present, not adjacent in this order
    assert await ids(db, "ocr:北京") == []


async def test_latin_prefix_and_case(db):
    owner = await make_user(db)
    a = await add_ocr(db, owner, "Plate RE16TGK parked")
    b = await add_ocr(db, owner, "re16 tgk")
    assert set(await ids(db, "ocr:RE16")) == {a, b}
    assert await ids(db, "ocr:re16 tgk") == [b]
    assert set(await ids(db, "ocr:PARK")) == {a}


async def test_best_first(db):
    owner = await make_user(db)
    exact = await add_ocr(db, owner, "发票")
    long_ = await add_ocr(db, owner, "这是一张很长的收据，其中提到了发 票两个字，还有发票号码 12345 以及其他很多很多内容" * 5)
    rows = await db.fetch("SELECT asset_id, score, ocr_rank FROM cnai.search('ocr:发票')")
    assert [r["asset_id"] for r in rows] == [exact, long_]
    assert rows[0]["score"] > rows[1]["score"] and [r["ocr_rank"] for r in rows] == [1, 2]


async def test_trashed_deleted_hidden_locked_and_owners(db):
    alice, bob = await make_user(db), await make_user(db)
    visible = await add_ocr(db, alice, "身份证")
    await add_ocr(db, alice, "身份证", status="trashed")
    await add_ocr(db, alice, "身份证", visibility="locked")
    await add_ocr(db, alice, "身份证", visibility="hidden")
    trashed = await add_ocr(db, alice, "身份证")
    await db.execute('UPDATE asset SET "deletedAt" = now() WHERE id = $1', trashed)
    archived = await add_ocr(db, alice, "身份证", visibility="archive")
    bobs = await add_ocr(db, bob, "身份证")
    assert set(await ids(db, "ocr:身份证")) == {visible, archived, bobs}
    assert set(await ids(db, "ocr:身份证", owners=[alice])) == {visible, archived}
    assert await ids(db, "ocr:身份证", owners=[bob]) == [bobs]


async def test_paging(db):
    owner = await make_user(db)
    assets = [await add_ocr(db, owner, "发票 " + "字" * i) for i in range(7)]
    first = await ids(db, "ocr:发票", lim=3)
    second = await ids(db, "ocr:发票", lim=3, offset=3)
    rest = await ids(db, "ocr:发票", lim=3, offset=6)
    assert len(first) == 3 and len(second) == 3 and len(rest) == 1
    assert set(first + second + rest) == set(assets)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="lim"):
        await ids(db, "ocr:发票", lim=0)


async def test_hybrid_rrf(db):
    owner = await make_user(db)
    text_and_image = await add_ocr(db, owner, "海边日落")
    text_only = await add_ocr(db, owner, "海边日落 门票")
    image_only = await add_ocr(db, owner, "无关文字")
    await add_clip(db, text_and_image, unit(0, noise=0.05, seed=1))
    await add_clip(db, image_only, unit(0, noise=0.05, seed=2))
    await add_clip(db, text_only, unit(5))
    q = "[" + ",".join(map(str, unit(0))) + "]"
    rows = await db.fetch("SELECT * FROM cnai.search('海边日落', $1::vector)", q)
    order = [r["asset_id"] for r in rows]
    assert order[0] == text_and_image                      # in both lists
    assert set(order) == {text_and_image, text_only, image_only}
    top = rows[0]
    assert top["ocr_rank"] is not None and top["clip_rank"] is not None
    assert abs(top["score"] - (1 / (60 + top["ocr_rank"]) + 1 / (60 + top["clip_rank"]))) < 1e-9
    # 'ocr:' ignores the embedding
    assert set(await ids(db, "ocr:海边日落", q)) == {text_and_image, text_only}
    # without an embedding: OCR only
    assert set(await ids(db, "海边日落")) == {text_and_image, text_only}


async def test_ocr_search_uses_the_gin_index(db):
    owner = await make_user(db)
    for i in range(50):
        await add_ocr(db, owner, f"收据 {i}")
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")
        plan = await db.fetchval("EXPLAIN (FORMAT JSON) SELECT asset_id FROM cnai.ocr "
                                 "WHERE tokens @@ cnai.zh_tsquery('收据')")
    assert "ocr_tokens" in json.dumps(plan)
