"""StreamingEngine: the public API. A background thread steps the core; callers await events.

No lock is held across a step: calls that change the engine (submit, abort, drop,
shutdown) go into a thread-safe inbox that the engine thread drains between steps;
after each step it publishes an immutable view (stats, resident sessions) that
readers take without waiting, and only then hands the step's events to their
callers, so a caller that saw an event sees figures at least as new.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from pydantic import ValidationError

from ..config import EngineConfig
from ..errors import CapacityError, EngineError, InvalidRequestError, SessionBusyError
from ..models.loader import load_engine_model, resolve_model_dir
from ..models.random_init import random_model
from ..outputs import GenerationEvent, SessionSnapshot
from ..sampling import SamplingParams
from ..tokenizer import ChatTokenizer
from .core import EngineCore
from .idle_cache import CHECK_EVERY_S
from .request import Request
from .stats import EngineStats, EngineView, view_of
from .tp_worker import StartWorkers, start_rank0

logger = logging.getLogger(__name__)


class StreamingEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer: ChatTokenizer | None = None,
                 progress: bool = True, start_workers: StartWorkers | None = None):
        """tensor_parallel_size > 1: ranks 1..N-1 start through `start_workers` (default: local
        processes, tp_worker.spawn_workers); this process is rank 0."""
        if model is not None and config.tensor_parallel_size > 1:
            raise InvalidRequestError("tensor_parallel_size: a tensor-parallel engine loads its model on every "
                                      "rank itself (pass model=None)")
        self.tp_group = start_rank0(config, start_workers) if config.tensor_parallel_size > 1 else None
        try:
            if model is None:
                model = load_engine_model(config, progress, self.tp_group)
                tokenizer = ChatTokenizer(resolve_model_dir(config.model))
            self.core = EngineCore(config, model, tokenizer)
        except BaseException:  # the other ranks are waiting for steps: tell them to stop
            if self.tp_group is not None:
                self.tp_group.close()
            raise
        self.config = self.core.config  # S + W fitted to the model
        self.tokenizer = tokenizer
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # the step's events as (loop, queue, event), handed over after publishing
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, GenerationEvent]] = []
        self._closed = False
        self._stopped = False  # the loop has ended: calls run on the caller's thread
        self._stop_lock = threading.Lock()  # held only to queue a call or to end the loop, never across a step
        self._view: EngineView = view_of(self.core)
        self._thread = threading.Thread(target=self._loop, name="swift-engine", daemon=True)
        self._thread.start()

    @classmethod
    def random(cls, hf_config: dict, config: EngineConfig, tokenizer: ChatTokenizer | None = None,
               seed: int = 0) -> "StreamingEngine":
        """An engine over random weights for the given HF config (tests, benchmarks)."""
        model = random_model(hf_config, config.device, config.torch_dtype, seed)
        return cls(config, model=model, tokenizer=tokenizer)

    # ---- the loop (engine thread) ---------------------------------------
    def _loop(self) -> None:
        try:
            while not (self._closed and not self.core.has_work()):
                self._drain(wait=not self.core.has_work())
                self.core.age_caches()
                if self.core.has_work():
                    try:
                        self.core.step()
                    except Exception as exc:  # keep serving: fail this step's requests, not the engine
                        logger.exception("engine step failed")
                        self.core.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                self._publish()
        finally:  # calls queued from now on run on their caller's thread
            with self._stop_lock:
                self._drain(wait=False)
                self._stopped = True

    def _drain(self, wait: bool) -> None:
        """Run the queued calls in order; with `wait`, block until there is one or a second passed (idle
        caches age and the published view with them, work or not)."""
        try:
            call = self._inbox.get(timeout=CHECK_EVERY_S) if wait else self._inbox.get_nowait()
            while True:
                call()
                call = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _publish(self) -> None:
        self._view = view_of(self.core)  # one reference swap: readers never wait
        events, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, queue_, event in events:
            by_loop.setdefault(loop, []).append((queue_, event))
        for loop, batch in by_loop.items():  # one wake-up per loop per step, not one per token
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that caller's loop is closed: its requests end, no one else notices
                for _, event in batch:
                    self.core.abort(event.request_id)

    def _call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the engine thread between steps; its result or exception lands in the future."""
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller went away before the call ran (a cancelled submit): nothing to do
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)
        with self._stop_lock:
            if self._stopped:
                run()
            else:
                self._inbox.put(run)
        return fut

    def shutdown(self, abort: bool = True) -> None:
        """Stop accepting work; abort (or finish) running requests; join the loop."""
        def close() -> None:
            self._closed = True
            if abort:
                self.core.abort()
        if self._thread.is_alive():
            self._call(close)
            self._thread.join()
        if self.tp_group is not None:
            self.tp_group.close()

    def is_alive(self) -> bool:
        """Whether the engine thread (and, tensor-parallel, every rank) is running (health checks)."""
        return self._thread.is_alive() and (self.tp_group is None or self.tp_group.alive())

    # ---- requests ---------------------------------------------------------
    async def generate(self, session_id: str, prompt_token_ids: list[int] | None = None,
                       messages: list[dict] | None = None, sampling: SamplingParams | dict | None = None,
                       request_id: str | None = None, pin: str = "none",
                       pinned_tokens: int = 0) -> AsyncIterator[GenerationEvent]:
        """Stream events of one turn. `messages` is the full history (OpenAI style). A new session pins
        (engine/pinned.py) BOS + its system prompt with pin="system", or its first `pinned_tokens` ids."""
        if (prompt_token_ids is None) == (messages is None):
            raise InvalidRequestError("pass exactly one of prompt_token_ids or messages")
        if pin not in ("none", "system"):
            raise InvalidRequestError(f"pin: expected 'none' or 'system', got {pin!r}")
        req = Request(request_id or uuid.uuid4().hex, session_id, "generate", list(prompt_token_ids or []),
                      emit=None, sampling=_sampling(sampling), pin=pin, pinned_tokens=pinned_tokens)
        # the history check, template and tokens here, not on the engine thread (engine/turn_render.py)
        rendered = self.core.prerender(session_id, messages, pin) if messages is not None else None
        async for event in self._stream(req, lambda r: self.core.submit(r, messages, rendered)):
            yield event

    async def score(self, session_id: str, token_ids: list[int], pinned_tokens: int = 0) -> list[float | None]:
        """Log-probability of each token given the session's streaming context; appends them."""
        req = Request(uuid.uuid4().hex, session_id, "score", list(token_ids), emit=None, pinned_tokens=pinned_tokens)
        async for event in self._stream(req, self.core.submit):
            if event.finish_reason is not None:
                return event.logprobs
        raise CapacityError("score was cancelled")

    async def restore(self, session_id: str, snapshot: SessionSnapshot) -> float:
        """Rebuild a session from a snapshot (re-prefill of at most S + W ids); returns seconds."""
        start = time.perf_counter()
        req = Request(uuid.uuid4().hex, session_id, "reprefill", [], emit=None)
        async for _ in self._stream(req, lambda r: self.core.restore(r, snapshot)):
            pass
        return time.perf_counter() - start

    async def _stream(self, req: Request, action) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        req.emit = lambda ev: self._outbox.append((loop, events, ev))
        finished = False
        try:
            await asyncio.wrap_future(self._call(lambda: self._accept(req, action)))
            while not finished:
                event = await events.get()
                finished = event.finish_reason is not None
                if event.finish_reason == "error":
                    raise EngineError(event.text)
                yield event
        finally:
            if not finished:  # consumer went away (or the submit failed): free the request's work
                self._call(lambda: self.core.abort(req.id))

    def _accept(self, req: Request, action) -> None:
        if self._closed:
            raise CapacityError("engine is shut down")
        action(req)

    # ---- sessions: answered without waiting for a step where possible ------
    def snapshot(self, session_id: str) -> SessionSnapshot:
        """An idle session's ids at once (the engine thread leaves them alone between its turns);
        a running session's at the end of the current step."""
        session = self.core.sessions.get(session_id)
        if session is not None and not session.running:
            return self.core.snapshot(session_id)
        return self._on_engine(lambda: self.core.snapshot(session_id))

    def drop(self, session_id: str) -> bool:
        """Forget a session and free its pages (at the end of the current step)."""
        session = self.core.sessions.get(session_id)
        if session is not None and session.running:
            raise SessionBusyError(f"session {session_id!r} has a request running")
        return self._on_engine(lambda: self.core.drop(session_id))

    def has_session(self, session_id: str) -> bool:
        return session_id in self.core.sessions  # one dict lookup, atomic under the GIL

    def hold_session(self, session_id: str) -> bool:
        """Like has_session, and a known session is then kept for its next turn: not forgotten as idle
        (max_idle_sessions, idle_session_ttl_s) for the next 30 s. Call it to decide not to restore."""
        return self.core.idle.hold(self.core.sessions, session_id)

    def resident_sessions(self) -> list[str]:
        return list(self._view.resident)

    def held_sessions(self) -> list[str]:
        """Resident sessions and those in the host tier: both resume here without a re-prefill."""
        return list(self._view.held)

    def pinned_regions(self) -> list[str]:
        """pinned_hash of every pinned region this engine holds."""
        return list(self._view.pinned)

    def stats(self) -> EngineStats:
        return self._view.stats

    def _on_engine(self, fn):
        """fn's result, run on the engine thread between steps (directly once the thread has ended)."""
        if not self._thread.is_alive():
            return fn()
        return self._call(fn).result()

    # ---- synchronous convenience for scripts ------------------------------
    def generate_sync(self, session_id: str, **kw) -> list[GenerationEvent]:
        async def run():
            return [ev async for ev in self.generate(session_id, **kw)]
        return asyncio.run(run())

    def score_sync(self, session_id: str, token_ids: list[int], pinned_tokens: int = 0) -> list[float | None]:
        return asyncio.run(self.score(session_id, token_ids, pinned_tokens))

    def restore_sync(self, session_id: str, snapshot: SessionSnapshot) -> float:
        return asyncio.run(self.restore(session_id, snapshot))


def _sampling(sampling: SamplingParams | dict | None) -> SamplingParams:
    if isinstance(sampling, SamplingParams):
        return sampling
    try:
        return SamplingParams(**(sampling or {}))
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid sampling parameters: {exc.errors()[0]['loc'][0]}: "
                                  f"{exc.errors()[0]['msg']}") from exc


def _deliver(batch: list[tuple[asyncio.Queue, GenerationEvent]]) -> None:
    for queue_, event in batch:
        queue_.put_nowait(event)
