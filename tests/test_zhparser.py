"""zhparser as a ranking signal and word match on top of the bigram index (sql/zhparser/code/011-012, cnai.search_ocr).

Without zhparser (CI, and most servers) search is bigrams alone and the doctor says zhparser is absent: those tests
run everywhere. The others need a zhparser build that the test server reaches through PostgreSQL 18's
extension_control_path: CNAI_TEST_ZHPARSER_CONTROL_PATH names the folder holding `extension/zhparser.control`
(with an absolute module_pathname), and the dictionary (dict.utf8.xdb, rules.utf8.ini) must be in the embedded
server's share/tsearch_data, where zhparser looks. They skip without it."""
from __future__ import annotations

import os
import random
import shutil

import asyncpg
import pytest
import pytest_asyncio

from cnai import admin
from cnai.db import migrate
from cnai.embedded import EmbeddedServer, bin_dir, scratch_folder
from tests.conftest import make_user
from tests.test_admin import fresh_database
from tests.test_search import add_ocr, ids

CONTROL_PATH = os.environ.get("CNAI_TEST_ZHPARSER_CONTROL_PATH")
needs_zhparser = pytest.mark.skipif(not CONTROL_PATH, reason="CNAI_TEST_ZHPARSER_CONTROL_PATH names no zhparser build")


def database_with_zhparser(server):
    """A new database on `server`, migrated by a connection that reaches the zhparser build. Its DSN is the plain
    one: once the extension exists, its functions name their library themselves."""
    return fresh_database(server, f"?extension_control_path=$system:{CONTROL_PATH}")


@pytest_asyncio.fixture
async def zh_db(pg_server):
    async with database_with_zhparser(pg_server) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()


def link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


@pytest.fixture
def server_without_dictionary():
    """An embedded server run from a copy of the wheel's PostgreSQL (hard links, so cheap) whose share folder lacks
    zhparser's dictionary: what a server where the dictionary was never installed looks like."""
    install = bin_dir().parent
    with scratch_folder("cnai-test-nodict-") as root:
        package = root / install.parent.name
        package.mkdir()
        libs = install.parent.parent / f"{install.parent.name}.libs"
        for source, target in ((install, package / install.name), (libs, root / libs.name)):
            if source.exists():
                shutil.copytree(source, target, copy_function=link_or_copy)
        dictionary = package / install.name / "share" / "tsearch_data" / "dict.utf8.xdb"
        dictionary.unlink(missing_ok=True)
        server = EmbeddedServer(root / "data", bin_path=package / install.name / "bin")
        server.start()
        try:
            yield server
        finally:
            server.destroy()


async def test_without_zhparser_the_doctor_says_absent_and_search_is_bigrams_alone(db):
    finding = await admin.check_zhparser(db)
    assert finding.ok and finding.detail.startswith("absent: not installed"), finding
    assert await db.fetchval("SELECT cnai.zh_words_query('增值税发票')") is None
    assert await db.fetchval("SELECT cnai.zh_words_index()") is None
    await assert_bigrams_alone(db)


async def assert_bigrams_alone(conn) -> None:
    """Search as before zhparser: the shorter text first whether the query is a word of it or not, the scores of
    bigrams alone, and words apart find nothing."""
    owner = await make_user(conn)
    near = await add_ocr(conn, owner, "楼上海景厅")
    far = await add_ocr(conn, owner, "欢迎来到上海浦东国际机场，祝您旅途愉快")
    await add_ocr(conn, owner, "增值税专用发票")
    assert await ids(conn, "ocr:上海", [owner]) == [near, far]
    assert await ids(conn, "ocr:增值税发票", [owner]) == []
    scores = [r["score"] for r in await conn.fetch("SELECT score FROM cnai.search('ocr:上海', NULL, $1)", [owner])]
    assert scores == [pytest.approx(0.5 + 0.5 * 2 / 5), pytest.approx(0.5 + 0.5 * 2 / 19)]


@needs_zhparser
async def test_the_real_word_ranks_before_a_false_friend(zh_db):
    owner = await make_user(zh_db)
    false_friend = await add_ocr(zh_db, owner, "楼上海景厅")
    real = await add_ocr(zh_db, owner, "欢迎来到上海浦东国际机场，祝您旅途愉快")
    assert await ids(zh_db, "ocr:上海", [owner]) == [real, false_friend]
    mayor = await add_ocr(zh_db, owner, "市长热线 12345")
    bridge = await add_ocr(zh_db, owner, "南京市长江大桥")
    assert await ids(zh_db, "ocr:市长", [owner]) == [mayor, bridge]
    scores = [r["score"] for r in await zh_db.fetch("SELECT score FROM cnai.search('ocr:上海', NULL, $1)", [owner])]
    assert 0.75 <= scores[0] <= 1 and 0.5 <= scores[1] < 0.75, scores


@needs_zhparser
async def test_words_apart_are_found_after_the_adjacent_ones(zh_db):
    owner = await make_user(zh_db)
    special = await add_ocr(zh_db, owner, "增值税专用发票")
    assert await ids(zh_db, "ocr:增值税发票", [owner]) == [special]
    adjacent = await add_ocr(zh_db, owner, "开具增值税发票请到二楼服务台办理相关手续")
    assert await ids(zh_db, "ocr:增值税发票", [owner]) == [adjacent, special]
    rows = await zh_db.fetch("SELECT asset_id, score FROM cnai.search('ocr:增值税发票', NULL, $1)", [owner])
    assert 0.45 <= rows[1]["score"] < 0.5 <= rows[0]["score"]
    powerbank = await add_ocr(zh_db, owner, "小米移动电源 充电宝 10000mAh")
    assert await ids(zh_db, "ocr:小米充电宝", [owner]) == [powerbank]


@needs_zhparser
async def test_pages_with_words_are_those_of_segmenting_every_match(zh_db):
    """The word index (owner and length keys, read beside the bigram keys) tells each match whether the query's words
    are its words, and reading stops once no longer text could enter the page even as a word match with its words
    adjacent: the page is that of segmenting and scoring every match. Matches of every length, real words and false
    friends, one user and two, pages of 3 and 12."""
    alice, bob = await make_user(zh_db), await make_user(zh_db)
    rnd = random.Random(11)
    filler = "天气晴朗适合出门散步"
    texts = ["楼上海景厅", "上海浦东国际机场", "欢迎来到上海", "市长热线", "南京市长江大桥", "上海 机场 大巴", "机场路上海鲜"]
    for _ in range(200):
        await add_ocr(zh_db, rnd.choice([alice, bob]), rnd.choice(texts) + filler * rnd.choice([0, 0, 1, 3, 8, 30]))
    await zh_db.execute("ANALYZE cnai.ocr")
    for query in ("上海", "市长", "上海 机场", "机场"):
        for owners in ([alice], [alice, bob]):
            for lim in (3, 12):
                expected = [r[0] for r in await zh_db.fetch(
                    """SELECT o.asset_id FROM cnai.ocr o, cnai.zh_query($1) q
                        WHERE o.tokens @@ q.exact AND o.owner_id = ANY ($2)
                        ORDER BY cnai.ocr_score(o.text_chars, q.query_chars, q.exact = q.phrase OR o.tokens @@ q.phrase,
                                                false, cnai.zh_words(o.text) @@ cnai.zh_words_query($1)) DESC,
                                 o.text_chars, o.asset_id
                        LIMIT $3""", query, owners, lim)]
                assert len(expected) == lim, (query, owners, lim)
                assert await ids(zh_db, "ocr:" + query, owners, lim=lim) == expected, (query, owners, lim)


@needs_zhparser
async def test_every_token_type_is_indexed_with_the_words_inside_compounds(zh_db):
    words = set(await zh_db.fetchval("SELECT tsvector_to_array(cnai.zh_words('周日红烧肉 一袋大米 南京市长江大桥'))"))
    assert {"周日", "红烧", "米", "大米", "长江", "大桥"} <= words, words
    # pinned on the function: a session's own zhparser settings change nothing
    await zh_db.execute("SET zhparser.multi_zall = off; SET zhparser.multi_short = off")
    assert set(await zh_db.fetchval("SELECT tsvector_to_array(cnai.zh_words('周日红烧肉 一袋大米 南京市长江大桥'))")) == words
    owner = await make_user(zh_db)
    rice = await add_ocr(zh_db, owner, "东北大米 5kg")
    assert await zh_db.fetchval("SELECT cnai.zh_words(text) @@ cnai.zh_words_query('米') FROM cnai.ocr "
                                "WHERE asset_id = $1", rice)


@needs_zhparser
async def test_words_keep_their_settings_after_a_parallel_worker_loaded_zhparser_first(pg_server):
    """A session whose first use of zhparser is in a parallel worker (the library loads there, and in the leader its
    settings reset): cnai's word functions still give the multi-mode words, so no preload is needed and the doctor
    says used, with the database's session_preload_libraries untouched."""
    async with database_with_zhparser(pg_server) as dsn:
        setup = await asyncpg.connect(dsn)
        try:
            owner = await make_user(setup)
            for i in range(200):
                await add_ocr(setup, owner, f"南京市长江大桥 {i}")
            await setup.execute("ANALYZE cnai.ocr")
        finally:
            await setup.close()
        conn = await asyncpg.connect(dsn)  # a new session: zhparser not loaded in it yet
        try:
            for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0",
                            "max_parallel_workers_per_gather = 2", "debug_parallel_query = on"):
                await conn.execute(f"SET {setting}")
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN SELECT count(*) FROM cnai.ocr WHERE to_tsvector('cnai.zh', text) @@ 'x'::tsquery"))
            assert "Gather" in plan, plan
            await conn.fetchval("SELECT count(*) FROM cnai.ocr WHERE to_tsvector('cnai.zh', text) @@ 'x'::tsquery")
            words = set(await conn.fetchval("SELECT tsvector_to_array(cnai.zh_words('南京市长江大桥'))"))
            assert {"长江", "大桥", "长江大桥"} <= words, words
            assert "zhparser" not in await conn.fetchval("SHOW session_preload_libraries")
            finding = await admin.check_zhparser(conn)
            assert finding.ok and finding.detail.startswith("used"), finding
        finally:
            await conn.close()


@needs_zhparser
async def test_a_zhparser_installed_after_the_migration_is_enabled_by_the_next_one(pg_server):
    """zhparser's code files ran on a server without it (absent); once the server has it, the next `cnai migrate`
    (as every service start runs) enables it and builds the word index, though no file changed."""
    async with fresh_database(pg_server) as dsn:  # this connection does not reach the build: not installed
        conn = await asyncpg.connect(dsn)
        try:
            assert (await admin.check_zhparser(conn)).detail.startswith("absent: not installed")
            owner = await make_user(conn)
            special = await add_ocr(conn, owner, "增值税专用发票")
        finally:
            await conn.close()
        assert await migrate(f"{dsn}?extension_control_path=$system:{CONTROL_PATH}", standalone=True) == []
        conn = await asyncpg.connect(dsn)
        try:
            finding = await admin.check_zhparser(conn)
            assert finding.ok and finding.detail.startswith("used"), finding
            assert await ids(conn, "ocr:增值税发票", [owner]) == [special]
        finally:
            await conn.close()


@needs_zhparser
async def test_a_zhparser_without_its_dictionary_counts_as_absent(server_without_dictionary):
    async with database_with_zhparser(server_without_dictionary) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'zhparser'") == 1
            finding = await admin.check_zhparser(conn)
            assert not finding.ok and finding.warning and finding.detail.startswith("dictionary missing"), finding
            assert await conn.fetchval("SELECT cnai.zh_words_query('增值税发票')") is None
            assert await conn.fetchval("SELECT cnai.zh_words_index()") is None
            await assert_bigrams_alone(conn)
        finally:
            await conn.close()
