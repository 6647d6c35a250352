"""The HTTP side: `GET /`, `GET /ping`, `POST /predict` as Immich's server calls them, `GET /metrics`, and the
operator's `GET /status` page (gateway/status_page.py).

Requests run through the shared model pool: a text query (a person typing a search) at interactive
priority, Immich's image jobs (CLIP, faces, OCR: bulk work nobody watches) at background priority beside
the listener's, in arrival order. Images are named by a digest of the bytes Immich sent, the preview file the
listener reads too, so each photo is inferred once per task whichever of the two asks first. Which models are
answered here is one table (gateway/routing.py): models we don't serve, and those whose files are missing
here, go to an upstream Immich ML when one is configured (CNAI_UPSTREAM_ML_URL); otherwise they get a clear
400 (a missing model: a 500 naming its file).
"""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from inference import defaults
from inference.images import ImageDecodeError, decode_with_digest
from inference.ocr import OcrRequest
from inference.pool import ModelPool, Priority
from inference.repeated_errors import RepeatedErrorLog
from inference.runtime import ModelMissingError

from .form import PredictForm, read_predict_form
from .immich_models import DEFAULT_CLIP_SERVE_AS, IMMICH_FACE_MODELS
from .protocol import RequestError, number, parse_entries, serialize_embedding
from .routing import Route, RoutingTable, Served
from .status_page import StatusPage, StatusSource

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024  # Immich ML's own multipart spooling threshold; a preview is a few hundred KB


@dataclass
class GatewayConfig:
    ocr_key: str = "ocr"
    clip_model: str = defaults.CLIP_MODEL   # our cn-clip model (models dir name)
    clip_serve_as: list[str] = field(default_factory=lambda: list(DEFAULT_CLIP_SERVE_AS))
    face_packs: list[str] = field(default_factory=lambda: list(IMMICH_FACE_MODELS))  # registered in the pool
    upstream_url: str = ""
    max_body: int = MAX_BODY                 # bytes of one /predict body, all fields together; more is a 413

    def __post_init__(self):
        if self.max_body <= 0:
            raise ValueError(f"max_body must be a positive number of bytes, got {self.max_body}")


def _json_error(status: int, detail) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


# What `GET /metrics` answers: the body and its content type, read when scraped.
MetricsPage = Callable[[], Awaitable[tuple[bytes, str]]]


class Gateway:
    def __init__(self, pool: ModelPool, config: GatewayConfig, metrics: MetricsPage | None = None,
                 status: StatusSource | None = None):
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.status_page = StatusPage(pool, status)
        self.routes = RoutingTable.build(ocr_key=config.ocr_key, clip_model=config.clip_model,
                                         clip_serve_as=config.clip_serve_as, face_packs=config.face_packs,
                                         upstream=bool(config.upstream_url))
        # /predict answers by (task, HTTP status, route); read by the metrics page
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.repeated_errors = RepeatedErrorLog(log)
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body)
        app.router.add_get("/", self.root)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/predict", self.predict)
        if self.metrics is not None:
            app.router.add_get("/metrics", self.metrics_page)
        self.status_page.add_routes(app)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app) -> None:
        if self._session:
            await self._session.close()

    async def root(self, _request: web.Request) -> web.Response:
        return web.json_response({"message": "Immich ML"})

    async def ping(self, _request: web.Request) -> web.Response:
        return web.Response(text="pong", content_type="text/plain")

    async def metrics_page(self, _request: web.Request) -> web.Response:
        body, content_type = await self.metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- /predict ---------------------------------------------------------------------------------------------
    async def predict(self, request: web.Request) -> web.Response:
        tasks: list[str] = []
        route = Route.SERVED
        response = None
        try:
            response, tasks, route = await self._predict(request)
            return response
        finally:
            status = response.status if response is not None else 500
            for task in tasks or ["none"]:  # "none": the entries could not be read
                self.requests[task, str(status), route.value] += 1

    async def _predict(self, request: web.Request) -> tuple[web.Response, list[str], Route]:
        try:
            form = await read_predict_form(request, self.config.max_body)
        except RequestError as e:
            return _json_error(e.status, e.detail), [], Route.REFUSED
        except Exception as e:
            return _json_error(400, f"could not read the multipart form: {e}"), [], Route.REFUSED
        tasks: list[str] = []
        route = Route.REFUSED  # until the entries are read and looked up
        try:
            entries = parse_entries(form.entries)
            tasks = list(entries)
            decision = self.routes.decide(entries)
            route = decision.route
            if decision.route is Route.FORWARDED:
                return await self._proxy(form), tasks, Route.FORWARDED
            if decision.route is Route.REFUSED:
                raise RequestError(400, decision.refusal)
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
            results = await asyncio.gather(*(self._run_task(task, types, decision.served[task], image, digest, text)
                                             for task, types in entries.items()), return_exceptions=True)
            missing = [(task, r) for task, r in zip(entries, results) if isinstance(r, ModelMissingError)]
            for task, error in missing:
                model = next(iter(decision.served[task].values())).pool_key
                self.repeated_errors.error(f"missing:{model}", "%s: model missing: %s", model, error)
            if missing and self.config.upstream_url and all(
                    s.forward_when_missing for task, _ in missing for s in decision.served[task].values()):
                return await self._proxy(form), tasks, Route.FORWARDED
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            body = dict(zip(entries.keys(), results))
            if image is not None:
                body["imageHeight"] = image.height
                body["imageWidth"] = image.width
            return web.json_response(body), tasks, Route.SERVED
        except RequestError as e:
            return _json_error(e.status, e.detail), tasks, route
        except ModelMissingError as e:
            return _json_error(500, f"Failed to load model: {e}"), tasks, route
        except Exception as e:
            log.exception("predict failed")
            return _json_error(500, f"{type(e).__name__}: {e}"), tasks, route

    async def _run_task(self, task: str, types: dict, served: dict[str, Served], image, digest, text):
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
            result = await self.pool.run(served["detection"].pool_key, req, Priority.BACKGROUND, content=digest)
            return {"text": [ln.text for ln in result.lines], "box": [v for ln in result.lines for v in ln.box],
                    "boxScore": [ln.box_score for ln in result.lines],
                    "textScore": [ln.text_score for ln in result.lines]}
        if task == "clip":
            if image is not None and "visual" in types:
                vec = await self.pool.run(served["visual"].pool_key, image, Priority.BACKGROUND, content=digest)
            elif text is not None and "textual" in types:
                vec = await self.pool.run(served["textual"].pool_key, text, Priority.INTERACTIVE, content=text)
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
            faces = await self.pool.run(served["detection"].pool_key, (image, min_score), Priority.BACKGROUND,
                                        content=digest)
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

