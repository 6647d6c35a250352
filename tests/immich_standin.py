"""Immich's API played from the responses a real Immich 3.1.0 answered (tests/fixtures/immich, see its README).

A request that was recorded (same method, path, query, credential and JSON body) gets the recorded answer.
`GET /api/users/me`, `/api/partners`, `/api/auth/status`, `/api/assets/{id}` and `POST /api/assets/jobs` are also
answered for the other credentials of the scene (index.json), by the rules the README reads from Immich's source —
who a credential is, whose partner they are, which photos they may read or update — with bodies taken from the
recordings. What neither covers is
a 501 that names the request, so a test that needs more fails saying so instead of passing on made-up data.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures" / "immich"
NOT_FOUND = {"message": "Not found or no asset.read access"}
NOT_UPDATABLE = {"message": "Not found or no asset.update access"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Who:
    """The caller behind a credential, as Immich's auth service would see them."""
    user: str | None = None        # the scene's name: alice, bob, ...
    kind: str = "session"          # session | api_key | api_key_asset_read_only | shared_link
    elevated: bool = False
    refusal: tuple[int, str] | None = None   # (status, message) when Immich refuses the credential itself


def asset_state(asset: dict) -> tuple[str, bool]:
    """(visibility, trashed) of a photo of the scene, from index.json's description of it."""
    state = asset["state"]
    visibility = "locked" if "locked" in state else "archive" if "archive" in state else "timeline"
    return visibility, state == "trashed"


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict
    body: bytes


def _credential_forms(headers, query) -> list[tuple[str, str]]:
    """(form, value) of each credential present, in the order Immich's auth service checks them."""
    h = {k.lower(): v for k, v in headers.items()}
    cookie = dict(part.strip().split("=", 1) for part in h.get("cookie", "").split(";") if "=" in part)
    bearer = h.get("authorization", "")
    forms = [("share_key", h.get("x-immich-share-key") or query.get("key")),
             ("share_slug", h.get("x-immich-share-slug") or query.get("slug")),
             ("session", h.get("x-immich-user-token") or h.get("x-immich-session-token") or query.get("sessionKey")
              or (bearer[7:] if bearer.lower().startswith("bearer ") else None) or cookie.get("immich_access_token")),
             ("api_key", h.get("x-api-key") or query.get("apiKey"))]
    return [(form, value) for form, value in forms if value]


@dataclass
class ImmichStandIn:
    fixtures: Path = FIXTURES
    delay_s: float = 0.0                     # answer this late (an Immich that hangs)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self):
        self.index = json.loads((self.fixtures / "index.json").read_text())
        self.recorded = [json.loads(p.read_text()) for p in sorted(self.fixtures.glob("*/*.json"))]
        self.user_ids = {name: u["id"] for name, u in self.index["users"].items()}
        self.assets = {a["id"]: dict(a, name=name) for name, a in self.index["assets"].items()}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def posts(self) -> list[Received]:
        return [r for r in self.received if r.method == "POST"]

    # --- the caller -------------------------------------------------------------------------------------------
    def who(self, headers, query) -> Who:
        forms = _credential_forms(headers, query)
        if not forms:
            return Who(refusal=(401, "Authentication required"))
        form, value = forms[0]  # the first form present decides, even when a later one is good
        if form == "share_key":
            link = self.index["shared_link"]
            return Who(user=link["owner"], kind="shared_link") if value == link["key"] else \
                Who(refusal=(401, "Invalid share key"))
        if form == "share_slug":
            link = self.index["shared_link"]
            return Who(user=link["owner"], kind="shared_link") if value == link["slug"] else \
                Who(refusal=(401, "Invalid share slug"))
        for name, user in self.index["users"].items():
            creds = user["credentials"]
            if form == "session" and value in (creds.get("bearer"), creds.get("elevated_bearer")):
                return Who(user=name, elevated=value == creds.get("elevated_bearer"))
            if form == "api_key" and value == creds.get("api_key"):
                return Who(user=name, kind="api_key")
            if form == "api_key" and value == creds.get("api_key_asset_read_only"):
                return Who(user=name, kind="api_key_asset_read_only")
        return Who(refusal=(401, "Invalid user token" if form == "session" else "Invalid API key"))

    def _recorded_who(self, rec) -> Who:
        return self.who(rec["request"]["headers"], rec["request"]["query"])

    # --- answers ----------------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, dict(request.headers), body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body.decode(errors="replace")
        query = dict(request.query)
        replay = self._replay(request.method, request.path, query, request.headers, parsed)
        if replay is not None:
            return replay
        who = self.who(request.headers, query)
        if who.refusal:
            return web.json_response({"message": who.refusal[1]}, status=who.refusal[0])
        if request.method == "GET":
            if request.path == "/api/users/me":
                return self._users_me(who)
            if request.path == "/api/partners":
                return self._partners(who, query.get("direction"))
            if request.path == "/api/auth/status":
                return self._auth_status(who)
            if request.path.startswith("/api/assets/"):
                return self._asset(who, request.path.rsplit("/", 1)[1])
        if request.method == "POST" and request.path == "/api/assets/jobs" and isinstance(parsed, dict):
            return self._asset_jobs(who, parsed.get("assetIds") or [])
        return self._not_recorded(f"{request.method} {request.path_qs} {parsed!r}")

    def _replay(self, method, path, query, headers, body):
        creds = _credential_forms(headers, query)
        plain_query = {k: v for k, v in query.items() if k not in ("key", "slug", "sessionKey", "apiKey")}
        for rec in self.recorded:
            req = rec["request"]
            rec_query = {k: v for k, v in req["query"].items() if k not in ("key", "slug", "sessionKey", "apiKey")}
            if (req["method"], req["path"], rec_query, req["body"]) != (method, path, plain_query, body):
                continue
            if _credential_forms(req["headers"], req["query"]) == creds:
                return web.json_response(rec["body"], status=rec["status"])
        return None

    @staticmethod
    def _not_recorded(what: str) -> web.Response:
        return web.json_response({"message": f"stand-in: nothing recorded for {what}"}, status=501)

    def _forbidden(self, who: Who, permission: str) -> web.Response | None:
        if who.kind == "shared_link":
            return web.json_response({"message": "Forbidden"}, status=403)
        if who.kind == "api_key_asset_read_only" and permission != "asset.read":
            return web.json_response({"message": f"Missing required permission: {permission}"}, status=403)
        return None

    def _bodies(self, endpoint: str, who: Who, status: int = 200, **query):
        """Bodies recorded for `endpoint` that answered this user with `status` (any of their credentials)."""
        for rec in self.recorded:
            req = rec["request"]
            if req["path"].startswith(endpoint) and rec["status"] == status and req["query"] == query:
                if self._recorded_who(rec).user == who.user:
                    yield rec, self._recorded_who(rec)

    def _users_me(self, who: Who) -> web.Response:
        if refused := self._forbidden(who, "user.read"):
            return refused
        for rec, _ in self._bodies("/api/users/me", who):
            return web.json_response(rec["body"])
        return self._not_recorded(f"users/me of {who.user}")

    def _partners(self, who: Who, direction: str | None) -> web.Response:
        if refused := self._forbidden(who, "partner.read"):
            return refused
        if direction not in ("shared-by", "shared-with"):
            rec = next(r for r in self.recorded if r["request"]["situation"] == "alice-no-direction")
            return web.json_response(rec["body"], status=rec["status"])
        for rec, _ in self._bodies("/api/partners", who, direction=direction):
            return web.json_response(rec["body"])
        return self._not_recorded(f"partners {direction} of {who.user}")

    def _auth_status(self, who: Who) -> web.Response:
        for rec, rec_who in self._bodies("/api/auth/status", who):
            if (rec_who.kind, rec_who.elevated) == (who.kind, who.elevated):
                return web.json_response(rec["body"])
        return self._not_recorded(f"auth/status of {who}")

    # --- assets -----------------------------------------------------------------------------------------------
    def _asset(self, who: Who, asset_id: str) -> web.Response:
        if refused := self._forbidden(who, "asset.read"):
            return refused
        if not UUID.match(asset_id):
            rec = next(r for r in self.recorded if r["request"]["situation"] == "alice-not-a-uuid")
            return web.json_response(rec["body"], status=rec["status"])
        asset = self.assets.get(asset_id)
        if asset is None or not self.may_read(who, asset):
            return web.json_response(NOT_FOUND, status=400)
        dto = self.asset_dto(asset_id)
        if dto is None:
            return self._not_recorded(f"a DTO of asset {asset_id}")
        if who.user != asset["owner"]:
            dto = dict(dto, people=[])
        return web.json_response(dto)

    def _asset_jobs(self, who: Who, asset_ids: list) -> web.Response:
        """Immich's asset.update, which the asset menu's jobs need for every id: the owner only (the locked folder
        with an elevated session); otherwise the recorded 400, and no job runs."""
        if refused := self._forbidden(who, "asset.update"):
            return refused
        for asset_id in asset_ids:
            asset = self.assets.get(asset_id)
            if asset is None or who.user != asset["owner"] or (asset_state(asset)[0] == "locked" and not who.elevated):
                return web.json_response(NOT_UPDATABLE, status=400)
        return web.Response(status=204)

    def may_read(self, who: Who, asset: dict) -> bool:
        """Immich's asset.read for these users (README "Asset access"): the owner (the locked folder only with an
        elevated session), a partner the owner shares with (timeline and hidden photos only), a shared link (its
        own photos only)."""
        visibility, trashed = asset_state(asset)
        if who.kind == "shared_link":
            return asset["name"] in self.index["shared_link"]["assets"]
        if who.user == asset["owner"]:
            return visibility != "locked" or who.elevated
        shares = any(p["sharedBy"] == asset["owner"] and p["sharedWith"] == who.user for p in self.index["partners"])
        return shares and visibility in ("timeline", "hidden") and not trashed

    def asset_dto(self, asset_id: str) -> dict | None:
        """The asset's `GET /api/assets/{id}` body as recorded; for one never fetched, Immich's own search item of
        it (with exif) plus the relations a GET adds (owner, tags, stack), in Immich's key order."""
        for rec in self.recorded:
            body = rec["body"]
            if rec["request"]["path"] == f"/api/assets/{asset_id}" and rec["status"] == 200 and "owner" in body:
                return body
        item = next((i for rec in self.recorded if isinstance(rec["body"], dict) and "assets" in rec["body"]
                     for i in rec["body"]["assets"]["items"] if i["id"] == asset_id and "exifInfo" in i), None)
        owner = next((rec["body"]["owner"] for rec in self.recorded if rec["request"]["path"].startswith("/api/assets/")
                      and rec["status"] == 200 and rec["body"].get("ownerId") == (item or {}).get("ownerId")
                      and "owner" in rec["body"]), None)
        if item is None or owner is None:
            return None
        dto = {}
        for key, value in item.items():
            dto[key] = value
            if key == "ownerId":
                dto["owner"] = owner
            elif key == "livePhotoVideoId":
                dto["tags"] = []
            elif key == "checksum":
                dto["stack"] = None
        return dto

    def search_item(self, asset_id: str, with_exif: bool = True) -> dict:
        """What Immich's own search answered for this asset (a recorded item), to compare cnai's answers with."""
        for rec in self.recorded:
            if isinstance(rec["body"], dict) and "assets" in rec["body"]:
                for item in rec["body"]["assets"]["items"]:
                    if item["id"] == asset_id and ("exifInfo" in item) == with_exif:
                        return item
        raise LookupError(f"Immich's search never answered asset {asset_id} (with_exif={with_exif})")
