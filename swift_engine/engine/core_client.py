"""The front end's side of the engine process: start it, send it calls, route its outputs, supervise it.

One thread reads the engine process's messages: replies complete their call's future; a step's
events go to their streams, one wake-up per caller's event loop per step. The same thread is
the supervisor: the process gone, or silent for `stall_timeout_s` while callers wait, makes
the engine dead: every waiting caller gets EngineDeadError at once, and every later call too.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

import torch.multiprocessing as mp
import zmq

from ..errors import CapacityError, EngineDeadError
from .protocol import CoreSpec, ReadyInfo, StepOutput

logger = logging.getLogger(__name__)
POLL_MS = 100  # how often the supervisor looks at the process when it says nothing
Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class CoreClient:
    def __init__(self, spec_of: Callable[[str, str], CoreSpec], stall_timeout_s: float, workers=None):
        """`spec_of(inputs, outputs)`: the engine process's spec for these socket addresses. `workers`:
        tensor-parallel ranks 1..N-1, started by the front end (supervised with the process)."""
        self.workers, self.stall_timeout_s = workers, stall_timeout_s
        self._dir = tempfile.mkdtemp(prefix="swift-engine-")
        inputs, outputs = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context()
        self._ctx.setsockopt(zmq.LINGER, 0)  # nothing waits on an engine process that is gone (exit, GC)
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.bind(inputs)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(outputs)
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe; callers come from any thread
        self._ids = itertools.count()
        self._calls: dict[int, Future] = {}
        self.streams: dict[str, Stream] = {}
        self.dead: str | None = None
        self.closing = False  # shutdown() was called: calls from now on get CapacityError, as before
        self.on_step: Callable[[StepOutput], None] = lambda out: None
        ctx = mp.get_context("forkserver")  # one process imports torch once; each engine forks from it
        ctx.set_forkserver_preload(["swift_engine.engine.core_process"])
        from .core_process import run_engine_process
        self.proc = ctx.Process(target=run_engine_process, args=(spec_of(inputs, outputs), stall_timeout_s),
                                daemon=True, name="swift-engine-core")
        with _main_module_hidden():
            self.proc.start()
        self.ready = self._wait_ready()
        self._heard = time.monotonic()
        self._stopping = False
        self._thread = threading.Thread(target=self._read, name="swift-engine-outputs", daemon=True)
        self._thread.start()

    def _wait_ready(self) -> ReadyInfo:
        """The engine process's first message: its ready info, or the error that stopped it."""
        while not self._out.poll(POLL_MS):
            if not self.proc.is_alive():
                self._close_sockets()
                raise EngineDeadError(f"the engine process exited (code {self.proc.exitcode}) while starting")
        kind, value = pickle.loads(self._out.recv())
        if kind == "failed":
            self.proc.join(timeout=30)
            self._close_sockets()
            raise value
        return value

    # ---- to the engine process -----------------------------------------------
    def call(self, method: str, *args) -> Future:
        """Send a call; its reply (value or typed exception) lands in the future."""
        fut: Future = Future()
        call_id = next(self._ids)
        self._calls[call_id] = fut
        try:
            self._send(("call", call_id, method, args))
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return fut

    def abort(self, request_id: str) -> None:
        if self.dead is None:
            self._send(("abort", request_id))

    def _send(self, msg) -> None:
        if self.dead is None:
            self._supervise()  # a process or rank gone a moment ago: fail now, not after a failed step
        if self.dead is not None:
            raise self._dead_error()
        data = pickle.dumps(msg, protocol=5)
        with self._send_lock:
            self._in.send(data)

    # ---- from the engine process (the reader thread) ----------------------------
    def _read(self) -> None:
        while not self._stopping:
            if self._out.poll(POLL_MS):
                self._heard = time.monotonic()
                try:
                    self._handle(pickle.loads(self._out.recv()))
                except Exception:  # noqa: BLE001 - this thread serves every caller: it must not end
                    logger.exception("an engine output could not be handled")
            elif self.dead is None:
                self._supervise()
            if self.dead is not None and not self._stopping:
                return

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "reply":
            _, call_id, ok, value = msg
            fut = self._calls.pop(call_id, None)
            if fut is not None:
                _settle(fut, value, ok)
        elif kind == "step":
            self.on_step(msg[1])
            self._deliver(msg[1].events)
        elif kind == "dead":
            self._die(msg[1])

    def _deliver(self, events) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ev in events:
            stream = self.streams.get(ev.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], ev))
        for loop, batch in by_loop.items():  # one wake-up per loop per step, not one per token
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that caller's loop is closed: its requests end, no one else notices
                for _, ev in batch:
                    self.streams.pop(ev.request_id, None)
                    self.abort(ev.request_id)

    def _supervise(self) -> None:
        if not self.proc.is_alive():
            self._die(f"the engine process exited (code {self.proc.exitcode})")
        elif self.workers is not None and not self.workers.alive():
            self._die("a tensor-parallel rank of the engine exited")
        elif (self._calls or self.streams) and time.monotonic() - self._heard > self.stall_timeout_s:
            self._die(f"the engine process said nothing for {self.stall_timeout_s:.0f} s with work queued")

    def _die(self, reason: str, quiet: bool = False) -> None:
        """Every waiting caller gets EngineDeadError now; the process (and any rank) is ended."""
        if not quiet:
            logger.error("engine dead: %s", reason)
        self.dead = reason
        error = self._dead_error()
        for fut in list(self._calls.values()):
            _settle(fut, error, ok=False)
        self._calls.clear()
        for loop, queue in list(self.streams.values()):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
        if self.workers is not None:
            self.workers.stop(wait_s=0)

    def _dead_error(self) -> Exception:
        return CapacityError("engine is shut down") if self.closing else EngineDeadError(self.dead)

    def alive(self) -> bool:
        if self.dead is None:
            self._supervise()
        return self.dead is None

    # ---- the end ----------------------------------------------------------------
    def close(self, abort: bool, wait_s: float = 60.0) -> None:
        """Tell the engine process to stop (aborting or finishing its requests); wait for it, then end it."""
        self.closing = True
        if self.dead is None and self.proc.is_alive():
            try:
                self.call("shutdown", abort).result(timeout=wait_s)
            except Exception:  # noqa: BLE001 - dead or stuck: ended below either way
                pass
            self.proc.join(timeout=wait_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        if self.workers is not None:
            self.workers.stop(wait_s=30 if self.dead is None else 0)
        if self.dead is None:
            self._die("engine is shut down", quiet=True)
        self._stopping = True
        self._thread.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._in.close(linger=0)
        self._out.close(linger=0)
        self._ctx.term()
        for name in ("in", "out"):
            try:
                os.unlink(os.path.join(self._dir, name))
            except FileNotFoundError:
                pass
        os.rmdir(self._dir)


@contextlib.contextmanager
def _main_module_hidden():
    """multiprocessing re-runs the caller's main script in a child it starts (unless guarded by
    `if __name__ == "__main__"`); the engine process needs none of it, and a plain script that builds
    an engine at its top level would build another in the child. So the child is not told of it."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


def _settle(fut: Future, value, ok: bool) -> None:
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except InvalidStateError:  # the caller cancelled its wait: nothing to hand over
        pass


def _put_all(batch) -> None:
    for queue, event in batch:
        queue.put_nowait(event)
