"""Requests passed to Immich unchanged: the searches cnai leaves to Immich, and in front-door mode everything else.

Bodies stream both ways (uploads and downloads are never held in memory), as do range requests, redirects (not
followed: the client gets Immich's), cookies (passed through, never stored here) and websockets (Immich's
`/api/socket.io`). Hop-by-hop headers stay on their hop; X-Forwarded-For/-Proto/-Host say who asked.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1, plus what a proxy must not pass on: the client's 100-continue is answered by this server.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade", "expect"})
# What each side of a websocket negotiates for itself.
WEBSOCKET_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                                 "sec-websocket-protocol", "sec-websocket-accept"})


def json_error(status: int, message: str) -> web.Response:
    """An error in Immich's own shape ({"message": …}), which Immich's web and mobile apps show."""
    return web.json_response({"message": message}, status=status)


def _end_to_end(headers, drop=frozenset()) -> CIMultiDict:
    listed = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    return CIMultiDict((k, v) for k, v in headers.items()
                       if k.lower() not in HOP_BY_HOP and k.lower() not in listed and k.lower() not in drop)


def forwarded_request_headers(request: web.Request, drop=frozenset()) -> CIMultiDict:
    """The client's headers for Immich: Host kept (as Immich's documented nginx setup does), X-Forwarded-* added."""
    headers = _end_to_end(request.headers, drop)
    peer = request.remote or ""
    earlier = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{earlier}, {peer}" if earlier else peer
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    headers.setdefault("X-Forwarded-Host", request.host)
    return headers


class ImmichProxy:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, connect_timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.session = session
        # only connecting is bounded: an upload, a video download or a websocket may rightly take hours
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)

    def _url(self, request: web.Request) -> str:
        return self.base_url + request.rel_url.raw_path_qs

    def _location(self, value: str) -> str:
        """A redirect to Immich's own address points back at this door instead."""
        if value.startswith(self.base_url + "/"):
            return value[len(self.base_url):]
        return value

    async def forward(self, request: web.Request, body: bytes | None = None,
                      on_answer: Callable[[int], Awaitable[None]] | None = None) -> web.StreamResponse:
        """`request` to Immich and Immich's answer back; `body` when it was already read here (a search), else the
        client's body streams through. `on_answer` is awaited with Immich's status before the client gets it (not
        when Immich could not be reached), and must not raise."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        headers = forwarded_request_headers(request)
        if body is not None:
            headers.pop("Content-Length", None)  # set again for `body`
            data = body
        else:
            data = request.content if request.body_exists else None
        try:
            upstream = await self.session.request(request.method, self._url(request), headers=headers, data=data,
                                                  allow_redirects=False, timeout=self.timeout)
        except asyncio.TimeoutError:
            return json_error(502, f"Immich at {self.base_url} did not accept the connection within "
                                   f"{self.timeout.sock_connect:g} s")
        except aiohttp.ClientError as e:
            return json_error(502, f"Immich at {self.base_url} is unreachable: {e}")
        try:
            if on_answer is not None:
                await on_answer(upstream.status)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in _end_to_end(upstream.headers).items():
                response.headers.add(name, self._location(value) if name.lower() == "location" else value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError) as e:
            # the status line is out already: all that is left is to end the client's connection
            log.warning("%s %s: Immich's answer broke off: %s", request.method, request.path, e)
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            upstream.release()

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        headers = forwarded_request_headers(request, drop=WEBSOCKET_HANDSHAKE)
        try:
            upstream = await self.session.ws_connect(self._url(request), headers=headers, protocols=protocols,
                                                     autoping=False, max_msg_size=0)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return json_error(502, f"Immich's websocket at {self.base_url} is unreachable: {e}")
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                       autoping=False, max_msg_size=0)
        await client.prepare(request)
        try:
            await asyncio.gather(_pump(client, upstream), _pump(upstream, client))
        finally:
            await upstream.close()
            await client.close()
        return client


async def _pump(source, sink) -> None:
    """Messages from one websocket to the other until either side closes; then the other side closes too."""
    try:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type == WSMsgType.PONG:
                await sink.pong(msg.data)
            else:
                break
    except (ConnectionResetError, aiohttp.ClientError) as e:
        log.debug("websocket ended: %s", e)
    finally:
        if not sink.closed:
            await sink.close()
