"""The HTTP side: `GET /`, `GET /ping`, `POST /predict` as Immich's server calls them.

Requests run through the shared model pool: a text query (a person typing a search) at interactive priority,
Immich's image jobs (CLIP, faces, OCR: bulk work nobody watches) at background priority beside the listener's,
in arrival order. Images are named by a digest of the bytes Immich sent, the preview file the listener reads too,
so each photo is inferred once per task whichever of the two asks first. Tasks or models we don't serve go to an upstream Immich ML, when one is
configured (CNAI_UPSTREAM_ML_URL); otherwise they get a clear 400.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from inference import defaults
from inference.images import ImageDecodeError, decode_with_digest
from inference.ocr import OcrRequest
from inference.pool import ModelPool, Priority
from inference.runtime import ModelMissingError

from .form import PredictForm, read_predict_form
from .immich_models import DEFAULT_CLIP_SERVE_AS
from .protocol import RequestError, clean_name, number, parse_entries, serialize_embedding

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024  # Immich ML's own multipart spooling threshold; a preview is a few hundred KB


@dataclass
class GatewayConfig:
    ocr_key: str = "ocr"
    clip_model: str = defaults.CLIP_MODEL   # our cn-clip model (models dir name)
    clip_serve_as: list[str] = field(default_factory=lambda: list(DEFAULT_CLIP_SERVE_AS))
    upstream_url: str = ""
    max_body: int = MAX_BODY                 # bytes of one /predict body, all fields together; more is a 413

    def __post_init__(self):
        if self.max_body <= 0:
            raise ValueError(f"max_body must be a positive number of bytes, got {self.max_body}")


def _json_error(status: int, detail) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


class Gateway:
    def __init__(self, pool: ModelPool, config: GatewayConfig):
        self.pool = pool
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body)
        app.router.add_get("/", self.root)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/predict", self.predict)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app) -> None:
        if self._session:
            await self._session.close()

    async def root(self, _request: web.Request) -> web.Response:
        return web.json_response({"message": "Immich ML"})

    async def ping(self, _request: web.Request) -> web.Response:
        return web.Response(text="pong", content_type="text/plain")

    # --- /predict ---------------------------------------------------------------------------------------------
    async def predict(self, request: web.Request) -> web.Response:
        try:
            form = await read_predict_form(request, self.config.max_body)
        except RequestError as e:
            return _json_error(e.status, e.detail)
        except Exception as e:
            return _json_error(400, f"could not read the multipart form: {e}")
        try:
            entries = parse_entries(form.entries)
            if self._needs_upstream(entries):
                return await self._proxy(form)
            image_bytes = form.image
            text = form.text
            if image_bytes is None and text is None:
                raise RequestError(400, "Either image or text must be provided")
            image = digest = None
            if image_bytes is not None:
                try:
                    image, digest = await asyncio.get_running_loop().run_in_executor(
                        None, decode_with_digest, image_bytes)
                except ImageDecodeError as e:
                    status_msg = "Image has zero width or height" if "zero width" in str(e) else str(e)
                    raise RequestError(400, status_msg) from None
            results = await asyncio.gather(*(self._run_task(task, types, image, digest, text)
                                             for task, types in entries.items()))
            body = dict(zip(entries.keys(), results))
            if image is not None:
                body["imageHeight"] = image.height
                body["imageWidth"] = image.width
            return web.json_response(body)
        except RequestError as e:
            return _json_error(e.status, e.detail)
        except ModelMissingError as e:
            log.error("%s", e)
            return _json_error(500, f"Failed to load model: {e}")
        except Exception as e:
            log.exception("predict failed")
            return _json_error(500, f"{type(e).__name__}: {e}")

    def _served_clip(self, name: str) -> bool:
        name = clean_name(name)
        return name == clean_name(self.config.clip_model) or name in self.config.clip_serve_as

    def _needs_upstream(self, entries) -> bool:
        unknown = [f"{t}/{e.type}:{e.model_name}" for t, types in entries.items() for e in types.values()
                   if t not in ("clip", "ocr", "facial-recognition")
                   or (t == "clip" and not self._served_clip(e.model_name))]
        if not unknown:
            return False
        if self.config.upstream_url:
            return True
        raise RequestError(400, f"not served here: {', '.join(unknown)} (cnai serves CLIP as "
                                f"{', '.join([self.config.clip_model, *self.config.clip_serve_as])}; "
                                "set CNAI_UPSTREAM_ML_URL to forward other models to Immich ML)")

    async def _run_task(self, task: str, types: dict, image, digest, text):
        if task == "ocr":
            if image is None:
                raise RequestError(400, "OCR needs an image")
            if "recognition" in types and "detection" not in types:
                raise RequestError(400, "Task ocr of type recognition depends on output of (detection, ocr)")
            det = types.get("detection")
            rec = types.get("recognition")
            # what Immich ML uses for an option the request leaves out
            det_min, rec_min = defaults.OCR_DET_MIN_SCORE, defaults.OCR_REC_MIN_SCORE_WHEN_OMITTED
            max_res = defaults.OCR_MAX_RESOLUTION
            req = OcrRequest(
                image,
                det_min_score=number(det.options, "minScore", det_min, 0.0, 1.0) if det else det_min,
                rec_min_score=number(rec.options, "minScore", rec_min, 0.0, 1.0) if rec else rec_min,
                max_resolution=int(number(det.options, "maxResolution", max_res, 1, 100_000)) if det else max_res,
            )
            result = await self.pool.run(self.config.ocr_key, req, Priority.BACKGROUND, content=digest)
            return {"text": [ln.text for ln in result.lines], "box": [v for ln in result.lines for v in ln.box],
                    "boxScore": [ln.box_score for ln in result.lines],
                    "textScore": [ln.text_score for ln in result.lines]}
        if task == "clip":
            if image is not None and "visual" in types:
                vec = await self.pool.run(f"clip-visual:{self.config.clip_model}", image, Priority.BACKGROUND,
                                          content=digest)
            elif text is not None and "textual" in types:
                vec = await self.pool.run(f"clip-textual:{self.config.clip_model}", text, Priority.INTERACTIVE,
                                          content=text)
            else:
                raise RequestError(400, "clip needs an image with a visual entry or text with a textual entry")
            return serialize_embedding(vec)
        if task == "facial-recognition":
            if image is None:
                raise RequestError(400, "facial-recognition needs an image")
            det = types.get("detection")
            if det is None:
                raise RequestError(400, "Task facial-recognition of type recognition depends on output of "
                                        "(detection, facial-recognition)")
            min_score = number(det.options, "minScore", defaults.FACE_MIN_SCORE, 0.0, 1.0)
            faces = await self.pool.run(f"face:{clean_name(det.model_name)}", (image, min_score),
                                        Priority.BACKGROUND, content=digest)
            return [{"boundingBox": {"x1": float(round(f.x1)), "y1": float(round(f.y1)),
                                     "x2": float(round(f.x2)), "y2": float(round(f.y2))},
                     "embedding": serialize_embedding(f.embedding), "score": float(f.score)} for f in faces]
        raise RequestError(400, f"unsupported task {task}")

    async def _proxy(self, form: PredictForm) -> web.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        data = aiohttp.FormData()
        data.add_field("entries", form.entries)
        if form.image is not None:
            data.add_field("image", form.image, filename=form.image_filename or "blob",
                           content_type=form.image_content_type)
        if form.text is not None:
            data.add_field("text", form.text)
        url = self.config.upstream_url.rstrip("/") + "/predict"
        try:
            async with self._session.post(url, data=data) as resp:
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type=resp.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return _json_error(502, f"upstream Immich ML at {self.config.upstream_url} failed: {e}")

