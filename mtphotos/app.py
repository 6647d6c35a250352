"""MT Photos' AI API on cnai's model pool: `POST /check`, `/ocr`, `/clip/img`, `/clip/txt`, `/represent`,
`GET /face/check`, `POST /restart`, `/restart_v2` (reference: seed.md §2, mt-photos-ai and kqstone's face API).

Results have the shapes MT Photos reads (2-decimal strings for OCR, `%.16f` strings for CLIP, `facial_area` in
integer pixels and unit-length face embeddings). Failures are real HTTP errors with a JSON `detail`: the old service
answered 200 with an empty result, which MT Photos then stored as the photo's result.

Work runs through the same pool as Immich's gateway, under the same digest of the uploaded bytes, so a photo both
apps send is inferred once; a `/clip/txt` is a person typing a search (interactive), images are background work.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
from dataclasses import dataclass

import numpy as np
from aiohttp import web

from gateway.form import read_form
from gateway.protocol import RequestError
from inference import defaults
from inference.images import ImageDecodeError, decode_with_digest
from inference.ocr import OcrRequest
from inference.pool import ModelPool, Priority
from inference.runtime import ModelMissingError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024  # one upload; MT Photos sends a photo or its thumbnail
UPLOAD_FIELD = "file"  # the one form field MT Photos uploads a photo in
UNAUTHENTICATED = ("/face/check",)  # information only, as in the service MT Photos was built against


@dataclass
class MtPhotosConfig:
    api_key: str
    clip_key: str                      # pool keys
    clip_text_key: str
    face_key: str
    face_model: str = "buffalo_l"      # what /face/check and /represent report
    face_min_score: float = defaults.FACE_MIN_SCORE
    ocr_key: str = "ocr"
    ocr_det_min_score: float = defaults.OCR_DET_MIN_SCORE
    ocr_rec_min_score: float = defaults.OCR_REC_MIN_SCORE_CONFIGURED
    ocr_max_resolution: int = defaults.OCR_MAX_RESOLUTION
    max_body: int = MAX_BODY

    def __post_init__(self):
        if not self.api_key:
            raise ValueError("the MT Photos API needs an API key (CNAI_MTPHOTOS_API_KEY)")
        if self.max_body <= 0:
            raise ValueError(f"max_body must be a positive number of bytes, got {self.max_body}")


class HttpError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def two_decimals(value: float) -> str:
    return f"{value:.2f}"


def ocr_body(result, width: int, height: int) -> dict:
    """RapidOCR lines as mt-photos-ai shaped them: each quadrilateral as its axis-aligned box in image pixels."""
    texts, scores, boxes = [], [], []
    for line in result.lines:
        xs = [v * width for v in line.box[0::2]]
        ys = [v * height for v in line.box[1::2]]
        texts.append(line.text)
        scores.append(two_decimals(line.text_score))
        boxes.append({"x": two_decimals(min(xs)), "y": two_decimals(min(ys)),
                      "width": two_decimals(max(xs) - min(xs)), "height": two_decimals(max(ys) - min(ys))})
    return {"texts": texts, "scores": scores, "boxes": boxes}


def clip_body(vec) -> list[str]:
    return ["%.16f" % float(v) for v in vec]


def face_body(face) -> dict:
    embedding = np.asarray(face.embedding, dtype=np.float64)
    norm = float(np.linalg.norm(embedding))
    x, y = int(round(face.x1)), int(round(face.y1))
    return {"embedding": (embedding / norm if norm else embedding).tolist(),
            "facial_area": {"x": x, "y": y, "w": int(round(face.x2)) - x, "h": int(round(face.y2)) - y},
            "face_confidence": float(face.score)}


class MtPhotos:
    def __init__(self, pool: ModelPool, config: MtPhotosConfig, device: str = "cpu"):
        self.pool = pool
        self.config = config
        self.device = device
        # answers by (route, HTTP status); read by the metrics page
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()

    def app(self) -> web.Application:
        # the upload is read by _read_file with its own bound (gateway.form); aiohttp's guards bodies read elsewhere
        app = web.Application(client_max_size=self.config.max_body, middlewares=[self._boundary])
        app.router.add_post("/check", self.check)
        app.router.add_post("/ocr", self.ocr)
        app.router.add_post("/clip/img", self.clip_img)
        app.router.add_post("/clip/txt", self.clip_txt)
        app.router.add_post("/represent", self.represent)
        app.router.add_get("/face/check", self.face_check)
        app.router.add_post("/restart", self.restart)
        app.router.add_post("/restart_v2", self.restart_v2)
        return app

    @web.middleware
    async def _boundary(self, request: web.Request, handler) -> web.StreamResponse:
        """The key check, and every failure as a JSON error, in one place; each answer counted by route."""
        status = 500
        try:
            if request.path not in UNAUTHENTICATED and not self._key_ok(request.headers.get("api-key", "")):
                raise HttpError(401, "Invalid API key")
            response = await handler(request)
            status = response.status
            return response
        except (HttpError, RequestError) as e:  # ours, and the shared form reader's
            status = e.status
            return _error(e.status, str(e.detail))
        except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
            status = e.status
            return _error(e.status, e.reason)
        except ModelMissingError as e:
            return _error(500, f"Failed to load model: {e}")
        except Exception as e:
            log.exception("MT Photos %s failed", request.path)
            return _error(500, f"{type(e).__name__}: {e}")
        finally:
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
            self.requests[route, str(status)] += 1

    def _key_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.config.api_key.encode())

    # --- routes -----------------------------------------------------------------------------------------------
    async def check(self, _request: web.Request) -> web.Response:
        return web.json_response({"result": "pass", "title": "cnai", "help": "MT Photos AI API served by cnai",
                                  "device": self.device})

    async def face_check(self, _request: web.Request) -> web.Response:
        return web.json_response({"title": "cnai", "link": "MT Photos AI API served by cnai",
                                  "detector_backend": "insightface", "recognition_model": self.config.face_model})

    async def restart(self, _request: web.Request) -> web.Response:
        return web.json_response({"result": "unsupported"})

    async def restart_v2(self, _request: web.Request) -> web.Response:
        # cnai keeps its models loaded and frees nothing by restarting: answered as done, nothing restarts
        return web.json_response({"result": "pass"})

    async def ocr(self, request: web.Request) -> web.Response:
        image, digest = await self._image(request)
        c = self.config
        req = OcrRequest(image, det_min_score=c.ocr_det_min_score, rec_min_score=c.ocr_rec_min_score,
                         max_resolution=c.ocr_max_resolution)
        result = await self.pool.run(c.ocr_key, req, Priority.BACKGROUND, content=digest)
        return web.json_response({"result": ocr_body(result, image.width, image.height)})

    async def clip_img(self, request: web.Request) -> web.Response:
        image, digest = await self._image(request)
        vec = await self.pool.run(self.config.clip_key, image, Priority.BACKGROUND, content=digest)
        return web.json_response({"result": clip_body(vec)})

    async def clip_txt(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, 'the body must be JSON like {"text": "海边日落"}') from None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise HttpError(400, 'the body must be JSON like {"text": "海边日落"} with a non-empty text')
        vec = await self.pool.run(self.config.clip_text_key, text, Priority.INTERACTIVE, content=text)
        return web.json_response({"result": clip_body(vec)})

    async def represent(self, request: web.Request) -> web.Response:
        image, digest = await self._image(request)
        faces = await self.pool.run(self.config.face_key, (image, self.config.face_min_score), Priority.BACKGROUND,
                                    content=digest)
        return web.json_response({"detector_backend": "insightface", "recognition_model": self.config.face_model,
                                  "result": [face_body(f) for f in faces]})

    # --- the upload -------------------------------------------------------------------------------------------
    async def _image(self, request: web.Request):
        data = await self._read_file(request)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, decode_with_digest, data)
        except ImageDecodeError as e:
            status = 413 if "limit" in str(e) or "too large" in str(e) else 400
            raise HttpError(status, str(e)) from None

    async def _read_file(self, request: web.Request) -> bytes:
        """The multipart `file` field, reading no further than max_body bytes of body."""
        fields = await read_form(request, (UPLOAD_FIELD,), self.config.max_body, urlencoded=False)
        if UPLOAD_FIELD not in fields:
            raise HttpError(400, f"no {UPLOAD_FIELD!r} field: send the photo as a multipart form field named "
                                 f"{UPLOAD_FIELD!r}")
        return fields[UPLOAD_FIELD].value


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)
