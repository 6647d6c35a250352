"""Warm start: the README's first command, `scripts/setup && .venv/bin/cnai serve --embedded --watch ./photos`,
timed to the first `/ping` answer, on a machine where nothing changed since the last run (target: 10 s).

    python bench/warm_start.py [--runs 3]

Runs the command from the repository root as the README does (its .venv; scripts/setup installs it the first
time), with its own data folder, photo folder and port, so a running cnai is left alone. The first run may be cold
(a new venv, a new cluster); the runs after it are warm. Each run is stopped with Ctrl-C, as a person would. Prints
each run's seconds to /ping, split into setup and serve, and the warm runs' ratio to the 10 s target; then one
more run with setup's install stamp removed (pip runs, as every start did before the stamp), for the ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
            return r.read() == b"pong"
    except OSError:
        return False


def one_run(work: Path) -> tuple[float, float]:
    """(seconds in scripts/setup, seconds from then to /ping)."""
    port = free_port()
    env = {**os.environ, "CNAI_DATA_DIR": str(work / "data"), "CNAI_PORT": str(port)}
    t0 = time.perf_counter()
    subprocess.run([str(ROOT / "scripts" / "setup")], cwd=ROOT, env=env, check=True)
    t1 = time.perf_counter()
    serve = subprocess.Popen([str(ROOT / ".venv" / "bin" / "cnai"), "serve", "--embedded", "--watch",
                              str(work / "photos")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not ping(port):
            if serve.poll() is not None:
                raise SystemExit(f"cnai serve exited: {serve.stderr.read()[-2000:]}")
            time.sleep(0.05)
        t2 = time.perf_counter()
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs; the first may be cold (default: 3)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cnai-bench-warm-"))
    work.chmod(0o755)  # as root, the server's own user must reach the data folder in it
    try:
        times = []
        for i in range(args.runs):
            setup_s, serve_s = one_run(work)
            times.append(setup_s + serve_s)
            print(f"run {i + 1}{' (may be cold)' if i == 0 else ''}: {setup_s + serve_s:6.2f} s to /ping "
                  f"(scripts/setup {setup_s:5.2f} s, cnai serve {serve_s:5.2f} s)", flush=True)
        warm = times[1:] or times
        best = min(warm)
        print(f"warm start: best {best:.2f} s, {best / TARGET_S:.2f}× the {TARGET_S:.0f} s target; "
              f"first run / best warm run: {times[0] / best:.1f}×")
        (ROOT / ".venv" / ".cnai-installed").unlink(missing_ok=True)
        setup_s, serve_s = one_run(work)
        print(f"with pip run again: {setup_s + serve_s:6.2f} s to /ping (scripts/setup {setup_s:5.2f} s); "
              f"{(setup_s + serve_s) / best:.1f}× the warm start")
    finally:
        subprocess.run([str(ROOT / ".venv" / "bin" / "cnai"), "stop", "--force", "--data-dir", str(work / "data")],
                       cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
