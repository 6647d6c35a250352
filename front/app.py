"""The front's aiohttp handlers: Immich's two search endpoints, and the pass-through front door.

A search cnai can answer (an `ocr:` query, the OCR filter, or a text query when cnai has CLIP and has indexed
photos with it) goes: the caller's identity, partners and elevation from Immich's API with the caller's own
credentials → `cnai.search` with those owners → each result's DTO from Immich's API, again as the caller → Immich's
SearchResponseDto. Everything else goes to Immich unchanged. Errors become responses here, in one place each.

The front door also acts on two of Immich's reprocess buttons that write nothing cnai's triggers could see (see
tests/fixtures/immich/README.md): once Immich has answered them with a 2xx, "Regenerate thumbnail" files a
reprocess request per asset, and "Jobs → Generate Thumbnails → All" queues every indexed task for every asset.
Nothing cnai does there changes Immich's answer to the client.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.protocol import serialize_embedding
from inference.pool import ModelPool, Priority
from inference.runtime import ModelMissingError

from .immich import Caller, Credentials, ImmichApi, ImmichRefused, ImmichUnavailable
from .database import DatabaseUnavailable, FrontDatabase
from .proxy import ImmichProxy, json_error
from .search_dto import SearchPlan, plan_metadata, plan_smart, search_item, search_response

log = logging.getLogger(__name__)

SMART_PATH = "/api/search/smart"
METADATA_PATH = "/api/search/metadata"
# the two buttons the front door acts on, as Immich 3.1.0's web client sends them
ASSET_JOBS_PATH = "/api/assets/jobs"                   # POST {"name": "regenerate-thumbnail", "assetIds": [...]}
THUMBNAIL_JOBS_PATH = "/api/jobs/thumbnailGeneration"  # PUT {"command": "start", "force": true}
REGENERATE_THUMBNAIL = "regenerate-thumbnail"
# those bodies are a few kB; a larger one (or one without a length) streams through untouched, and cnai does nothing
JOB_BODY_LIMIT = 1 << 20


@dataclass
class FrontConfig:
    immich_url: str            # Immich's base URL, e.g. http://immich-server:2283
    clip_text_key: str         # the model pool's CLIP text model ("clip-textual:<name>")
    clip_model: str            # that model's name in cnai.clip.model ("cn-clip/<name>")
    timeout_s: float = 10.0    # each call to Immich's API, and to cnai's database
    asset_fetches: int = 16    # GET /api/assets/{id} in flight at once for one search
    # task -> the model name its handler records (cnai.task_run.model), for "Generate Thumbnails → All"; empty: the
    # door queues nothing for it
    task_models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.timeout_s <= 0 or self.asset_fetches < 1:
            raise ValueError("timeout_s must be > 0 and asset_fetches >= 1")


class Front:
    def __init__(self, pool: ModelPool, config: FrontConfig, db: FrontDatabase):
        self.pool = pool
        self.config = config
        self.db = db
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._queueing_every_asset: asyncio.Task | None = None

    # --- apps -------------------------------------------------------------------------------------------------
    def add_search_routes(self, app: web.Application) -> None:
        """Immich's two search endpoints on `app` (the gateway's port, for a reverse proxy that routes them here)."""
        app.router.add_post(SMART_PATH, self.smart)
        app.router.add_post(METADATA_PATH, self.metadata)
        app.on_cleanup.append(self._close)

    def door_app(self) -> web.Application:
        """The front door: the two searches, two reprocess buttons, and everything else streamed to Immich."""
        app = web.Application()
        self.add_search_routes(app)
        app.router.add_post(ASSET_JOBS_PATH, self.asset_jobs)
        app.router.add_put(THUMBNAIL_JOBS_PATH, self.thumbnail_jobs)
        app.router.add_route("*", "/{tail:.*}", self.pass_through)
        return app

    def _session(self, decompress: bool) -> aiohttp.ClientSession:
        """decompress: for reading Immich's answers here; a pass-through hands on the bytes as Immich sent them."""
        session = self._sessions.get(decompress)
        if session is None or session.closed:
            # no cookie jar: cookies belong to each caller and pass through, never kept here for the next one
            session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=decompress)
            self._sessions[decompress] = session
        return session

    @property
    def immich(self) -> ImmichApi:
        return ImmichApi(self.config.immich_url, self._session(decompress=True), self.config.timeout_s)

    @property
    def proxy(self) -> ImmichProxy:
        return ImmichProxy(self.config.immich_url, self._session(decompress=False), self.config.timeout_s)

    async def _close(self, _app=None) -> None:
        queueing, self._queueing_every_asset = self._queueing_every_asset, None
        if queueing is not None and not queueing.done():
            log.warning("Generate Thumbnails → All: stopped before cnai had queued every asset; "
                        "`cnai backfill --force` queues them")
            queueing.cancel()
            await asyncio.gather(queueing, return_exceptions=True)
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
        await self.db.close()

    # --- handlers ---------------------------------------------------------------------------------------------
    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.forward(request)

    async def smart(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return await self._search(request, body, plan_smart(_json(body)))

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return await self._search(request, body, plan_metadata(_json(body)))

    async def _search(self, request: web.Request, body: bytes, plan: SearchPlan | None) -> web.StreamResponse:
        if plan is None:
            return await self.proxy.forward(request, body)
        try:
            answer = await self._answer(Credentials.of(request), plan)
        except ImmichRefused as e:
            if e.status == 403:
                # a credential that may search but not say whose photos it covers (an API key with asset.read
                # only, a shared link): Immich's own search answers it
                log.info("%s: Immich tells cnai not who calls (403); Immich answers the search", request.path)
                return await self.proxy.forward(request, body)
            return e.response()  # a bad, expired or logged-out credential: Immich's 401 as is
        except ImmichUnavailable as e:
            log.warning("%s: %s", request.path, e)
            return json_error(502, f"cnai could not ask Immich: {e}")
        except DatabaseUnavailable as e:
            log.warning("%s: %s", request.path, e)
            return json_error(503, f"{e}. Search is unavailable until it is back.")
        except Exception as e:
            log.exception("%s failed", request.path)
            return json_error(500, f"cnai's search failed: {type(e).__name__}: {e}")
        if answer is None:
            return await self.proxy.forward(request, body)
        return web.json_response(answer)

    async def _answer(self, creds: Credentials, plan: SearchPlan) -> dict | None:
        """Immich's SearchResponseDto for this search, or None where Immich must answer it."""
        embedding = None
        if plan.ocr_only:
            caller = await self.immich.caller(creds, plan.visibility)
        else:
            if not await self.db.has_clip_model(self.config.clip_model):
                return None  # no photo embedded with cnai's CLIP yet: Immich's own smart search does better
            caller, embedding = await asyncio.gather(self.immich.caller(creds, plan.visibility),
                                                     self._embed(plan.text), return_exceptions=True)
            if isinstance(caller, BaseException):
                raise caller
            if isinstance(embedding, ModelMissingError):
                log.info("no CLIP text model here (%s): Immich answers text searches", embedding)
                return None
            if isinstance(embedding, BaseException):
                raise embedding
        if plan.visibility == "locked" and not caller.elevated:
            return None  # Immich answers with its own 401 (Elevated permission is required)
        ids, has_next = await self.db.search(plan.text, embedding, *_scope(caller, plan.visibility),
                                             clip_model=None if plan.ocr_only else self.config.clip_model,
                                             size=plan.size, offset=plan.offset)
        assets = await self._assets(creds, ids)
        items = [search_item(a, plan) for a in assets if a is not None]
        if len(items) < len(ids):
            log.info("%d of %d results were not readable by the caller in Immich; left out",
                     len(ids) - len(items), len(ids))
        return search_response(items, plan.page, has_next)

    async def _embed(self, text: str) -> str:
        vec = await self.pool.run(self.config.clip_text_key, text, Priority.INTERACTIVE)
        return serialize_embedding(vec)

    async def _assets(self, creds: Credentials, ids: list) -> list[dict | None]:
        """Each result's DTO, asked of Immich as the caller, a bounded number at a time, in the results' order."""
        slots = asyncio.Semaphore(self.config.asset_fetches)
        immich = self.immich

        async def one(asset_id):
            async with slots:
                return await immich.asset(creds, str(asset_id))

        tasks = [asyncio.ensure_future(one(i)) for i in ids]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()  # one refusal or failure ends the search: the rest need not run

    # --- reprocess buttons (front door) ------------------------------------------------------------------------
    # DESIGN lets the front hold no credentials and read no user data beyond cnai.search: these write
    # reprocess_request (or queue jobs) only after Immich has answered the caller's own request with a 2xx, i.e.
    # for assets (or the administrator's job) Immich has just authorised, and read nothing back.
    async def asset_jobs(self, request: web.Request) -> web.StreamResponse:
        body = await _small_body(request)
        if body is None:
            return await self.proxy.forward(request)
        asset_ids = _regenerated_assets(_json(body))
        if not asset_ids:
            return await self.proxy.forward(request, body)  # refresh-faces and the rest: cnai's triggers see them

        async def on_answer(status: int) -> None:
            # before the client's answer, so the request is filed once the user sees Immich's: a few inserts
            if 200 <= status < 300:
                await self._file_reprocess_requests(asset_ids)
        return await self.proxy.forward(request, body, on_answer)

    async def _file_reprocess_requests(self, asset_ids: list[str]) -> None:
        try:
            refused = await self.db.file_reprocess_requests(asset_ids)
        except DatabaseUnavailable as e:
            log.warning("Regenerate thumbnail of %d asset(s): cnai did not queue them: %s", len(asset_ids), e)
            return
        except Exception:
            log.exception("Regenerate thumbnail of %d asset(s): cnai did not queue them", len(asset_ids))
            return
        if refused:
            log.info("Regenerate thumbnail: cnai queued %d of %d asset(s); refused %s", len(asset_ids) - len(refused),
                     len(asset_ids), "; ".join(refused))

    async def thumbnail_jobs(self, request: web.Request) -> web.StreamResponse:
        body = await _small_body(request)
        if body is None:
            return await self.proxy.forward(request)
        asked = _json(body)
        # "Missing" (force false) writes a preview row where one is missing, which cnai's trigger sees
        everything = isinstance(asked, dict) and asked.get("command") == "start" and asked.get("force") is True
        if not everything or not self.config.task_models:
            return await self.proxy.forward(request, body)

        async def on_answer(status: int) -> None:
            if 200 <= status < 300:
                self._start_queueing_every_asset()
        return await self.proxy.forward(request, body, on_answer)

    def _start_queueing_every_asset(self) -> None:
        """In the background: a whole library takes seconds to minutes, and the administrator's page waits on
        Immich's answer only."""
        if self._queueing_every_asset is not None and not self._queueing_every_asset.done():
            log.info("Generate Thumbnails → All: cnai is still queueing every asset from the last press")
            return
        self._queueing_every_asset = asyncio.get_running_loop().create_task(self._queue_every_asset())

    async def _queue_every_asset(self) -> None:
        try:
            added = await self.db.queue_every_asset(self.config.task_models)
        except DatabaseUnavailable as e:
            log.warning("Generate Thumbnails → All: cnai did not queue its tasks: %s", e)
            return
        except Exception:
            log.exception("Generate Thumbnails → All: cnai did not queue its tasks")
            return
        log.info("Generate Thumbnails → All: cnai queued %s in the background",
                 ", ".join(f"{task} for {n} asset(s)" for task, n in added.items()))


def _scope(caller: Caller, visibility: str | None) -> tuple[list[str], list[str] | None, str | None]:
    """(owner_ids, visibilities, locked_owner) for cnai.search, by Immich's rule: a 'locked' search covers only the
    caller's own locked folder; otherwise the caller and their timeline partners, in the asked visibility or, with
    none asked, all but the locked folder — which an elevated session sees too, its own only."""
    locked_owner = caller.user_id if caller.elevated else None
    if visibility == "locked":
        return [caller.user_id], ["locked"], locked_owner
    owners = [caller.user_id, *caller.partner_ids]
    if visibility is not None:
        return owners, [visibility], locked_owner
    return owners, (["timeline", "archive", "locked"] if caller.elevated else None), locked_owner


async def _small_body(request: web.Request) -> bytes | None:
    """The body, read here when its length says it is small; None to let it stream through (too large, or sent
    without a length, which Immich's web and mobile clients never do for these JSON bodies)."""
    length = request.content_length
    if length is None or length > min(JOB_BODY_LIMIT, request.client_max_size):
        return None
    return await request.read()


def _regenerated_assets(asked) -> list[str]:
    """The asset ids of a "Regenerate thumbnail" body, each once, in order; empty for any other asset job. Immich
    refuses a malformed id (400), so one here is left out rather than sent to the database."""
    if not isinstance(asked, dict) or asked.get("name") != REGENERATE_THUMBNAIL:
        return []
    ids = asked.get("assetIds")
    if not isinstance(ids, list):
        return []
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and _is_uuid(i)))


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False


def _json(body: bytes):
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None  # Immich says what is wrong with it
