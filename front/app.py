"""The front's aiohttp handlers: Immich's two search endpoints, and the pass-through front door.

A search cnai can answer (an `ocr:` query, the OCR filter, or a text query when cnai has CLIP and has indexed
photos with it) goes: the caller's identity, partners and elevation from Immich's API with the caller's own
credentials → `cnai.search` with those owners → each result's DTO from Immich's API, again as the caller → Immich's
SearchResponseDto. Everything else goes to Immich unchanged. Errors become responses here, in one place each.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.protocol import serialize_embedding
from inference.pool import ModelPool, Priority
from inference.runtime import ModelMissingError

from .immich import Caller, Credentials, ImmichApi, ImmichRefused, ImmichUnavailable
from .proxy import ImmichProxy, json_error
from .search_db import SearchDatabase, SearchUnavailable
from .search_dto import SearchPlan, plan_metadata, plan_smart, search_item, search_response

log = logging.getLogger(__name__)

SMART_PATH = "/api/search/smart"
METADATA_PATH = "/api/search/metadata"


@dataclass
class FrontConfig:
    immich_url: str            # Immich's base URL, e.g. http://immich-server:2283
    clip_text_key: str         # the model pool's CLIP text model ("clip-textual:<name>")
    clip_model: str            # that model's name in cnai.clip.model ("cn-clip/<name>")
    timeout_s: float = 10.0    # each call to Immich's API, and to cnai's database
    asset_fetches: int = 16    # GET /api/assets/{id} in flight at once for one search

    def __post_init__(self):
        if self.timeout_s <= 0 or self.asset_fetches < 1:
            raise ValueError("timeout_s must be > 0 and asset_fetches >= 1")


class Front:
    def __init__(self, pool: ModelPool, config: FrontConfig, db: SearchDatabase):
        self.pool = pool
        self.config = config
        self.db = db
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    # --- apps -------------------------------------------------------------------------------------------------
    def add_search_routes(self, app: web.Application) -> None:
        """Immich's two search endpoints on `app` (the gateway's port, for a reverse proxy that routes them here)."""
        app.router.add_post(SMART_PATH, self.smart)
        app.router.add_post(METADATA_PATH, self.metadata)
        app.on_cleanup.append(self._close)

    def door_app(self) -> web.Application:
        """The front door: the two searches, and everything else streamed to Immich."""
        app = web.Application()
        self.add_search_routes(app)
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
        except SearchUnavailable as e:
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


def _json(body: bytes):
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None  # Immich says what is wrong with it
