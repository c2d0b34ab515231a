"""The engine process: EngineCore's busy loop, behind the narrow protocol of engine/protocol.py.

Between steps it takes what the front end sent (submits, aborts, calls); each step is
schedule -> run -> postprocess (EngineCore.step); after it, one message carries the step's
events, the state of the sessions whose request ended, and the published view. It exits
when told to, when the front end's process is gone, or when it stops making progress
with work queued (the front end then fails every waiting caller, see core_client.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import time

import cloudpickle
import zmq

from ..errors import CapacityError, EngineError
from ..models.loader import load_engine_model, resolve_model_dir
from ..models.progress import thread_lock_only
from ..models.random_init import random_model
from ..tokenizer import ChatTokenizer
from .core import EngineCore
from .idle_cache import CHECK_EVERY_S
from .protocol import HEARTBEAT_S, CoreSpec, ReadyInfo, StepOutput
from .stats import view_of
from .tp_group import TensorParallelGroup

logger = logging.getLogger(__name__)


def run_engine_process(spec: CoreSpec, stall_timeout_s: float) -> None:
    """The process's whole life (the target of the front end's multiprocessing.Process)."""
    # Ctrl-C in a terminal reaches the whole process group: the front end decides what it means (stop
    # the reply, shut down); the engine process goes on until the front end tells it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    thread_lock_only()  # for its progress bars (it ends with os._exit)
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.connect(spec.outputs)
    inp = ctx.socket(zmq.PULL)
    inp.connect(spec.inputs)
    try:
        proc = EngineProcess(spec, inp, out, stall_timeout_s)
    except BaseException as exc:  # noqa: BLE001 - the front end raises it as the constructor's error
        out.send(_dumps(("failed", _portable(exc))))
        _exit(ctx, 1)
    code = 0
    try:
        proc.run()
    except BaseException:  # noqa: BLE001
        logger.exception("engine process failed")
        code = 1
    finally:
        proc.close()
    _exit(ctx, code)


def _exit(ctx, code: int) -> None:
    ctx.destroy(linger=2000)  # what was sent reaches the front end (if it is still there to read it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: seconds with torch loaded


class EngineProcess:
    CALLS = ("submit", "restore", "snapshot", "drop", "inspect", "shutdown")

    def __init__(self, spec: CoreSpec, inp, out, stall_timeout_s: float):
        self.inp, self.out, self.front_pid = inp, out, spec.front_pid
        self.stall_timeout_s = stall_timeout_s
        config = spec.config
        self.group = (TensorParallelGroup(0, config.tensor_parallel_size, spec.tp_address, config.device)
                      if spec.tp_address else None)
        try:
            model, tokenizer = spec.source.model, spec.tokenizer
            if spec.source.random_hf_config is not None:
                model = random_model(spec.source.random_hf_config, config.device, config.torch_dtype,
                                     spec.source.random_seed)
            elif model is None:
                model = load_engine_model(config, spec.progress, self.group)
                tokenizer = ChatTokenizer(resolve_model_dir(config.model))
            with _warnings_of("swift_engine.engine.cache_fit") as warnings:
                self.core = EngineCore(config, model, tokenizer)
        except BaseException:
            if self.group is not None:  # the other ranks wait for steps: tell them to stop
                self.group.close()
            raise
        self.closed = False
        self.ended: set[str] = set()
        self.events: list = []
        self.sent_at = 0.0
        self.idle_since: float | None = None  # work queued and no step made progress since then
        out.send(_dumps(("ready", ReadyInfo(self.core.config, self.core.vocab_size, view_of(self.core), warnings))))

    # ---- the loop ------------------------------------------------------------
    def run(self) -> None:
        core = self.core
        while not (self.closed and not core.has_work()):
            self._receive(block=not core.has_work())
            core.age_caches()
            progress = False
            if core.has_work():
                try:
                    progress = core.step()
                except Exception as exc:  # keep serving: fail this step's requests, not the engine
                    logger.exception("engine step failed")
                    core.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                    progress = True
            self._send_step()
            self._watch(progress)

    def _receive(self, block: bool) -> None:
        """Handle what the front end sent; idle, wait for it up to CHECK_EVERY_S (caches age meanwhile)."""
        if block and not self.inp.poll(CHECK_EVERY_S * 1000):
            self._check_front()
            return
        while True:
            try:
                msg = pickle.loads(self.inp.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if msg[0] == "abort":
                self.core.abort(msg[1])
            else:
                self._call(*msg[1:])

    def _call(self, call_id: int, method: str, args: tuple) -> None:
        try:
            if method not in self.CALLS:
                raise EngineError(f"unknown engine call {method!r}")
            reply = _dumps(("reply", call_id, True, getattr(self, "_" + method)(*args)))
        except Exception as exc:  # a typed error for the caller; the engine goes on
            reply = _dumps(("reply", call_id, False, _portable(exc)))
        self.out.send(reply)

    def _send_step(self) -> None:
        events = self.events[:]
        self.events.clear()  # in place: requests' emit is this list's append
        now = time.monotonic()
        if not events and now - self.sent_at < HEARTBEAT_S:
            return
        if not events:
            self._check_front()
        core = self.core
        for ev in events:
            if ev.finish_reason is not None:
                self.ended.add(ev.session_id)
        ended = {sid: core.snapshot(sid) for sid in self.ended if sid in core.sessions
                 and not core.sessions[sid].running}
        self.ended.clear()
        forgotten, core.idle.gone = core.idle.gone, []
        self.out.send(_dumps(("step", StepOutput(events, ended, forgotten, view_of(core)))))
        self.sent_at = now

    def _watch(self, progress: bool) -> None:
        """Work queued and no step made progress for stall_timeout_s: say so and exit (the front end
        fails every waiting caller; a replica's health check fails and Ray replaces it)."""
        if progress or not self.core.has_work():
            self.idle_since = None
            return
        now = time.monotonic()
        self.idle_since = self.idle_since or now
        if now - self.idle_since > self.stall_timeout_s:
            reason = f"the engine made no progress for {self.stall_timeout_s:.0f} s with work queued"
            logger.error(reason)
            self.out.send(_dumps(("dead", reason)))
            raise SystemExit(1)

    def _check_front(self) -> None:
        try:
            os.kill(self.front_pid, 0)
        except ProcessLookupError:  # the front end's process is gone: no one will read our outputs
            self.closed = True
            self.core.abort()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

    # ---- calls (engine/protocol.py) ---------------------------------------------
    def _submit(self, req, messages, rendered) -> None:
        req.emit = self.events.append
        self._accept(req, lambda: self.core.submit(req, messages, rendered))

    def _restore(self, req, snapshot) -> None:
        req.emit = self.events.append
        self._accept(req, lambda: self.core.restore(req, snapshot))

    def _accept(self, req, action) -> None:
        if self.closed:
            raise CapacityError("engine is shut down")
        action()

    def _snapshot(self, session_id: str):
        return self.core.snapshot(session_id)

    def _drop(self, session_id: str) -> bool:
        return self.core.drop(session_id)

    def _inspect(self, fn: bytes, args: tuple) -> bytes:
        """Run a function on the core (tests and benchmarks: read or instrument its internals). Its
        result goes back pickled on its own, so one the front end cannot load fails that caller only."""
        return cloudpickle.dumps(cloudpickle.loads(fn)(self.core, *args))

    def _shutdown(self, abort: bool) -> None:
        self.closed = True
        if abort:
            self.core.abort()


@contextlib.contextmanager
def _warnings_of(name: str):
    """Collect what a logger warns of, for the front end to log where the caller's logging is."""
    log, found = logging.getLogger(name), []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler, propagate = Collect(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield found
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _dumps(msg) -> bytes:
    return pickle.dumps(msg, protocol=5)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else an EngineError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return EngineError(f"{type(exc).__name__}: {exc}")

