"""`GET /status`: one server-rendered HTML page for the operator — queue depth per task and state, jobs finished per
minute, failures by reason with a retry button, the models in the pool, and an `ocr:` search with the matched text.

The page reads through a `StatusSource` it is given (cnai/status_source.py); the retry button's write goes through
it too, so the gateway itself writes no database. Like Immich ML's port it serves, it is for the operator's
network: no login of its own.
"""
from __future__ import annotations

import html
import logging
from typing import Protocol

from aiohttp import web

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")
MARK_OPEN, MARK_CLOSE = "«", "»"  # what the source marks a snippet's match with

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:60em;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.8em;background:#4a7;vertical-align:middle}
.problem{color:#a22}mark{background:#fd4}form{display:inline}input[type=search]{width:24em}
"""


class StatusSource(Protocol):
    async def overview(self): ...                       # .queue (admin.QueueStatus), .throughput
    async def search(self, query: str) -> list: ...     # hits: asset_id, path, score, snippet
    async def retry(self, task: str | None) -> int: ...


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def marked_snippet(snippet: str | None) -> str:
    """The snippet as HTML: its text escaped, then the source's «» marks as <mark>."""
    if not snippet:
        return ""
    return _e(snippet).replace(MARK_OPEN, "<mark>").replace(MARK_CLOSE, "</mark>")


class StatusPage:
    def __init__(self, pool, source: StatusSource | None):
        self.pool = pool          # the model pool: which models are loaded, what each did
        self.source = source      # None: no database named, so the page shows the models only

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/status", self.page)
        app.router.add_post("/status/retry", self.retry)

    async def page(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "").strip()
        note = request.query.get("retried")
        parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cnai status</title>"
                 f"<style>{STYLE}</style></head><body><h1>cnai status</h1>"]
        if note is not None:
            parts.append(f"<p id=retried>Queued again: {_e(note)} failed job(s).</p>")
        parts.append(self._search_form(query))
        if self.source is None:
            parts.append("<p class=problem>No database is configured for this gateway: queue figures and search "
                         "need one (--dsn / CNAI_DSN).</p>")
        else:
            if query:
                parts.append(await self._search_results(query))
            parts.append(await self._queue())
        parts.append(self._models())
        parts.append("</body></html>")
        return web.Response(text="".join(parts), content_type="text/html")

    async def retry(self, request: web.Request) -> web.Response:
        # a form posted from another site must not re-queue work: the browser names the page's origin
        origin = request.headers.get("Origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.host:
            return web.Response(status=403, text=f"refused: a retry from {origin}, not from this page")
        if self.source is None:
            return web.Response(status=503, text="no database is configured for this gateway")
        task = (await request.post()).get("task") or None
        try:
            n = await self.source.retry(task)
        except ValueError as e:
            return web.Response(status=400, text=str(e))
        except Exception as e:  # noqa: BLE001 - the page says why (the database is away) instead of a 500
            return web.Response(status=503, text=str(e))
        log.info("status page: %d failed %s job(s) queued again", n, task or "")
        raise web.HTTPSeeOther(f"/status?retried={n}")

    # --- sections ---------------------------------------------------------------------------------------------
    @staticmethod
    def _search_form(query: str) -> str:
        return ("<h2>Search</h2><form id=search method=get action=/status>"
                f"<input type=search name=q id=q value=\"{_e(query)}\" placeholder=\"ocr:发票\"> "
                "<button type=submit>Search</button></form>")

    async def _search_results(self, query: str) -> str:
        try:
            hits = await self.source.search(query)
        except Exception as e:  # noqa: BLE001 - a bad query or an away database: say so on the page
            return f"<p class=problem id=search-error>{_e(e)}</p>"
        if not hits:
            return f"<p id=results>No photo matches {_e(query)}.</p>"
        rows = "".join(f"<tr><td>{_e(h.path)}</td><td class=snippet>{marked_snippet(h.snippet)}</td>"
                       f"<td class=n>{h.score:.3f}</td></tr>" for h in hits)
        return (f"<table id=results><tr><th>photo</th><th>matched text</th><th class=n>score</th></tr>{rows}"
                "</table>")

    async def _queue(self) -> str:
        try:
            overview = await self.source.overview()
        except Exception as e:  # noqa: BLE001
            return f"<h2>Queue</h2><p class=problem id=queue-error>{_e(e)}</p>"
        st = overview.queue
        counts: dict[str, dict[str, int]] = {}
        for task, state, n in st.counts:
            counts.setdefault(task, {})[state] = n
        out = ["<h2>Queue</h2>"]
        if counts:
            head = "".join(f"<th class=n>{s}</th>" for s in STATES)
            body = "".join(f"<tr><td>{_e(task)}</td>" + "".join(
                f"<td class=n data-state={s}>{by_state.get(s, 0)}</td>" for s in STATES) + "</tr>"
                for task, by_state in sorted(counts.items()))
            out.append(f"<table id=queue><tr><th>task</th>{head}</tr>{body}</table>")
        else:
            out.append("<p id=queue>No jobs yet.</p>")
        if st.oldest_queued:
            out.append(f"<p>Oldest queued: {st.oldest_queued[1]:.0f} s ({_e(st.oldest_queued[0])}).</p>")
        if st.expired_leases:
            out.append(f"<p class=problem>{st.expired_leases} running job(s) past their lease: a listener stopped; "
                       "a reaper re-queues them.</p>")
        out.append(self._throughput(overview.throughput))
        out.append(self._failures(st))
        return "".join(out)

    @staticmethod
    def _throughput(minutes) -> str:
        peak = max((sum(m.finished.values()) for m in minutes), default=0) or 1
        rows = []
        for m in minutes:
            total = sum(m.finished.values())
            tasks = ", ".join(f"{_e(t)} {n}" for t, n in sorted(m.finished.items()))
            failed = f" ({m.failed} failed)" if m.failed else ""
            rows.append(f"<tr><td>{m.minute:%H:%M}</td><td class=n>{total}</td>"
                        f"<td><span class=bar style=\"width:{12 * total / peak:.1f}em\"></span></td>"
                        f"<td>{tasks}{failed}</td></tr>")
        return ("<h2>Finished per minute</h2><table id=throughput><tr><th>minute (UTC)</th><th class=n>jobs</th>"
                f"<th></th><th>by task</th></tr>{''.join(rows)}</table>")

    @staticmethod
    def _failures(st) -> str:
        out = ["<h2>Failures</h2>"]
        if st.waiting_reasons:
            rows = "".join(f"<tr><td>{_e(task)}</td><td>{_e(error)}</td><td class=n>{n}</td>"
                           f"<td class=n>{next_s:.0f} s</td></tr>" for task, error, n, next_s in st.waiting_reasons)
            out.append("<p>Queued again after a failure (retried automatically):</p><table id=waiting><tr>"
                       f"<th>task</th><th>reason</th><th class=n>jobs</th><th class=n>next try</th></tr>{rows}</table>")
        if not st.failure_reasons:
            out.append("<p id=failures>No failed jobs.</p>")
            return "".join(out)
        rows = "".join(
            f"<tr><td>{_e(task)}</td><td>{_e(error or '(no reason recorded)')}</td><td class=n>{n}</td><td>"
            f"<form method=post action=/status/retry><input type=hidden name=task value=\"{_e(task)}\">"
            f"<button type=submit>Retry {_e(task)}</button></form></td></tr>"
            for task, error, n in st.failure_reasons)
        out.append(f"<table id=failures><tr><th>task</th><th>reason</th><th class=n>jobs</th><th></th></tr>{rows}"
                   "</table><form method=post action=/status/retry id=retry-all>"
                   "<button type=submit>Retry all failed</button></form>")
        return "".join(out)

    def _models(self) -> str:
        loaded = self.pool.loaded()
        stats = self.pool.stats()
        rows = []
        for key, is_loaded in loaded.items():
            st = stats.get(key)
            rows.append(f"<tr><td>{_e(key)}</td><td>{'loaded' if is_loaded else 'not loaded'}</td>"
                        f"<td class=n>{st.items if st else 0}</td><td class=n>{st.batches if st else 0}</td></tr>")
        return ("<h2>Models</h2><table id=models><tr><th>model</th><th>state</th><th class=n>inputs</th>"
                f"<th class=n>batches</th></tr>{''.join(rows)}</table>")
