"""What `cnai` prints when a command fails: one line a person can act on, never a traceback."""
from __future__ import annotations

import re

import asyncpg

from .db import DatabaseSetupError


def redact(dsn: str) -> str:
    """A DSN without its password, fit to print."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


def describe(e: BaseException) -> str:
    if isinstance(e, DatabaseSetupError):
        return str(e)
    if isinstance(e, asyncpg.InvalidPasswordError):
        return f"the database refused the login: {e} (check the user and password in --dsn / CNAI_DSN)"
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return f"{e} (check the database name in --dsn / CNAI_DSN)"
    if isinstance(e, (asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError)):
        return f"the database is not accepting connections: {_first_line(e)}"
    if isinstance(e, asyncpg.PostgresError):
        # cnai's own checks (triggers) speak to the person directly; their hint says what to do
        hint = getattr(e, "hint", None)
        return redact(e.args[0] if e.args else _first_line(e)) + (f" ({hint})" if hint else "")
    if isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and e.errno is not None
                                                             and not getattr(e, "filename", None)):
        # asyncpg raises the socket's own error; its text names the address it tried
        return (f"cannot reach the database ({_first_line(e) or type(e).__name__}): is PostgreSQL running, and "
                "are --dsn / CNAI_DSN right?")
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else _first_line(e)
    if isinstance(e, ValueError) and "dsn" in str(e).lower():
        return f"not a database URL: {_first_line(e)} (expected postgresql://user:password@host:5432/immich)"
    text = _first_line(e)
    return (f"{text} ({type(e).__name__}; run with --log-level DEBUG for the traceback)" if text
            else f"{type(e).__name__} (run with --log-level DEBUG for the traceback)")


def _first_line(e: BaseException) -> str:
    return redact(str(e).strip().splitlines()[0]) if str(e).strip() else ""
