"""Immich's API, called with the caller's own credentials: who the caller is, whose photos they may search, and
each result's asset DTO. cnai holds no credentials of its own; Immich decides every access."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger(__name__)

# Every form Immich accepts (server/src/services/auth.service.ts; tests/fixtures/immich/README.md): shared-link
# key or slug, session token (header, bearer, cookie, query), API key (header, query).
CREDENTIAL_HEADERS = ("authorization", "cookie", "x-api-key", "x-immich-user-token", "x-immich-session-token",
                      "x-immich-share-key", "x-immich-share-slug")
CREDENTIAL_QUERY = ("key", "slug", "sessionKey", "apiKey")


@dataclass(frozen=True)
class Credentials:
    """The credential part of one request, exactly as the caller sent it."""
    headers: tuple[tuple[str, str], ...]
    query: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, request: web.Request) -> Credentials:
        return cls(tuple((k, v) for k, v in request.headers.items() if k.lower() in CREDENTIAL_HEADERS),
                   tuple((k, v) for k, v in request.query.items() if k in CREDENTIAL_QUERY))


class ImmichRefused(Exception):
    """Immich answered with an error status; `response()` hands its answer to the caller unchanged."""

    def __init__(self, status: int, body: bytes, content_type: str):
        super().__init__(f"Immich answered {status}: {body[:200]!r}")
        self.status = status
        self.body = body
        self.content_type = content_type

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body,
                            headers={"Content-Type": self.content_type or "application/json"})


class ImmichUnavailable(Exception):
    """Immich could not be reached, did not answer in time, or failed (5xx)."""


@dataclass(frozen=True)
class Caller:
    user_id: str
    partner_ids: tuple[str, ...]   # users who share with the caller and whom the caller shows in their timeline
    elevated: bool                 # a session unlocked with the PIN code: the locked folder is visible


class ImmichApi:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _get(self, path: str, creds: Credentials, params: dict | None = None):
        """The JSON body of a 200 answer; ImmichRefused for another status, ImmichUnavailable when none came."""
        query = CIMultiDict(creds.query)
        query.update(params or {})
        try:
            async with self.session.get(self.base_url + path, headers=CIMultiDict(creds.headers), params=query,
                                        timeout=self.timeout, allow_redirects=False) as resp:
                body = await resp.read()
                if resp.status >= 500:
                    raise ImmichUnavailable(f"Immich answered {resp.status} to GET {path}")
                if resp.status != 200:
                    raise ImmichRefused(resp.status, body, resp.headers.get("Content-Type", ""))
        except asyncio.TimeoutError:
            raise ImmichUnavailable(f"Immich did not answer GET {path} within {self.timeout.total:g} s") from None
        except aiohttp.ClientError as e:
            raise ImmichUnavailable(f"Immich at {self.base_url} is unreachable: {e}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ImmichUnavailable(f"Immich's answer to GET {path} is not JSON") from None

    async def caller(self, creds: Credentials, visibility: str | None) -> Caller:
        """Who calls, and whose photos a search with this visibility covers: Immich's own rule
        (SearchService.getUserIdsToSearch): 'locked' → only the caller; otherwise the caller and each user who
        shares with them and is shown in their timeline. The elevation is asked only when it matters."""
        want_partners = visibility != "locked"
        want_elevation = visibility in (None, "locked")
        calls = [self._get("/api/users/me", creds)]
        if want_partners:
            calls.append(self._get("/api/partners", creds, {"direction": "shared-with"}))
        if want_elevation:
            calls.append(self._get("/api/auth/status", creds))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:  # the identity's own answer first: a bad credential is users/me's 401
            if isinstance(result, BaseException):
                raise result
        me, rest = results[0], list(results[1:])
        partners = rest.pop(0) if want_partners else []
        status = rest.pop(0) if want_elevation else {}
        try:
            return Caller(user_id=str(me["id"]),
                          partner_ids=tuple(str(p["id"]) for p in partners if p.get("inTimeline") is True),
                          elevated=status.get("isElevated") is True)
        except (KeyError, TypeError, AttributeError):
            raise ImmichUnavailable("Immich's users/partners answer does not have the expected shape") from None

    async def asset(self, creds: Credentials, asset_id: str) -> dict | None:
        """The asset's DTO as the caller may see it; None where Immich refuses it to the caller (400: not found or
        no access), which also covers an asset deleted since the search."""
        try:
            return await self._get(f"/api/assets/{asset_id}", creds)
        except ImmichRefused as e:
            if e.status in (400, 404):
                return None
            raise
