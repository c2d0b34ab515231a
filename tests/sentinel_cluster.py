"""A throwaway Redis Sentinel deployment for tests: a primary, replicas and 3 Sentinels, real processes on
free ports, one password everywhere, failover tuned to take a second or two.

The helper speaks raw RESP (tests.redis_server) so it does not depend on the client under test.
"""

from __future__ import annotations

import shutil
import socket
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tests.redis_server import REDIS_SERVER, _resp, free_port, reap, spawn

SERVICE = "mymaster"
DOWN_AFTER_MS = 1000  # a primary silent this long is down (subjectively; objectively with the quorum)
FAILOVER_TIMEOUT_MS = 2000


class Node:
    """One redis-server process (data node or Sentinel) that can be killed, restarted, paused, resumed."""

    def __init__(self, root: Path, name: str, password: str) -> None:
        self.name, self.password = name, password
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, args: list[str], timeout_s: float = 10.0) -> None:
        self.proc = spawn([REDIS_SERVER, *args])  # reaped at exit, and killed with the test process
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "log").read_text(errors="replace")[-2000:] if (self.dir / "log").exists() else ""
                raise RuntimeError(f"{self.name} on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL (a crashed process or lost machine) and reap it."""
        if self.proc is not None:
            reap(self.proc)  # a paused one too
            self.proc = None

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        try:
            return self.request([b"PING"]).startswith((b"+", b"-"))
        except OSError:
            return False

    def request(self, command: list[bytes], timeout_s: float = 2.0) -> bytes:
        """AUTH, then ``command``; the raw reply to ``command`` (whole, for arrays)."""
        wire = _resp([b"AUTH", self.password.encode()]) + _resp(command)

        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock:
            sock.sendall(wire)
            data = b""
            while data.count(b"\r\n") < 2 or not _complete(data.split(b"\r\n", 1)[1]):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.split(b"\r\n", 1)[1]


def _complete(reply: bytes) -> bool:
    """Whether ``reply`` holds one whole RESP value (enough of a parser for INFO and SENTINEL replies)."""
    try:
        return _parse(reply, 0) is not None
    except IndexError:
        return False


def _parse(data: bytes, pos: int) -> int | None:
    end = data.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, body = data[pos:pos + 1], data[pos + 1:end]
    if kind in (b"+", b"-", b":"):
        return end + 2
    if kind == b"$":
        n = int(body)
        return end + 2 if n < 0 else (end + 2 + n + 2 if len(data) >= end + 2 + n + 2 else None)
    if kind == b"*":
        pos = end + 2
        for _ in range(max(0, int(body))):
            pos = _parse(data, pos)
            if pos is None:
                return None
        return pos
    raise IndexError(kind)


class SentinelCluster:
    """``replicas`` replicas of a primary and 3 Sentinels watching it as ``SERVICE`` (quorum 2)."""

    def __init__(self, replicas: int = 2, password: str = "sentinel-test-pw") -> None:
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="swiftserve-sentinel-"))
        self.data = [Node(self.root, f"redis{i}", password) for i in range(1 + replicas)]
        self.sentinels = [Node(self.root, f"sentinel{i}", password) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{quote(self.password, safe='')}@{hosts}/{SERVICE}/0"

    def start(self) -> None:
        primary = self.data[0]
        self.start_data(primary, None)
        for node in self.data[1:]:
            self.start_data(node, primary.port)
        for s in self.sentinels:
            self.start_sentinel(s, primary.port)
        self.wait_stable()

    def start_data(self, node: Node, replica_of: int | None) -> None:
        args = ["--port", str(node.port), "--bind", "127.0.0.1", "--dir", str(node.dir), "--save", "",
                "--appendonly", "no", "--logfile", str(node.dir / "log"), "--requirepass", self.password,
                "--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        node.start(args)

    def start_sentinel(self, node: Node, primary_port: int) -> None:
        conf = node.dir / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
        conf.write_text("\n".join([
            f"port {node.port}", "bind 127.0.0.1", f"dir {node.dir}", f"logfile {node.dir / 'log'}",
            f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
            f"sentinel auth-pass {SERVICE} {self.password}",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 2", ""]))
        node.start([str(conf), "--sentinel"])

    # ---- what the Sentinels say ---------------------------------------------------
    def master_port(self, sentinel: Node | None = None) -> int | None:
        """The primary's port as a Sentinel reports it (None if it cannot say)."""
        for s in [sentinel] if sentinel else [s for s in self.sentinels if s.alive]:
            try:
                reply = s.request([b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", SERVICE.encode()])
            except OSError:
                continue
            parts = reply.split(b"\r\n")
            if reply.startswith(b"*2"):
                return int(parts[4])
        return None

    def primary(self) -> Node:
        port = self.master_port()
        return next(n for n in self.data if n.port == port)

    def role(self, node: Node) -> str:
        """'master' or 'slave' and, for a replica, whether its link is up: 'slave:up'."""
        info = node.request([b"INFO", b"replication"]).decode(errors="replace")
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        role = fields.get("role", "?")
        return f"{role}:{fields.get('master_link_status', '?')}" if role == "slave" else role

    def wait_stable(self, timeout_s: float = 30.0) -> Node:
        """Until every Sentinel names one primary and sees the others, and every other live data node
        replicates it; returns that primary. (Which one is the Sentinels' call: on a loaded machine they
        may fail over again, spuriously, while this waits.)"""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (primary := self._stable()) is not None:
                return primary
            time.sleep(0.1)
        states = {n.name: (self.role(n) if n.alive else "dead") for n in self.data}
        raise RuntimeError(f"sentinel deployment not stable: {states}")

    def _stable(self) -> Node | None:
        try:
            ports = {self.master_port(s) for s in self.sentinels}
            primary = next((n for n in self.data if {n.port} == ports and n.alive), None)
            if primary is None or any(self._other_sentinels(s) < len(self.sentinels) - 1 for s in self.sentinels):
                return None
            replicas = [n for n in self.data if n.alive and n is not primary]
            stable = self.role(primary) == "master" and all(self.role(n) == "slave:up" for n in replicas) \
                and self._connected_replicas(primary) == len(replicas)
            return primary if stable else None
        except OSError:
            return None

    def _other_sentinels(self, sentinel: Node) -> int:
        reply = sentinel.request([b"SENTINEL", b"SENTINELS", SERVICE.encode()])
        return int(reply.split(b"\r\n", 1)[0][1:])

    def _connected_replicas(self, primary: Node) -> int:
        info = primary.request([b"INFO", b"replication"]).decode(errors="replace")
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return int(fields.get("connected_slaves", 0))

    # ---- faults --------------------------------------------------------------------
    def kill_primary(self) -> Node:
        """SIGKILL the current primary; returns the dead node (restart it with ``rejoin``)."""
        victim = self.primary()
        victim.kill()
        return victim

    def wait_promoted(self, old: Node, timeout_s: float = 30.0) -> tuple[Node, float]:
        """Until a Sentinel names another primary that answers as one; (new primary, seconds waited)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            port = self.master_port()
            new = next((n for n in self.data if n.port == port and n is not old and n.alive), None)
            try:
                if new is not None and self.role(new) == "master":
                    return new, time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"no replica promoted within {timeout_s}s")

    def rejoin(self, node: Node, timeout_s: float = 30.0) -> None:
        """Restart a killed data node as a replica of the current primary (what a restarted pod does), once
        every Sentinel names a primary other than it (one that has not heard of the promotion yet would
        name the dead node itself)."""
        deadline = time.monotonic() + timeout_s
        while len(ports := {self.master_port(s) for s in self.sentinels}) != 1 or ports in ({node.port}, {None}):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinels do not agree on a primary other than {node.name}: {ports}")
            time.sleep(0.1)
        self.start_data(node, self.primary().port)
        self.wait_stable()

    def replicas(self) -> list[Node]:
        primary = self.primary()
        return [n for n in self.data if n.alive and n is not primary]

    def close(self) -> None:
        for node in [*self.sentinels, *self.data]:
            try:
                node.kill()
            except Exception:  # noqa: BLE001 - keep killing the rest
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def sentinel_cluster(replicas: int = 2) -> Iterator[SentinelCluster]:
    """A started SentinelCluster; every process is killed on exit, whatever happened."""
    cluster = SentinelCluster(replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
