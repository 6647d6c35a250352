"""Logs an operator can read: JSON lines off a terminal, readable on one; a repeated error once a minute, counted."""
from __future__ import annotations

import io
import json
import logging

import pytest
import pytest_asyncio
import structlog
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from cnai.logs import configure_logging
from cnai.settings import Settings
from cnai.wiring import build_gateway, build_pool
from tests.test_gateway import immich_form, jpeg


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def gateway_without_face_pack(tmp_path):
    settings = Settings()
    settings.models_dir = tmp_path  # no face pack here
    settings.upstream_ml_url = ""
    pool = build_pool(settings)
    gateway = build_gateway(pool, settings)
    async with TestClient(TestServer(gateway.app())) as client:
        yield gateway, client
    await pool.close()


ENTRIES = {"facial-recognition": {"detection": {"modelName": "antelopev2", "options": {"minScore": 0.7}},
                                  "recognition": {"modelName": "antelopev2"}}}


async def test_missing_model_is_logged_once_a_minute_with_a_count(restore_logging, gateway_without_face_pack):
    stream = io.StringIO()  # not a terminal: JSON lines
    configure_logging("INFO", stream)
    gateway, client = gateway_without_face_pack
    clock = FakeClock()
    gateway.repeated_errors.clock = clock
    image = jpeg(Image.new("RGB", (64, 64), "white"))
    for _ in range(100):
        r = await client.post("/predict", data=immich_form(ENTRIES, image))
        assert r.status == 500
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is one JSON object
    missing = [line for line in lines if line.get("error_key") == "missing:face:antelopev2"]
    assert len(missing) == 1 and missing[0]["repeats"] == 0 and missing[0]["level"] == "error"
    assert "antelopev2" in missing[0]["event"] and missing[0]["logger"] == "gateway.app"

    clock.now += 61  # the next window: the next occurrence reports how many were left out
    await client.post("/predict", data=immich_form(ENTRIES, image))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    missing = [line for line in lines if line.get("error_key") == "missing:face:antelopev2"]
    assert len(missing) == 2 and missing[1]["repeats"] == 99 and "99 more" in missing[1]["event"]


def test_terminal_gets_readable_lines_with_the_fields(restore_logging):
    stream = Terminal()
    configure_logging("INFO", stream)
    logging.getLogger("cnai.test").warning("queue is %s", "slow", extra={"repeats": 3})
    structlog.get_logger("cnai.test").info("plain structlog event", task="ocr")
    out = stream.getvalue()
    assert "queue is slow" in out and "repeats" in out and "plain structlog event" in out and "task" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_json_lines_carry_exceptions_as_text(restore_logging):
    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    try:
        raise ValueError("bad preview")
    except ValueError:
        logging.getLogger("listener.worker").exception("job failed")
    structlog.get_logger("cnai").info("event with fields", model="ocr", items=3)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "job failed" and "ValueError: bad preview" in first["exception"]
    assert second["model"] == "ocr" and second["items"] == 3 and second["level"] == "info"


def test_unknown_level_is_a_clear_error(restore_logging):
    with pytest.raises(SystemExit, match="log level"):
        configure_logging("LOUD", io.StringIO())
