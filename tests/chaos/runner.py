"""A real listener (listener.worker.Listener: LISTEN + poll, leases, reaper, one-transaction settle) with a no-op
model per task, for the chaos suite. Run as a subprocess, like `cnai listen`:

    python -m tests.chaos.runner --dsn DSN        (settings from CNAI_*; CHAOS_ITEM_MS: model time per item)

Each task's result goes through the real handler's write path (cnai.ocr / cnai.clip / cnai.face upserts), and
the same transaction appends a row to chaos_write, so the suite can count committed writes per (asset, task).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from cnai.settings import Settings
from cnai.wiring import listener_config
from inference.ocr import OcrLine, OcrResult
from inference.pool import ModelPool
from listener.task_names import TASKS
from listener.tasks import ClipHandler, FaceHandler, OcrHandler, TaskHandler
from listener.worker import Listener



@dataclass
class EchoFace:
    x1: float = 1.0
    y1: float = 1.0
    x2: float = 6.0
    y2: float = 6.0
    score: float = 0.99
    embedding: list = field(default_factory=lambda: [0.0] * 511 + [1.0])


class EchoModel:
    """A BatchModel that takes `item_ms` per item and returns a fixed, valid output for its task."""

    def __init__(self, task: str, item_ms: float):
        self.key = f"echo:{task}"
        self.task = task
        self.item_ms = item_ms
        self.max_batch = 16

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def run_batch(self, items: list) -> list:
        time.sleep(self.item_ms * len(items) / 1000)
        if self.task == "ocr":
            return [OcrResult([OcrLine("echo", [0, 0, 1, 0, 1, 1, 0, 1], 1.0, 1.0)], "echo") for _ in items]
        if self.task == "clip":
            return [[1.0] + [0.0] * 511 for _ in items]
        return [[EchoFace()] for _ in items]


@dataclass
class CountedHandler(TaskHandler):
    inner: TaskHandler | None = None
    worker: str = ""

    def request(self, image):
        return self.inner.request(image)

    async def write(self, conn, asset_id, size, output) -> None:
        await self.inner.write(conn, asset_id, size, output)
        await conn.execute("INSERT INTO chaos_write (asset_id, task, worker) VALUES ($1, $2, $3)",
                           asset_id, self.task, self.worker)


def build(dsn: str, settings: Settings, item_ms: float) -> tuple[Listener, ModelPool]:
    pool = ModelPool()
    for task in TASKS:
        pool.register(f"echo:{task}", lambda task=task: EchoModel(task, item_ms))
    config = listener_config(settings)
    inner = {"ocr": OcrHandler("ocr", "echo:ocr", model_name="echo"),
             "clip": ClipHandler("clip", "echo:clip", model_name="echo"),
             "face": FaceHandler("face", "echo:face", model_name="echo")}
    handlers = {t: CountedHandler(t, f"echo:{t}", inner=inner[t], worker=config.worker_id) for t in TASKS}
    return Listener(dsn, pool, handlers, config), pool


async def main(dsn: str) -> None:
    settings = Settings()
    listener, pool = build(dsn, settings, float(os.environ.get("CHAOS_ITEM_MS", "10")))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, listener.stop)
    print(f"worker {listener.worker}", flush=True)
    try:
        await listener.run()
    finally:
        await pool.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    args = p.parse_args()
    logging.basicConfig(level=os.environ.get("CNAI_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(args.dsn))
