"""The `cnai` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from listener.task_names import TASKS
from models.catalogue import MIRRORS

from . import __version__
from .settings import Settings

log = logging.getLogger("cnai")


# --- argument types: bad input is refused by the parser, with the option's name ----------------------------------
def _whole_number(text: str, least: int, most: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if value < least or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}" if most is None
                                         else f"{what} is {least} to {most}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, None, "a whole number")


def port_number(text: str) -> int:
    return _whole_number(text, 1, 65535, "a port number")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def asset_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an asset id (a UUID such as 3fa85f64-5717-4562-b3fc-2c963f66afa6): "
                                         f"{text!r}") from None


class Parser(argparse.ArgumentParser):
    """Bad arguments are one line (and exit code 2), naming the command and where to read its options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, except where the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


# --- database selection ------------------------------------------------------------------------------------------
def add_db_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("database")
    g.add_argument("--dsn", default=None, help="PostgreSQL URL of Immich's database (default: $CNAI_DSN)")
    g.add_argument("--embedded", action="store_true",
                   help="use (and start if needed) the embedded PostgreSQL in --data-dir; the last cnai process "
                        "using it stops it")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="embedded server's folder (default: $CNAI_DATA_DIR, else /var/lib/cnai as root, "
                        "~/.local/share/cnai otherwise)")


def embedded_server(args):
    from .embedded import EmbeddedServer, default_data_dir
    return EmbeddedServer((args.data_dir or default_data_dir()).resolve())


# the embedded servers this process attached to; main() detaches at exit, so the last process out stops it
_attached: list = []


def resolve_dsn(args, settings: Settings) -> tuple[str, bool]:
    """Returns (dsn, standalone): the embedded server always holds a standalone schema."""
    if args.embedded or (not (args.dsn or settings.dsn) and args.data_dir):
        server = embedded_server(args)
        dsn = server.attach()
        if server not in _attached:
            _attached.append(server)
        return dsn, True
    dsn = args.dsn or settings.dsn
    if not dsn:
        raise SystemExit("no database: pass --dsn URL (or set CNAI_DSN), or use --embedded")
    return dsn, False


# --- commands ----------------------------------------------------------------------------------------------------
async def cmd_migrate(args, settings):
    from .db import migrate
    dsn, standalone = resolve_dsn(args, settings)
    applied = await migrate(dsn, standalone=standalone or args.standalone)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else " (up to date)"))


async def _prepare(args, settings) -> str:
    from .db import migrate
    dsn, standalone = resolve_dsn(args, settings)
    await migrate(dsn, standalone=standalone)
    return dsn


async def _wait_for_database(args, settings, stop: asyncio.Event) -> str | None:
    """A service started before its database (boot order, a restart) waits for it instead of dying, and started
    beside a new Immich (one compose project) waits for Immich's first start to create Immich's tables."""
    from .db import ImmichSchemaMissing
    delay = 1.0
    told_schema = False
    while not stop.is_set():
        try:
            return await _prepare(args, settings)
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            log.warning("database not reachable (%s); retrying in %.0f s", e, delay)
        except ImmichSchemaMissing as e:
            if not told_schema:
                log.warning("%s Waiting for Immich to create its tables (its first start); checking every few "
                            "seconds", e)
                told_schema = True
        except Exception as e:
            import asyncpg
            if not isinstance(e, (asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError)):
                raise
            log.warning("database not ready (%s); retrying in %.0f s", e, delay)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
        delay = min(delay * 2, 5)
    return None


def bind_port(host: str, port: int):
    """A listening socket on host:port, or one line saying why not."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise SystemExit(f"cnai: cannot listen on {host}:{port}: {e.strerror or e}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does: restart over TIME_WAIT
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        import errno
        if e.errno == errno.EADDRINUSE:
            raise SystemExit(f"cnai: port {port} on {host} is already in use (another cnai serve, or Immich's "
                             "ML?): stop it, or pass --port / set CNAI_PORT")
        raise SystemExit(f"cnai: cannot listen on {host}:{port}: {e.strerror or e}")
    sock.setblocking(False)
    return sock


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _run_service(args, settings, gateway: bool, listener: bool):
    from .metrics import QueueReader, ServiceMetrics
    from .status_source import StatusDatabase
    from .wiring import (build_front, build_gateway, build_listener, build_mtphotos, build_pool, front_start_problem,
                         preload_keys, refuse_bad_clip_setup)

    with_front = gateway and bool(settings.immich_url or settings.front_port)
    if with_front and (problem := front_start_problem(settings)):
        raise SystemExit(f"cnai: {problem}")
    stop = asyncio.Event()
    _stop_on_signals(stop)
    # taken before the database and the models, so a busy port fails in a second, not after a minute's start
    listen_socket = bind_port(settings.host, args.port) if gateway else None
    door_socket = bind_port(settings.host, settings.front_port) if with_front and settings.front_port else None
    with_mtphotos = gateway and bool(settings.mtphotos_api_key)  # no key, no MT Photos API
    mtphotos_socket = bind_port(settings.host, settings.mtphotos_port) if with_mtphotos else None
    dsn = None
    if listener or getattr(args, "watch", None):
        dsn = await _wait_for_database(args, settings, stop)
        if dsn is None:
            for sock in (listen_socket, door_socket, mtphotos_socket):
                if sock:
                    sock.close()
            return
    elif with_front:
        dsn = resolve_dsn(args, settings)[0]  # the front connects when the first search comes
    pool = build_pool(settings)
    tasks = []
    runners = []
    if settings.preload:
        keys = preload_keys(settings) if listener else ["ocr"]
        errors = await pool.preload(keys)
        for key, err in errors.items():
            if err:
                log.warning("%s is not available: %s (its jobs will fail with this reason; others keep working)",
                            key, err)
    await refuse_bad_clip_setup(pool, settings, serving=gateway)
    metrics = ServiceMetrics(pool)
    lst = None
    status = None
    if listener:
        # whether CLIP results also fill Immich's smart_search is decided in every batch (Immich's model may change)
        lst = build_listener(dsn, metrics.pool, settings, mirror_clip=True)
        metrics.listener = lst
        tasks.append(asyncio.create_task(lst.run(), name="listener"))
    if gateway:
        # the queue's figures on /metrics, read-only; `cnai gateway` alone reads them where a database is named
        metrics_dsn = dsn or getattr(args, "dsn", None) or settings.dsn
        if metrics_dsn:
            metrics.queue = QueueReader(metrics_dsn)
            status = StatusDatabase(metrics_dsn)  # /status: its figures, search, and retry button
        app = build_gateway(pool, settings, metrics, status).app()
        front = build_front(metrics.pool, settings, dsn) if with_front else None
        if front:
            front.add_search_routes(app)
        runners.append(await _serve(app, listen_socket))
        print(f"cnai gateway listening on http://{settings.host}:{args.port} (MACHINE_LEARNING_URL"
              + (", and Immich's search endpoints for a reverse proxy)" if front else ")"), flush=True)
        if front and settings.front_port:
            runners.append(await _serve(front.door_app(), door_socket))
            print(f"cnai front door listening on http://{settings.host}:{settings.front_port} (open Immich here; "
                  f"all but search goes to {settings.immich_url})", flush=True)
        if with_mtphotos:
            runners.append(await _serve(build_mtphotos(pool, settings, metrics).app(), mtphotos_socket))
            print(f"cnai MT Photos AI API listening on http://{settings.host}:{settings.mtphotos_port} (api-key: "
                  "CNAI_MTPHOTOS_API_KEY)", flush=True)
    if getattr(args, "watch", None):
        from .standalone import watch_folder
        tasks.append(asyncio.create_task(watch_folder(dsn, Path(args.watch), stop), name="watch"))
        print(f"drop photos into {Path(args.watch).resolve()} to index them", flush=True)
    print("cnai is running; Ctrl-C to stop", flush=True)
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        if t.done() and t.exception():
            log.error("%s stopped: %s", t.get_name(), t.exception())
    if lst:
        lst.stop()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for runner in reversed(runners):
        await runner.cleanup()
    await metrics.close()
    if status:
        await status.close()
    await pool.close()


async def _serve(app, sock):
    """Serve `app` on a socket bound before the slow part of the start (see bind_port)."""
    from aiohttp import web
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def cmd_serve(args, settings):
    await _run_service(args, settings, gateway=True, listener=True)


async def cmd_gateway(args, settings):
    await _run_service(args, settings, gateway=True, listener=False)


async def cmd_listen(args, settings):
    await _run_service(args, settings, gateway=False, listener=True)


async def cmd_reprocess(args, settings):
    import asyncpg

    from . import admin
    dsn = await _prepare(args, settings)
    conn = await asyncpg.connect(dsn)
    try:
        req_id, tasks = await admin.request_reprocess(conn, args.asset_id, args.task or None)
        print(f"request {req_id} queued for asset {args.asset_id} ({', '.join(tasks)})", flush=True)
        if args.no_wait:
            return
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            status, error = await admin.request_outcome(conn, req_id)
            if status in ("done", "failed"):
                print(f"request {req_id}: {status}" + (f" — {error}" if error else ""))
                if status == "failed":
                    raise SystemExit(1)
                return
            await asyncio.sleep(0.3)
        raise SystemExit(f"request {req_id} still {status} after {args.timeout:.0f} s: is a listener "
                         "running (cnai serve / cnai listen)?")
    finally:
        await conn.close()


async def cmd_backfill(args, settings):
    import asyncpg

    from . import admin
    from .wiring import task_models
    dsn = await _prepare(args, settings)
    models_of = task_models(settings)
    conn = await asyncpg.connect(dsn)
    try:
        models = {task: models_of[task] for task in args.task or await admin.indexed_tasks(conn)}
        if not models:
            raise SystemExit("no task is indexed (`cnai tasks`): name the tasks to queue with --task")
        for task, n in (await admin.backfill(conn, models, args.force)).items():
            print(f"{task}: queued {n}")
    finally:
        await conn.close()


async def cmd_search(args, settings):
    import asyncpg

    from . import admin
    dsn = await _prepare(args, settings)
    embedding = None
    if not args.query.lower().startswith("ocr:") and not args.ocr_only:
        embedding = await _text_embedding(settings, args.query)
    conn = await asyncpg.connect(dsn)
    try:
        try:
            owners = await admin.user_ids(conn, args.user) if args.user else None  # None: every user's photos
        except LookupError as e:
            raise SystemExit(f"cnai search: {e}")
        rows = await admin.search(conn, args.query, embedding, owners, args.limit)
    finally:
        await conn.close()
    if not rows:
        print("no match", file=sys.stderr)
        return
    print(f"{len(rows)} match(es) for {args.query!r}, best first:")
    print(f"{'#':>3}  {'score':>7}  {'asset':36}  path  |  matched text ([…] marks the match)")
    for i, r in enumerate(rows, 1):
        print(f"{i:3d}  {r['score']:7.4f}  {r['asset_id']}  {r['path']}  |  {_one_line(r['snippet'])}")


def _one_line(text: str | None) -> str:
    return " ".join(text.split()) if text else "(no text)"


async def _text_embedding(settings, text: str) -> str | None:
    from inference.pool import ModelPool
    from inference.runtime import ModelMissingError
    from listener.tasks import vector_literal

    from .wiring import build_pool
    pool: ModelPool = build_pool(settings)
    try:
        vec = await pool.run(f"clip-textual:{settings.clip_model}", text)
        return vector_literal(vec)
    except (ModelMissingError, ImportError) as e:
        log.info("no CLIP text model (%s): searching OCR text only", e)
        return None
    finally:
        await pool.close()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit} ago"
    return f"{seconds:.0f} s ago"


async def cmd_status(args, settings):
    import asyncpg

    from . import admin
    dsn = await _prepare(args, settings)
    conn = await asyncpg.connect(dsn)
    try:
        st = await admin.queue_status(conn, args.failed_limit)
    finally:
        await conn.close()
    order = {s: i for i, s in enumerate(("queued", "running", "done", "failed"))}
    print("jobs (task / state / count):")
    for task, state, n in sorted(st.counts, key=lambda r: (r[0], order.get(r[1], 9))):
        print(f"  {task:5s} {state:8s} {n}")
    if not st.counts:
        print("  none")
    print("oldest queued: " + (f"{_age(st.oldest_queued[1])} ({st.oldest_queued[0]})" if st.oldest_queued else "none"))
    if st.expired_leases:
        print(f"running with an expired lease: {st.expired_leases} (a listener stopped; any listener's reaper "
              "re-queues them)")
    print(f"results: ocr {st.results['ocr']}, clip {st.results['clip']}, face (assets) {st.results['face']}")
    if st.waiting_reasons:
        print("queued again after a failure, by reason (retried automatically):")
        for task, error, n, next_s in st.waiting_reasons:
            print(f"  {n:>6d}  {task:5s} {error}  (next try in {next_s:.0f} s)")
    if st.failure_reasons:
        print("failed, by reason (`cnai retry --failed [--task T]` re-queues them):")
        for task, error, n in st.failure_reasons:
            print(f"  {n:>6d}  {task:5s} {error or '(no reason recorded)'}")
        print("recent failures:")
        for task, asset_id, attempts, error, path in st.recent_failures:
            print(f"  {task:5s} {path or asset_id}  after {attempts} attempt(s): {error}")


async def cmd_tasks(args, settings):
    import asyncpg

    from . import admin
    dsn = await _prepare(args, settings)
    conn = await asyncpg.connect(dsn)
    try:
        if args.drop:
            dropped = await admin.unindex_task(conn, args.drop)
            if dropped is None:
                print(f"{args.drop} was not indexed; nothing changed")
            else:
                print(f"{args.drop} is no longer indexed: new photos get no {args.drop} jobs; dropped {dropped} "
                      f"queued background job(s) (ones a person asked for still run). A listener started with "
                      f"{args.drop} in CNAI_TASKS indexes it again.")
        for t in await admin.task_indexing(conn):
            state = (f"indexed since {t.since:%Y-%m-%d %H:%M}" if t.since is not None else
                     f"not indexed (a listener with {t.task} in CNAI_TASKS adds it)")
            print(f"  {t.task:5s} {state}; {t.queued} queued")
    finally:
        await conn.close()


async def cmd_retry(args, settings):
    import asyncpg

    from . import admin
    if not args.failed:
        raise SystemExit("cnai retry: say what to retry: --failed")
    dsn = await _prepare(args, settings)
    conn = await asyncpg.connect(dsn)
    try:
        n = await admin.retry_failed(conn, args.task or None)
    finally:
        await conn.close()
    scope = f" ({', '.join(args.task)})" if args.task else ""
    print(f"re-queued {n} failed job(s){scope} with a fresh attempt budget")


async def cmd_doctor(args, settings):
    import onnxruntime as ort
    problems = 0

    def report(level: str, subject: str, detail: str) -> None:
        nonlocal problems
        problems += level == "PROBLEM"
        print(f"  {level:8s}{subject}: {detail}")

    print(f"cnai {__version__}; ONNX Runtime {ort.__version__}, providers here: {', '.join(ort.get_available_providers())}")
    print(f"configured providers: {', '.join(settings.providers)}")
    print(f"tasks (CNAI_TASKS): {', '.join(settings.tasks)}")
    try:
        import asyncpg

        from . import admin
        from .db import check_server
        dsn, standalone = resolve_dsn(args, settings)
        conn = await asyncpg.connect(dsn)
        try:
            await check_server(conn)
            version, applied = await admin.database_summary(conn)
            print(f"database: PostgreSQL {version}, pgvector ok, {applied} cnai migration(s) applied")
            if not applied:
                report("PROBLEM", "cnai schema", "not migrated yet: run `cnai migrate` (serve and listen do it at start)")
            else:
                for f in [*await admin.check_database(conn), await admin.check_zhparser(conn)]:
                    report("ok" if f.ok else "warning" if f.warning else "PROBLEM", f.subject, f.detail)
        finally:
            await conn.close()
    except SystemExit as e:
        print(f"database: not configured ({e})")
    except Exception as e:
        from .errors import describe
        problems += 1
        print(f"database: PROBLEM — {describe(e)}")
    print(f"models dir: {settings.models_dir}")
    from .wiring import build_pool, task_model_keys
    pool = build_pool(settings)
    try:
        for task, keys in task_model_keys(settings).items():
            errors = await pool.preload(keys)
            # one finding per task: CLIP's two halves missing for one reason is one thing to fix
            reasons = list(dict.fromkeys(str(e) for e in errors.values() if e is not None))
            names = dict.fromkeys(k.split(":", 1)[1] for k in keys if ":" in k)
            subject = f"{task} ({', '.join(names) or 'bundled'})"
            if not reasons:
                report("ok", subject, "loads")
            elif task in settings.tasks:
                report("PROBLEM", subject, "missing — " + "; ".join(reasons))
            else:
                report("warning", subject, f"not installed (task not in CNAI_TASKS, so not needed) — {reasons[0]}")
    finally:
        await pool.close()
    if problems:
        raise SystemExit(1)


async def cmd_stop(args, settings):
    server = embedded_server(args)
    if not server.initialised():
        raise SystemExit(f"cnai stop: no embedded PostgreSQL in {server.data_dir}")
    if server.port() is None:
        print(f"the embedded PostgreSQL in {server.data_dir} is not running")
        return
    stopped, users = server.stop_unless_used(force=args.force)
    if not stopped:
        raise SystemExit(f"cnai stop: {len(users)} cnai process(es) still use the embedded PostgreSQL in "
                         f"{server.data_dir} (pid {', '.join(map(str, users))}): stop them first, or pass --force")
    print(f"stopped the embedded PostgreSQL in {server.data_dir}")


async def cmd_import_clip(args, settings):
    from inference.clip.export import import_checkpoint

    from .wiring import clip_import_note
    if note := clip_import_note(args.arch):
        print(note, file=sys.stderr, flush=True)
    out = await asyncio.get_running_loop().run_in_executor(
        None, lambda: import_checkpoint(Path(args.checkpoint), args.arch, settings.models_dir, name=args.name))
    print(f"exported {args.arch} to {out}; serve it with CNAI_CLIP_MODEL={out.name}")


async def cmd_models_pull(args, settings):
    from models.catalogue import lookup
    from models.install import PullError, plan, pull

    try:
        entry = lookup(args.name)
        the_plan = plan(entry, args.mirror or settings.model_mirror, args.base_url or settings.model_base_url)
    except (KeyError, PullError) as e:
        raise SystemExit(f"cnai models pull: {e.args[0]}")
    if the_plan.note:
        print(f"note: {the_plan.note}", file=sys.stderr, flush=True)
    for url in the_plan.urls:
        print(f"downloading {entry.name} from {url}", file=sys.stderr, flush=True)
    try:
        pulled = await pull(the_plan, settings.models_dir, sha256=args.sha256, keep_download=args.keep_download,
                            force=args.force, progress=not args.no_progress, user_agent=f"cnai/{__version__}")
    except PullError as e:
        raise SystemExit(f"cnai models pull: {e}")
    for f in pulled.files:
        check = "SHA-256 checked" if f.sha256_checked else "no published SHA-256, size checked"
        print(f"  {f.path.name}: {f.size} bytes, sha256 {f.sha256} ({check})", file=sys.stderr)
    use = (f"CNAI_CLIP_MODEL={entry.name}" if entry.task == "clip" else f"CNAI_FACE_MODEL={entry.name}")
    print(f"installed {entry.description} in {pulled.path}; use it with {use}")
    from .wiring import CLIP_DIM
    if entry.task == "clip" and entry.embed_dim != CLIP_DIM:
        print(f"note: {entry.name} makes {entry.embed_dim}-d embeddings; cnai serves {CLIP_DIM}-d CLIP only",
              file=sys.stderr)


async def cmd_models_list(args, settings):
    from .model_listing import model_listing
    print("\n".join(model_listing(settings)))


# --- parser ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cnai", description="Chinese-aware AI for Immich: cn-clip, OCR and faces.",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"cnai {__version__}")
    p.add_argument("--log-level", default=os.environ.get("CNAI_LOG_LEVEL", "INFO"), type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="how much to log ($CNAI_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str, func) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=helptext, description=helptext, formatter_class=HelpFormatter)
        s.set_defaults(func=func)
        return s

    s = command("migrate", "create or update cnai's tables, functions and triggers", cmd_migrate)
    add_db_args(s)
    s.add_argument("--standalone", action="store_true",
                   help="create a minimal Immich-compatible schema when there is none")

    for name, func, helptext in (("serve", cmd_serve, "gateway + listener sharing one model pool"),
                                 ("gateway", cmd_gateway, "only the Immich ML endpoint"),
                                 ("listen", cmd_listen, "only the queue listener")):
        s = command(name, helptext, func)
        add_db_args(s)
        if name != "listen":
            s.add_argument("--port", type=port_number, default=None,
                           help="port for Immich's ML requests (default: $CNAI_PORT, else 3003 as Immich ML)")
        if name == "serve":
            s.add_argument("--watch", type=Path, default=None, help="import photos added to this folder (default: none watched)")

    s = command("reprocess", "re-run tasks for one asset and wait for the outcome", cmd_reprocess)
    add_db_args(s)
    s.add_argument("asset_id", type=asset_id, help="the Immich asset's id (a UUID)")
    s.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: the indexed tasks)")
    s.add_argument("--no-wait", action="store_true", help="queue the request and return at once")
    s.add_argument("--timeout", type=positive_float, default=300, help="seconds to wait for the outcome")

    s = command("backfill", "queue work for every asset with a preview that lacks results", cmd_backfill)
    add_db_args(s)
    s.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: the indexed tasks)")
    s.add_argument("--force", action="store_true", help="queue all assets, even those with results")

    s = command("tasks", "which tasks uploads and Immich's re-runs make jobs for (the indexed tasks)", cmd_tasks)
    add_db_args(s)
    s.add_argument("--drop", choices=TASKS, default=None,
                   help="stop indexing this task and drop its queued background jobs (default: change nothing)")

    s = command("search", "search like Immich would: 'ocr:发票' or free text", cmd_search)
    add_db_args(s)
    s.add_argument("query", help="'ocr:WORDS' searches OCR text only; other text also CLIP when a model is there")
    s.add_argument("--user", action="append", metavar="EMAIL",
                   help="only this Immich user's photos (repeatable; default: every user's)")
    s.add_argument("--limit", type=positive_int, default=20, help="how many results to show")
    s.add_argument("--ocr-only", action="store_true", help="search OCR text only, as the ocr: prefix does")

    s = command("status", "queue counts, oldest queued job, recent failures", cmd_status)
    add_db_args(s)
    s.add_argument("--failed-limit", type=positive_int, default=20,
                   help="how many failure reasons and recent failures to list")

    s = command("retry", "re-queue failed jobs", cmd_retry)
    add_db_args(s)
    s.add_argument("--failed", action="store_true", help="re-queue the failed jobs (required)")
    s.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: all tasks)")

    s = command("doctor", "check the database, providers and models", cmd_doctor)
    add_db_args(s)

    s = command("stop", "stop the embedded PostgreSQL (refused while a cnai process uses it)", cmd_stop)
    add_db_args(s)
    s.add_argument("--force", action="store_true", help="stop it even while cnai processes use it")

    s = sub.add_parser("models", help="model management")
    msub = s.add_subparsers(dest="models_command", required=True)
    m = msub.add_parser("import-clip", help="convert an official Chinese-CLIP checkpoint to ONNX")
    m.add_argument("checkpoint")
    m.add_argument("--arch", default="ViT-B-16", choices=["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"])
    m.add_argument("--name", default=None, help="model folder name (default: the arch)")
    m.set_defaults(func=cmd_import_clip)
    m = msub.add_parser("pull", help="download an official model, verify it and install it",
                        description="Download an official Chinese-CLIP checkpoint (converted to ONNX: needs "
                                    "cnai[convert]) or a face pack into CNAI_MODELS_DIR. An interrupted download "
                                    "resumes when the command is run again.")
    m.add_argument("name", help="a name from `cnai models list`, e.g. ViT-B-16 or buffalo_l")
    m.add_argument("--mirror", default=None, choices=MIRRORS,
                   help="where to download from (default: $CNAI_MODEL_MIRROR or official): official = the "
                        "publishers' links, huggingface = OFA-Sys's repos for CLIP and Immich's (immich-app/NAME) "
                        "for face packs, modelscope = ModelScope, for users in China")
    m.add_argument("--base-url", default=None,
                   help="an in-house mirror serving <base-url>/<name>/<file> (default: $CNAI_MODEL_BASE_URL)")
    m.add_argument("--sha256", default=None, help="the expected SHA-256 of the download, where you know it")
    m.add_argument("--force", action="store_true", help="download and replace a model that is already installed")
    m.add_argument("--keep-download", action="store_true",
                   help="keep the downloaded file in <models>/.downloads after installing")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_models_pull)
    m = msub.add_parser("list", help="installed models, what each task uses, and what can be pulled")
    m.set_defaults(func=cmd_models_list)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .logs import configure_logging
    configure_logging(args.log_level)
    # the one error boundary: whatever goes wrong is one line naming the command and exit code 1; the traceback
    # is logged at debug level
    try:
        settings = Settings()
        if getattr(args, "port", None) is None and hasattr(args, "port"):
            args.port = settings.port
        try:
            asyncio.run(args.func(args, settings))
        except KeyboardInterrupt:
            raise SystemExit(130)
        finally:
            for server in _attached:
                try:
                    server.detach()
                except Exception as e:  # noqa: BLE001 - the command's own outcome matters more
                    log.warning("could not stop the embedded PostgreSQL in %s: %s", server.data_dir, e)
    except SystemExit as e:
        if isinstance(e.code, str) and not e.code.startswith("cnai"):
            raise SystemExit(f"cnai {args.command}: {e.code}")
        raise
    except Exception as e:
        from .errors import describe
        log.debug("cnai %s failed", args.command, exc_info=True)
        raise SystemExit(f"cnai {args.command}: {describe(e)}")


if __name__ == "__main__":
    main()
