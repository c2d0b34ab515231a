"""Drain on shutdown: `swiftserve serve` tells every ingress replica to stop taking turns, to let running
turns finish until a deadline, and to end the rest with an error event (not committed) at the deadline.

Serve's own graceful shutdown waits for running requests but then kills the replica, which cuts a
stream without an error event; so the deadline is ours and Serve's shutdown comes after it. The signal
is a named actor that every ingress replica awaits: one broadcast, no polling. Without it (`serve run`,
KubeRay) an ingress never drains by itself and Serve's graceful shutdown applies.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import ray

from .protocol import ChatChunk, ErrorInfo

NAMESPACE = "serve"


def signal_name(app_name: str) -> str:
    return f"swiftserve-drain:{app_name}"


@ray.remote(num_cpus=0)
class DrainSignal:
    """Created by `swiftserve serve` before the app; `start` is the broadcast, `idle` the replies."""

    def __init__(self):
        self.started = asyncio.Event()
        self.deadline = 0.0
        self.idle: set[str] = set()

    async def start(self, grace_s: float) -> None:
        self.deadline = time.time() + grace_s
        self.started.set()

    async def wait(self) -> float:
        """Returns the deadline (epoch seconds) once draining starts."""
        await self.started.wait()
        return self.deadline

    async def report_idle(self, replica_id: str) -> None:
        self.idle.add(replica_id)

    async def idle_replicas(self) -> int:
        return len(self.idle)


class DrainWatch:
    """An ingress replica's view of the drain: refuse new turns, cut running ones at the deadline."""

    def __init__(self, app_name: str, replica_id: str):
        self.draining = False
        self.cut = asyncio.Event()  # set at the deadline
        self.in_flight = 0
        self._task = asyncio.get_running_loop().create_task(self._watch(app_name, replica_id))

    async def _watch(self, app_name: str, replica_id: str) -> None:
        try:
            signal = ray.get_actor(signal_name(app_name), namespace=NAMESPACE)
        except ValueError:  # not started by `swiftserve serve`
            return
        deadline = await signal.wait.remote()
        self.draining = True
        while self.in_flight and time.time() < deadline:
            await asyncio.sleep(0.05)
        self.cut.set()
        while self.in_flight:  # the cut turns are ending
            await asyncio.sleep(0.05)
        await signal.report_idle.remote(replica_id)

    def enter(self) -> None:
        """A turn starts (counted before its first token, so a drain that begins then still waits)."""
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def until_cut(self, stream, replica_id: str) -> AsyncIterator[ChatChunk]:
        """The chunks of an entered turn, which leaves when they end; at the deadline an error chunk
        instead, and the turn is cancelled upstream (LLMServer then neither commits nor keeps it).
        A streamed response whose body never starts (the client left first) never leaves: a drain then
        waits out its grace period, no more."""
        cut = asyncio.ensure_future(self.cut.wait())
        nxt = None
        try:
            while True:
                nxt = asyncio.ensure_future(stream.__anext__())
                await asyncio.wait({nxt, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    stream.cancel()
                    yield ChatChunk(replica_id=replica_id, error=ErrorInfo(
                        status=503, type="server_shutting_down",
                        message="the server is shutting down; this turn was not committed, resend it"))
                    return
                try:
                    yield nxt.result()
                except StopAsyncIteration:
                    return
        finally:
            cut.cancel()
            if nxt is not None:
                nxt.cancel()  # the client left mid-wait: nobody will read this chunk (or its error)
            self.leave()
