"""The `cnai` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from listener.task_names import TASKS
from models.catalogue import MIRRORS

from . import __version__
from .settings import Settings

log = logging.getLogger("cnai")


# --- database selection ------------------------------------------------------------------------------------------
def add_db_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("database")
    g.add_argument("--dsn", default=None, help="PostgreSQL URL of Immich's database (default: $CNAI_DSN)")
    g.add_argument("--embedded", action="store_true",
                   help="use (and start if needed) the embedded PostgreSQL in --data-dir")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="embedded server's folder (default: $CNAI_DATA_DIR or ~/.local/share/cnai)")


def resolve_dsn(args, settings: Settings) -> tuple[str, bool]:
    """Returns (dsn, standalone): the embedded server always holds a standalone schema."""
    if args.embedded or (not (args.dsn or settings.dsn) and args.data_dir):
        from .embedded import EmbeddedServer, default_data_dir
        server = EmbeddedServer((args.data_dir or default_data_dir()).resolve())
        return server.dsn(), True
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


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _run_service(args, settings, gateway: bool, listener: bool):
    from .metrics import QueueReader, ServiceMetrics
    from .wiring import (build_front, build_gateway, build_listener, build_pool, front_start_problem, preload_keys,
                         refuse_bad_clip_setup)

    with_front = gateway and bool(settings.immich_url or settings.front_port)
    if with_front and (problem := front_start_problem(settings)):
        raise SystemExit(f"cnai: {problem}")
    stop = asyncio.Event()
    _stop_on_signals(stop)
    dsn = None
    if listener or getattr(args, "watch", None):
        dsn = await _wait_for_database(args, settings, stop)
        if dsn is None:
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
        app = build_gateway(pool, settings, metrics).app()
        front = build_front(metrics.pool, settings, dsn) if with_front else None
        if front:
            front.add_search_routes(app)
        runners.append(await _serve(app, settings.host, args.port))
        print(f"cnai gateway listening on http://{settings.host}:{args.port} (MACHINE_LEARNING_URL"
              + (", and Immich's search endpoints for a reverse proxy)" if front else ")"), flush=True)
        if front and settings.front_port:
            runners.append(await _serve(front.door_app(), settings.host, settings.front_port))
            print(f"cnai front door listening on http://{settings.host}:{settings.front_port} (open Immich here; "
                  f"all but search goes to {settings.immich_url})", flush=True)
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
    await pool.close()


async def _serve(app, host: str, port: int):
    from aiohttp import web
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
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
        try:
            req_id = await admin.request_reprocess(conn, args.asset_id, args.task or None)
        except (asyncpg.PostgresError, asyncpg.DataError) as e:
            raise SystemExit(f"cnai reprocess: {e}")
        print(f"request {req_id} queued for asset {args.asset_id} ({', '.join(args.task or TASKS)})", flush=True)
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
        models = {task: models_of[task] for task in args.task or TASKS}
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
    for i, r in enumerate(rows, 1):
        snippet = " ".join((r["text"] or "").split())[:60]
        print(f"{i:3d}  {r['score']:.4f}  {r['asset_id']}  {r['path']}  {snippet}")


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
        for task, asset_id, attempts, error in st.recent_failures:
            print(f"  {task:5s} {asset_id}  after {attempts} attempt(s): {error}")


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

    def report(ok: bool, subject: str, detail: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"  {'ok' if ok else 'PROBLEM':8s}{subject}: {detail}")

    print(f"cnai {__version__}; ONNX Runtime {ort.__version__}, providers here: {', '.join(ort.get_available_providers())}")
    print(f"configured providers: {', '.join(settings.providers)}")
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
            for f in await admin.check_database(conn):
                report(f.ok, f.subject, f.detail)
        finally:
            await conn.close()
    except SystemExit as e:
        print(f"database: not configured ({e})")
    except Exception as e:
        problems += 1
        print(f"database: PROBLEM — {e}")
    print(f"models dir: {settings.models_dir}")
    from .wiring import build_pool, preload_keys
    pool = build_pool(settings)
    try:
        for key, err in (await pool.preload(preload_keys(settings))).items():
            report(err is None, key, "loads" if err is None else f"missing — {err}")
    finally:
        await pool.close()
    if problems:
        raise SystemExit(1)


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
    p = argparse.ArgumentParser(prog="cnai", description="Chinese-aware AI for Immich: cn-clip, OCR and faces.")
    p.add_argument("--version", action="version", version=f"cnai {__version__}")
    p.add_argument("--log-level", default=os.environ.get("CNAI_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("migrate", help="create or update cnai's tables, functions and triggers")
    add_db_args(s)
    s.add_argument("--standalone", action="store_true",
                   help="create a minimal Immich-compatible schema when there is none")
    s.set_defaults(func=cmd_migrate)

    for name, func, helptext in (("serve", cmd_serve, "gateway + listener sharing one model pool"),
                                 ("gateway", cmd_gateway, "only the Immich ML endpoint"),
                                 ("listen", cmd_listen, "only the queue listener")):
        s = sub.add_parser(name, help=helptext)
        add_db_args(s)
        if name != "listen":
            s.add_argument("--port", type=int, default=int(os.environ.get("CNAI_PORT", 3003)))
        if name == "serve":
            s.add_argument("--watch", type=Path, default=None, help="import photos added to this folder")
        s.set_defaults(func=func)

    s = sub.add_parser("reprocess", help="re-run tasks for one asset and wait for the outcome")
    add_db_args(s)
    s.add_argument("asset_id")
    s.add_argument("--task", action="append", choices=TASKS, help="repeatable; default all")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--timeout", type=float, default=300)
    s.set_defaults(func=cmd_reprocess)

    s = sub.add_parser("backfill", help="queue work for every asset with a preview that lacks results")
    add_db_args(s)
    s.add_argument("--task", action="append", choices=TASKS)
    s.add_argument("--force", action="store_true", help="queue all assets, even those with results")
    s.set_defaults(func=cmd_backfill)

    s = sub.add_parser("search", help="search like Immich would: 'ocr:发票' or free text")
    add_db_args(s)
    s.add_argument("query")
    s.add_argument("--user", action="append", metavar="EMAIL",
                   help="only this Immich user's photos (repeatable); default: every user's")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--ocr-only", action="store_true")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("status", help="queue counts, oldest queued job, recent failures")
    add_db_args(s)
    s.add_argument("--failed-limit", type=int, default=20)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("retry", help="re-queue failed jobs")
    add_db_args(s)
    s.add_argument("--failed", action="store_true")
    s.add_argument("--task", action="append", choices=TASKS)
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("doctor", help="check the database, providers and models")
    add_db_args(s)
    s.set_defaults(func=cmd_doctor)

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
    settings = Settings()
    if getattr(args, "port", None) is None and hasattr(args, "port"):
        args.port = settings.port
    try:
        asyncio.run(args.func(args, settings))
    except KeyboardInterrupt:
        pass
    except Exception as e:
        from .db import DatabaseSetupError
        if isinstance(e, DatabaseSetupError):
            raise SystemExit(f"cnai: {e}")
        raise


if __name__ == "__main__":
    main()
