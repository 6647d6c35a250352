"""What each task does with a preview: which model to run on its image, and how its output is written."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from PIL import Image

from inference import defaults
from inference.ocr import OcrRequest, OcrResult

log = logging.getLogger(__name__)


def vector_literal(values) -> str:
    """pgvector's text form; bound as text and cast in SQL, so no client-side codec is needed."""
    return "[" + ",".join(f"{float(v):.7g}" for v in values) + "]"


@dataclass
class TaskHandler:
    task: str
    model_key: str
    # the install's model for this task, recorded in cnai.task_run with every result: `cnai backfill` compares it
    model_name: str = ""

    def request(self, image: Image.Image | None) -> Any:
        """What the model is asked; None for the image gives its options alone (ModelPool.stored_result)."""
        return image

    async def write(self, conn: asyncpg.Connection, asset_id, size: tuple[int, int] | None, output: Any) -> None:
        """Write the result and record that the task ran, both in the caller's transaction (the batch's). `size`:
        the (width, height) of the image the output was computed on."""
        await self.write_result(conn, asset_id, size, output)
        await conn.execute("SELECT cnai.record_task_run($1, $2, $3)", asset_id, self.task, self.model_name)

    async def write_result(self, conn: asyncpg.Connection, asset_id, size: tuple[int, int] | None,
                           output: Any) -> None:
        raise NotImplementedError


@dataclass
class OcrHandler(TaskHandler):
    det_min_score: float = defaults.OCR_DET_MIN_SCORE
    rec_min_score: float = defaults.OCR_REC_MIN_SCORE_CONFIGURED
    max_resolution: int = defaults.OCR_MAX_RESOLUTION

    def request(self, image: Image.Image | None) -> OcrRequest:
        return OcrRequest(image, self.det_min_score, self.rec_min_score, self.max_resolution)

    async def write_result(self, conn, asset_id, size, output: OcrResult) -> None:
        lines = [{"text": ln.text, "box": ln.box, "box_score": ln.box_score, "text_score": ln.text_score}
                 for ln in output.lines]
        # a photo without text still gets a row: "no text" is a result, and it must replace old text
        await conn.execute(
            """INSERT INTO cnai.ocr (asset_id, text, lines, model, updated_at) VALUES ($1, $2, $3::jsonb, $4, now())
               ON CONFLICT (asset_id) DO UPDATE
                 SET text = excluded.text, lines = excluded.lines, model = excluded.model, updated_at = now()""",
            asset_id, output.text, json.dumps(lines, ensure_ascii=False), output.model or self.model_name)


@dataclass
class ClipHandler(TaskHandler):
    # Immich CLIP model names our gateway answers with this model: while Immich asks for one of them (checked once
    # per batch), results also fill Immich's smart_search. Empty: never.
    smart_search_names: tuple[str, ...] = ()
    smart_search_failures: int = field(default=0, init=False, repr=False)

    async def write_result(self, conn, asset_id, size, output) -> None:
        vec = vector_literal(output)
        await conn.execute(
            """INSERT INTO cnai.clip (asset_id, model, embedding, updated_at) VALUES ($1, $2, $3::vector, now())
               ON CONFLICT (asset_id) DO UPDATE
                 SET model = excluded.model, embedding = excluded.embedding, updated_at = now()""",
            asset_id, self.model_name, vec)
        if self.smart_search_names:
            await self._mirror_to_smart_search(conn, asset_id, vec)

    async def _mirror_to_smart_search(self, conn, asset_id, vec: str) -> None:
        try:
            # a savepoint: Immich may be resizing the column or dropping rows right now; whatever fails here
            # never takes the cnai.clip write with it
            async with conn.transaction():
                await conn.execute("SELECT cnai.mirror_to_smart_search($1, $2::vector, $3)", asset_id, vec,
                                   list(self.smart_search_names))
        except asyncpg.PostgresError as e:
            self.smart_search_failures += 1
            if self.smart_search_failures == 1 or self.smart_search_failures % 100 == 0:
                log.warning("could not write a CLIP result to Immich's smart_search (%s; %d time(s) so far); "
                            "cnai.clip has it", e, self.smart_search_failures)


@dataclass
class FaceHandler(TaskHandler):
    min_score: float = defaults.FACE_MIN_SCORE

    def request(self, image: Image.Image | None):
        return (image, self.min_score)

    async def write_result(self, conn, asset_id, size, output) -> None:
        # replace the asset's faces atomically (we are inside the batch's transaction)
        await conn.execute("DELETE FROM cnai.face WHERE asset_id = $1", asset_id)
        if output:
            await conn.executemany(
                """INSERT INTO cnai.face (asset_id, x1, y1, x2, y2, score, embedding, image_width, image_height, model)
                   VALUES ($1, $2, $3, $4, $5, $6, $7::vector, $8, $9, $10)""",
                [(asset_id, float(f.x1), float(f.y1), float(f.x2), float(f.y2), float(f.score),
                  vector_literal(f.embedding), size[0], size[1], self.model_name) for f in output])
