"""A throwaway real redis-server for tests: free port, temp dir, no persistence.

It can be stopped and started again on the same port, to play a Redis outage.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
_LIVE: set[subprocess.Popen] = set()  # started here and not yet reaped: killed at exit whatever happened


# looked up here, not in the forked child (dlopen there may wait on a lock another thread held at the fork)
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: Linux kills it when the test process dies, even by SIGKILL (no atexit then)."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str]) -> subprocess.Popen:
    """A child server process that cannot outlive the tests: reaped at exit, and killed with the test process.
    The death signal follows the forking *thread*: only the main thread's children get it (one started from a
    worker thread would die with that thread)."""
    main = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if main else None)
    _LIVE.add(proc)
    return proc


def reap(proc: subprocess.Popen) -> None:
    """Kill (a paused process too) and wait; safe on one already gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=10)
    _LIVE.discard(proc)


@atexit.register
def _reap_all() -> None:
    for proc in list(_LIVE):
        reap(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``; ``password`` sets ``--requirepass``; ``aof`` runs it
    as the k8s Redis does (``appendonly yes``, ``appendfsync everysec``), so a restart reloads the AOF."""

    def __init__(self, password: str | None = None, port: int | None = None, aof: bool = False) -> None:
        self.password, self.aof = password, aof
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="swiftserve-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server (same port as before) and wait until it answers."""
        if self._proc is not None:
            raise RuntimeError("redis-server is already running")
        options = {"port": str(self.port), "bind": "127.0.0.1", "dir": str(self._dir)}
        options |= {"save": "", "appendonly": "yes" if self.aof else "no", "logfile": str(self._dir / "redis.log")}
        if self.aof:
            options["appendfsync"] = "everysec"
        if self.password:
            options["requirepass"] = self.password
        args = [REDIS_SERVER, *(arg for k, v in options.items() for arg in (f"--{k}", v))]
        self._proc = spawn(args)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.01)

    def stop(self, save: bool = False) -> None:
        """Kill the server (an outage: data lost), or with ``save`` shut it down after
        writing a snapshot that the next ``start`` loads (a restart that keeps data)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            if save:
                self._request([b"SHUTDOWN", b"SAVE"])
                proc.wait(timeout=10)
        finally:  # a failed save (or wait) still leaves no process behind
            reap(proc)

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers."""
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _answers(self) -> bool:
        # "+PONG" or "-NOAUTH ..." both mean the server is up.
        try:
            return self._request([b"PING"])[:1] in (b"+", b"-")
        except OSError:
            return False

    def _request(self, command: list[bytes]) -> bytes:
        """Send one command (after AUTH if needed) in raw RESP, so the helper does
        not depend on the client under test; return the command's reply line."""
        commands = [[b"AUTH", self.password.encode()]] if self.password else []
        wire = b"".join(_resp(c) for c in [*commands, command])
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            sock.sendall(wire)
            replies = b""
            while replies.count(b"\r\n") < len(commands) + 1:
                chunk = sock.recv(4096)
                if not chunk:  # SHUTDOWN closes the connection without a reply
                    break
                replies += chunk
        lines = replies.split(b"\r\n")
        return lines[len(commands)] if len(lines) > len(commands) else b""


def _resp(command: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(command)]
    parts += [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in command]
    return b"".join(parts)


@contextmanager
def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    """A started RedisServer, stopped and cleaned up on exit."""
    server = RedisServer(password=password)
    try:
        server.start()
        yield server
    finally:
        server.close()
