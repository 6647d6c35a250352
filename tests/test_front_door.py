"""The pass-through front door: everything but the two searches reaches Immich unchanged and streamed — Immich's
web app at `/`, uploads, downloads with ranges, redirects, cookies, websockets — with hop-by-hop headers kept on
their hop. Immich here is a small aiohttp app that shows what it received."""
from __future__ import annotations

import asyncio
import gzip

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from cnai.wiring import build_pool
from tests.front_scene import creds, front_client, front_settings, running_standin, seed_scene

CHUNK = 64 * 1024


class Upstream:
    """What Immich's server does for the requests a browser or the mobile app sends through the door."""

    def __init__(self, files_dir):
        self.file = files_dir / "video.mp4"
        self.file.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
        self.seen: list[web.Request] = []
        self.upload_started = asyncio.Event()
        self.download_chunk_read = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.web_app)
        app.router.add_get("/api/assets/{id}/original", self.original)
        app.router.add_post("/api/assets", self.upload)
        app.router.add_get("/api/stream", self.slow_stream)
        app.router.add_get("/api/compressed", self.compressed)
        app.router.add_get("/api/socket.io/", self.socket)
        app.router.add_post("/api/auth/login", self.login)
        app.router.add_get("/auth/go", self.redirect)
        app.router.add_route("*", "/api/echo", self.echo)
        return app

    async def web_app(self, request):
        self.seen.append(request)
        return web.Response(text="<html>Immich</html>", content_type="text/html")

    async def original(self, request):
        return web.FileResponse(self.file)

    async def upload(self, request):
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            self.upload_started.set()
        return web.json_response({"received": size, "chunked": request.headers.get("Transfer-Encoding"),
                                  "length": request.headers.get("Content-Length")}, status=201)

    async def slow_stream(self, request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.wait_for(self.download_chunk_read.wait(), 30)  # the client has it before the rest exists
        await response.write(b"-rest")
        return response

    async def compressed(self, request):
        return web.Response(body=gzip.compress(b"squeezed" * 100), headers={"Content-Encoding": "gzip",
                                                                             "Content-Type": "text/plain"})

    async def socket(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}:{request.query.get('EIO')}")
        return ws

    async def login(self, request):
        response = web.json_response({"accessToken": "t"})
        response.headers.add("Set-Cookie", "immich_access_token=t; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "immich_is_authenticated=true; Path=/")
        return response

    async def redirect(self, request):
        raise web.HTTPFound(self.base_url + "/auth/login")  # an Immich behind its own internal address

    async def echo(self, request):
        self.seen.append(request)
        return web.json_response({"method": request.method, "headers": dict(request.headers),
                                  "host": request.host, "body": (await request.read()).decode()})


@pytest_asyncio.fixture(scope="module")
async def pool(tmp_path_factory):
    pool = build_pool(front_settings("", tmp_path_factory.mktemp("door-models")))
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def upstream(tmp_path):
    up = Upstream(tmp_path)
    async with TestServer(up.app()) as server:
        # by name, as Immich is reached in a real setup: a client's cookie jar ignores cookies from bare IP addresses
        up.base_url = str(server.make_url("")).rstrip("/").replace("127.0.0.1", "localhost")
        yield up, up.base_url


@pytest_asyncio.fixture
async def door(upstream, pool, dsn, tmp_path):
    _, url = upstream
    async with front_client(pool, front_settings(url, tmp_path), dsn, door=True) as client:
        yield client


async def test_root_is_immichs_web_app(door, upstream, pool, dsn, tmp_path):
    """In the door, `/` is Immich's web app; the ML `GET /` answer stays on the gateway's port, for Immich's server."""
    r = await door.get("/")
    assert r.status == 200 and await r.text() == "<html>Immich</html>"
    _, url = upstream
    async with front_client(pool, front_settings(url, tmp_path), dsn) as gateway:
        r = await gateway.get("/")
        assert await r.json() == {"message": "Immich ML"}


async def test_headers_hop_by_hop_and_forwarded(door):
    r = await door.get("/api/echo?x=1", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "secret",
                                                 "Proxy-Authorization": "Basic x", "Keep-Alive": "timeout=5",
                                                 "X-Forwarded-For": "10.0.0.7", "Host": "photos.example",
                                                 "Cookie": "immich_access_token=abc", **creds("alice")})
    seen = await r.json()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "x-hop" not in headers and "proxy-authorization" not in headers and "keep-alive" not in headers
    assert headers["x-forwarded-for"] == "10.0.0.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-host"] == "photos.example"
    assert seen["host"] == "photos.example"  # kept, as Immich's documented proxy setup does
    assert headers["cookie"] == "immich_access_token=abc" and headers["authorization"].startswith("Bearer ")


async def test_cookies_pass_through_and_are_never_kept(door):
    r = await door.post("/api/auth/login", json={"email": "a", "password": "b"})
    assert r.headers.getall("Set-Cookie") == ["immich_access_token=t; Path=/; HttpOnly",
                                              "immich_is_authenticated=true; Path=/"]
    door.session.cookie_jar.clear()
    r = await door.get("/api/echo")  # another browser: no cookie of the first one reaches Immich
    assert "cookie" not in {k.lower() for k in (await r.json())["headers"]}


async def test_redirects_are_the_clients_to_follow(door, upstream):
    r = await door.get("/auth/go", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/auth/login"  # Immich's own address points at the door


async def test_range_requests(door, upstream):
    up, _ = upstream
    r = await door.get("/api/assets/x/original", headers={"Range": "bytes=1000-1999"})
    assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-1999/{1 << 20}"
    assert await r.read() == up.file.read_bytes()[1000:2000]
    r = await door.head("/api/assets/x/original")
    assert r.status == 200 and r.headers["Content-Length"] == str(1 << 20)


async def test_upload_streams_without_buffering(door, upstream):
    """The client sends its second half only once Immich has the first: a door that buffered the body would wait
    for the end, and this would never finish."""
    up, _ = upstream

    async def body():
        yield b"x" * CHUNK
        await asyncio.wait_for(up.upload_started.wait(), 30)
        for _ in range(63):
            yield b"y" * CHUNK

    r = await door.post("/api/assets", data=body())
    assert r.status == 201 and (await r.json())["received"] == 64 * CHUNK
    r = await door.post("/api/assets", data=b"z" * 1000)
    assert (await r.json()) == {"received": 1000, "chunked": None, "length": "1000"}


async def test_download_streams_without_buffering(door, upstream):
    up, _ = upstream
    r = await door.get("/api/stream")
    assert await r.content.readexactly(5) == b"first"
    up.download_chunk_read.set()
    assert await r.read() == b"-rest"


async def test_compressed_bodies_pass_as_sent(door):
    r = await door.get("/api/compressed", auto_decompress=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await r.read()) == b"squeezed" * 100


async def test_websockets(door):
    async with door.ws_connect("/api/socket.io/?EIO=4&transport=websocket") as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=10)).data == "echo:hello:4"


async def test_searches_in_the_door_are_cnais(db, pool, dsn, tmp_path):
    """Through the door, the two searches are cnai's (Immich sees only the identity and asset calls) and everything
    else on Immich's API is Immich's."""
    await seed_scene(db)
    async with running_standin() as (standin, url):
        async with front_client(pool, front_settings(url, tmp_path), dsn, door=True) as client:
            r = await client.post("/api/search/smart", json={"query": "ocr:北京", "visibility": "timeline"},
                                  headers=creds("alice"))
            assert r.status == 200 and [i["originalFileName"] for i in (await r.json())["assets"]["items"]] == \
                ["alice-beijing.jpg"]
            assert standin.posts() == []
            r = await client.get("/api/users/me", headers=creds("bob"))
            assert r.status == 200 and (await r.json())["email"] == "bob@example.com"


async def test_immich_down_is_a_502(pool, dsn, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with front_client(pool, front_settings(f"http://127.0.0.1:{port}", tmp_path), dsn, door=True) as client:
        r = await client.get("/photos")
        assert r.status == 502 and "unreachable" in (await r.json())["message"]


@pytest.mark.parametrize("path", ["/api/search/smart", "/api/search/metadata"])
async def test_other_methods_on_search_paths_pass(door, path):
    r = await door.get(path)
    assert r.status == 404  # Immich's answer (this one has no such route), not the door's
