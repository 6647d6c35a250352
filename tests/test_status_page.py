"""GET /status in a real headless Chromium: the page loads with the queue, throughput, failures and models; an
`ocr:` search shows the photo with its matched text marked; the retry button queues a failed job again; a
screenshot of the page is a real picture. The gateway serves it on the test's loop against the real database."""
from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile

import pytest
import pytest_asyncio
from aiohttp import web
from PIL import Image

from cnai.settings import Settings
from cnai.status_source import StatusDatabase
from cnai.wiring import build_gateway, build_pool
from tests.conftest import make_asset, make_user

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/setup --test installs "
                                       "them as root)")

OCR_TEXT = "增值税普通发票 <b>金额</b> 壹佰元整"


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1400",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest_asyncio.fixture
async def status_url(db, dsn, tmp_path):
    """The gateway's app with its status page, on a free port of 127.0.0.1; OCR loaded in its pool."""
    settings = Settings()
    settings.models_dir = tmp_path / "models"
    pool = build_pool(settings)
    await pool.preload(["ocr"])
    status = StatusDatabase(dsn)
    runner = web.AppRunner(build_gateway(pool, settings, status=status).app())
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/status"
    await runner.cleanup()
    await status.close()
    await pool.close()


async def scene(db, tmp_path):
    """A photo with OCR text and a finished job; another whose OCR job failed."""
    owner = await make_user(db)
    invoice = await make_asset(db, owner, tmp_path / "invoice.jpg", with_preview=False)
    await db.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, $2, '[]', 'test')",
                     invoice, OCR_TEXT)
    await db.execute("INSERT INTO cnai.job (asset_id, task, state, attempts, finished_at) "
                     "VALUES ($1, 'ocr', 'done', 1, now())", invoice)
    broken = await make_asset(db, owner, tmp_path / "broken.jpg", with_preview=False)
    await db.execute("INSERT INTO cnai.job (asset_id, task, state, attempts, error, finished_at) "
                     "VALUES ($1, 'ocr', 'failed', 5, 'not a readable image', now())", broken)
    return invoice, broken


def _text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def _after_submit(driver, css: str) -> None:
    """Wait for the page a form submit loads: selenium returns from submit() and click() before it arrives."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 60).until(lambda d: d.find_elements("css selector", css))


async def test_page_loads_with_queue_throughput_failures_and_models(db, tmp_path, status_url, browser):
    await scene(db, tmp_path)

    def load():
        browser.get(status_url)
        return (browser.title, _text(browser, "#queue"), _text(browser, "#throughput"), _text(browser, "#failures"),
                _text(browser, "#models"))
    title, queue, throughput, failures, models = await asyncio.to_thread(load)
    assert title == "cnai status"
    assert "ocr 0 0 1 1" in queue  # queued, running, done, failed
    assert "ocr 2 (1 failed)" in throughput  # this minute: one done, one failed
    assert "not a readable image" in failures and "Retry ocr" in failures
    assert "ocr loaded" in models


async def test_search_shows_the_photo_with_its_match_marked(db, tmp_path, status_url, browser):
    await scene(db, tmp_path)

    def search():
        browser.get(status_url)
        box = browser.find_element("id", "q")
        box.send_keys("ocr:发票")
        box.submit()
        _after_submit(browser, "#results tr")
        rows = browser.find_elements("css selector", "#results tr")
        marks = [m.text for m in browser.find_elements("css selector", "#results mark")]
        return [r.text for r in rows], marks, browser.find_element("css selector", "#results .snippet").text
    rows, marks, snippet = await asyncio.to_thread(search)
    assert len(rows) == 2  # the header and the one photo
    assert "invoice.jpg" in rows[1]
    assert marks == ["发票"]
    assert "<b>金额</b>" in snippet  # the OCR text shown as text, not as markup


async def test_retry_button_queues_the_failed_job_again(db, tmp_path, status_url, browser):
    _, broken = await scene(db, tmp_path)

    def retry():
        browser.get(status_url)
        browser.find_element("css selector", "#failures button").click()
        _after_submit(browser, "#retried")
        return _text(browser, "#retried"), _text(browser, "#queue")
    retried, queue = await asyncio.to_thread(retry)
    assert retried == "Queued again: 1 failed job(s)."
    assert await db.fetchval("SELECT state FROM cnai.job WHERE asset_id = $1", broken) == "queued"
    assert "ocr 1 0 1 0" in queue


async def test_retry_from_another_site_is_refused(db, tmp_path, status_url):
    import aiohttp
    _, broken = await scene(db, tmp_path)
    async with aiohttp.ClientSession() as session:
        async with session.post(status_url + "/retry", data={"task": "ocr"},
                                headers={"Origin": "http://elsewhere.example"}) as r:
            assert r.status == 403
        async with session.post(status_url + "/retry", data={"task": "nope"}) as r:
            assert r.status == 400 and "unknown task nope" in await r.text()
    assert await db.fetchval("SELECT state FROM cnai.job WHERE asset_id = $1", broken) == "failed"


async def test_screenshot_is_a_real_picture(db, tmp_path, status_url, browser):
    await scene(db, tmp_path)
    shot = tmp_path / "status.png"

    def screenshot():
        browser.get(status_url + "?q=ocr:发票")
        assert browser.save_screenshot(str(shot))
    await asyncio.to_thread(screenshot)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 600
        colors = dict((rgb, n) for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 22))
    assert len(colors) > 50  # rendered text, not a blank page
    # the page's own colours drawn: the highlighted match (mark, #fd4) and this minute's bar (#4a7)
    assert colors.get((0xff, 0xdd, 0x44), 0) > 100
    assert colors.get((0x44, 0xaa, 0x77), 0) > 100
