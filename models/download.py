"""Resumable, verified HTTP downloads.

Bytes go to `<target>.part`; an interrupted download (a dropped connection, Ctrl-C, a crash) continues from there
with an HTTP Range request, on the next try or the next run. Only a file whose size and SHA-256 check out is
renamed to `<target>`. Proxies come from the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download that cannot succeed as asked; the message says what happened and what to do."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    sha256_checked: bool  # False where no expected hash was known: only the size was checked


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _progress(total: int | None, initial: int, label: str, enabled: bool):
    from tqdm import tqdm

    # bytes with binary units, rate and ETA; to stderr so stdout keeps the one-line results
    return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, mininterval=0.5, dynamic_ncols=True)


async def download(session: aiohttp.ClientSession, url: str, target: Path, *, size: int | None = None,
                   sha256: str | None = None, attempts: int = 5, retry_delay_s: float = 1.0,
                   progress: bool = True) -> Downloaded:
    """Fetch `url` into `target`, resuming `<target>.part` when one is there. `size` and `sha256` are the
    expected values where known; without `size`, the size the server announces is required instead."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file():  # finished earlier (a pull that failed later, in the install step)
        return _verified(target, target, size, sha256, url)
    part = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            done = await _fetch(session, url, part, size, target.name, progress)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError,
                _Retryable) as e:
            last_error = e
            kept = part.stat().st_size if part.exists() else 0
            log.warning("download of %s interrupted (%s); %d bytes kept, try %d of %d", url, _reason(e), kept,
                        attempt, attempts)
            if attempt < attempts:
                await asyncio.sleep(min(retry_delay_s * 2 ** (attempt - 1), 30))
            continue
        if done:
            return _verified(part, target, size or done, sha256, url)
    kept = part.stat().st_size if part.exists() else 0
    resume = f"; {kept} bytes are kept in {part}: run the same command again to resume" if kept else ""
    raise DownloadError(f"could not download {url} after {attempts} tries ({_reason(last_error)}){resume}")


class _Retryable(Exception):
    pass


def _reason(e: BaseException | None) -> str:
    if e is None:
        return "no reason"
    text = str(e) or type(e).__name__
    return text if isinstance(e, _Retryable) else f"{type(e).__name__}: {text}"


async def _fetch(session: aiohttp.ClientSession, url: str, part: Path, size: int | None, label: str,
                 progress: bool) -> int | None:
    """One request, appending to `part`. Returns the total size once the file is complete."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # not the file we expect: start over
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    async with session.get(url, headers=headers) as resp:
        if resp.status == 416 and have:
            # nothing after what we have: complete if the server's total says so, else start over
            total = _total_from_range(resp.headers.get("Content-Range"))
            if total is not None and total == have:
                return have
            part.unlink()
            raise _Retryable(f"the server refused to resume at byte {have}; starting over")
        if resp.status >= 500 or resp.status == 429:
            raise _Retryable(f"HTTP {resp.status} {resp.reason}")
        if resp.status >= 400:
            raise DownloadError(f"{url}: HTTP {resp.status} {resp.reason} — the file is not there (check the "
                                f"model name, --mirror and CNAI_MODEL_BASE_URL)")
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"the server answered a range other than the one asked for "
                                 f"({resp.headers.get('Content-Range')!r}); starting over")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:  # 200: the whole file, whether or not we asked for a part (some servers ignore Range)
            if have:
                log.info("%s does not resume downloads; starting over", url)
            have = 0
            total = resp.content_length
            mode = "wb"
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url} is {total} bytes, expected {size}: not the published file")
        total = size or total
        if total is None:
            raise DownloadError(f"{url}: the server does not say how large the file is, so a complete download "
                                f"cannot be told from a cut one; set its size in the catalogue")
        with open(part, mode) as f, _progress(total, have, label, progress) as bar:
            async for chunk in resp.content.iter_chunked(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        got = part.stat().st_size
        if got < total:
            raise _Retryable(f"connection closed at byte {got} of {total}")
        return total


def _total_from_range(value: str | None) -> int | None:
    m = re.match(r"bytes \*/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _verified(path: Path, target: Path, size: int | None, sha256: str | None, url: str) -> Downloaded:
    got = path.stat().st_size
    if size is not None and got != size:
        path.unlink()
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; the partial file was removed, run the "
                            f"command again")
    digest = sha256_of(path)
    if sha256 and digest != sha256.lower():
        path.unlink()
        raise DownloadError(f"{url}: SHA-256 is {digest}, expected {sha256.lower()}: the file is damaged or not "
                            f"the published one; it was deleted and nothing was installed")
    if path != target:
        path.rename(target)
    return Downloaded(target, got, digest, sha256_checked=bool(sha256))


def client_session(user_agent: str) -> aiohttp.ClientSession:
    # trust_env: HTTP(S)_PROXY / NO_PROXY and ~/.netrc, as curl and pip honour them
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    return aiohttp.ClientSession(timeout=timeout, trust_env=True, headers={"User-Agent": user_agent})
