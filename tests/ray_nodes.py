"""A multi-node Ray cluster on one machine for tests: `ray start --head` plus `ray start --address` workers,
each its own process tree with its own ports (all free ports), its own temp dir; a node can be killed
whole (raylet, agents, workers: what a lost machine or a reclaimed spot pod does).

Every node runs under `ray start --block`, so its processes are that process's descendants: killing the
tree kills the node, and `close()` leaves nothing behind. Token auth is off (loopback only) and node
health checks are fast (500 ms x 3), so a dead node is noticed in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.redis_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen
    node_manager_port: int

    def kill(self) -> float:
        """SIGKILL every process of the node at once; returns when (time.monotonic())."""
        procs = _tree(self.proc.pid)
        killed = time.monotonic()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return killed


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class LocalRayCluster:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rnl", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500",
                    "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.nodes: list[RayNode] = []

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, timeout_s: float = 120.0) -> RayNode:
        """The head: GCS, dashboard (for `serve deploy`), Serve controller and proxy; no CPUs for replicas."""
        node = self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                                    "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                    "--dashboard-port", str(self.dashboard_port),
                                    "--ray-client-server-port", str(free_port())])
        self._wait(node, lambda: len(self.alive_nodes()) == 1, timeout_s)
        return node

    def add_worker(self, cpus: int = 2, timeout_s: float = 120.0, tries: int = 3) -> RayNode:
        """A worker node joins; on a loaded machine a raylet may time out registering: it is killed and
        started again (up to `tries` times)."""
        before = len(self.alive_nodes())
        for attempt in range(tries):
            node = self._start(f"worker{len(self.nodes)}", ["--address", f"127.0.0.1:{self.gcs_port}",
                                                            "--num-cpus", str(cpus)])
            try:
                self._wait(node, lambda: len(self.alive_nodes()) > before, timeout_s)
                return node
            except RuntimeError:
                node.kill()
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def _start(self, name: str, args: list[str]) -> RayNode:
        nm_port = free_port()
        ports = ["--node-manager-port", str(nm_port), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
        with open(self.tmp / f"{name}.out", "w") as out:
            proc = subprocess.Popen([RAY, "start", "--block", "--temp-dir", str(self.tmp), *args, *ports],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(name, proc, nm_port)
        self.nodes.append(node)
        return node

    def _wait(self, node: RayNode, done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline or node.proc.poll() is not None:
                log = (self.tmp / f"{node.name}.out").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{node.name} did not join the Ray cluster:\n{log}")
            time.sleep(0.5)

    # ---- state through the dashboard's REST API (no driver in this process) ---------------------
    def node_states(self) -> dict[int, tuple[str, str]] | None:
        """node manager port -> (node id, ALIVE/DEAD) of the nodes the dashboard lists; None if it cannot say."""
        try:
            reply = httpx.get(f"{self.dashboard}/nodes?view=summary", timeout=5).json()
            return {n["raylet"]["nodeManagerPort"]: (n["raylet"]["nodeId"], n["raylet"]["state"])
                    for n in reply["data"]["summary"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def alive_nodes(self) -> list[int]:
        return [port for port, (_, state) in (self.node_states() or {}).items() if state == "ALIVE"]

    def is_dead(self, node: RayNode) -> bool:
        """The GCS marked the node dead (the dashboard lists it DEAD, or no longer lists it)."""
        states = self.node_states()
        return states is not None and states.get(node.node_manager_port, ("", "DEAD"))[1] != "ALIVE"

    def node_id(self, node: RayNode) -> str | None:
        return (self.node_states() or {}).get(node.node_manager_port, (None, None))[0]

    def replicas(self, deployment: str, app: str = "swiftserve") -> list[dict]:
        """Serve's view of a deployment's replicas: dicts with replica_id, state, node_id, pid."""
        try:
            reply = httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=5).json()
            return reply["applications"][app]["deployments"][deployment]["replicas"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []

    def serve_deploy(self, config: Path) -> None:
        subprocess.run([str(Path(RAY).with_name("serve")), "deploy", str(config), "--address", self.dashboard],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
