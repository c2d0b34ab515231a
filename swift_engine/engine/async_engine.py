"""StreamingEngine: the public API. A background thread steps the core; callers await events."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import ValidationError

from ..config import EngineConfig
from ..errors import CapacityError, EngineError, InvalidRequestError
from ..models.loader import load_model, random_model, resolve_model_dir
from ..outputs import GenerationEvent, SessionSnapshot
from ..sampling import SamplingParams
from ..tokenizer import ChatTokenizer
from .core import EngineCore
from .request import Request

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    pages_total: int
    pages_free: int
    pages_used: int
    pages_evictable: int  # held by idle sessions: LRU eviction can free them
    sessions_resident: int
    sessions_known: int
    sessions_running: int
    queue_depth: int
    evictions: int
    rebuilds: int
    tokens_generated: int
    tokens_per_s: float


class StreamingEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer: ChatTokenizer | None = None,
                 progress: bool = True):
        if model is None:
            model_dir = resolve_model_dir(config.model)
            model = load_model(model_dir, config.device, config.torch_dtype, progress=progress)
            tokenizer = ChatTokenizer(model_dir)
        self.config = config
        self.core = EngineCore(config, model, tokenizer)
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="swift-engine", daemon=True)
        self._thread.start()

    @classmethod
    def random(cls, hf_config: dict, config: EngineConfig, tokenizer: ChatTokenizer | None = None,
               seed: int = 0) -> "StreamingEngine":
        """An engine over random weights for the given HF config (tests, benchmarks)."""
        model = random_model(hf_config, config.device, config.torch_dtype, seed)
        return cls(config, model=model, tokenizer=tokenizer)

    @classmethod
    def from_model_dir(cls, model_dir, config: EngineConfig) -> "StreamingEngine":
        return cls(config.model_copy(update={"model": str(model_dir)}))

    # ---- the loop ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.core.has_work():
                    self._wake.wait()
                if self._closed and not self.core.has_work():
                    return
                try:
                    self.core.step()
                except Exception as exc:  # keep serving: fail this step's requests, not the engine
                    logger.exception("engine step failed")
                    self.core.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")

    def _submit(self, req: Request, action) -> None:
        with self._wake:
            if self._closed:
                raise CapacityError("engine is shut down")
            action(req)
            self._wake.notify()

    def shutdown(self, abort: bool = True) -> None:
        """Stop accepting work; abort (or finish) running requests; join the loop."""
        with self._wake:
            self._closed = True
            if abort:
                for req in list(self.core.scheduler.waiting) + self.core.scheduler.running:
                    req.aborted = True
            self._wake.notify()
        self._thread.join()

    # ---- requests ---------------------------------------------------------
    async def generate(self, session_id: str, prompt_token_ids: list[int] | None = None,
                       messages: list[dict] | None = None, sampling: SamplingParams | dict | None = None,
                       request_id: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Stream events of one turn. `messages` is the full history (OpenAI style)."""
        if (prompt_token_ids is None) == (messages is None):
            raise InvalidRequestError("pass exactly one of prompt_token_ids or messages")
        req = Request(request_id or uuid.uuid4().hex, session_id, "generate",
                      list(prompt_token_ids or []), emit=None, sampling=_sampling(sampling))
        async for event in self._stream(req, lambda r: self.core.submit(r, messages)):
            yield event

    async def score(self, session_id: str, token_ids: list[int]) -> list[float | None]:
        """Log-probability of each token given the session's streaming context; appends them."""
        req = Request(uuid.uuid4().hex, session_id, "score", list(token_ids), emit=None)
        async for event in self._stream(req, self.core.submit):
            if event.finish_reason is not None:
                return event.logprobs
        raise CapacityError("score was cancelled")

    async def restore(self, session_id: str, snapshot: SessionSnapshot) -> float:
        """Rebuild a session from a snapshot (re-prefill of at most S + W ids); returns seconds."""
        start = time.perf_counter()
        req = Request(uuid.uuid4().hex, session_id, "rebuild", [], emit=None)
        async for _ in self._stream(req, lambda r: self.core.restore(r, snapshot)):
            pass
        return time.perf_counter() - start

    async def _stream(self, req: Request, action) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        req.emit = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        self._submit(req, action)
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                if event.finish_reason == "error":
                    raise EngineError(event.text)
                yield event
        finally:
            if not finished:  # consumer went away: free the request's work
                with self._wake:
                    self.core.abort(req.id)
                    self._wake.notify()

    # ---- sessions ---------------------------------------------------------
    def snapshot(self, session_id: str) -> SessionSnapshot:
        with self._lock:
            return self.core.snapshot(session_id)

    def drop(self, session_id: str) -> bool:
        with self._lock:
            return self.core.drop(session_id)

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            s = self.core.sessions.get(session_id)
            return s is not None

    def resident_sessions(self) -> list[str]:
        with self._lock:
            return [sid for sid, s in self.core.sessions.items() if s.table.pages or s.running]

    def stats(self) -> EngineStats:
        with self._lock:
            c, sched = self.core, self.core.scheduler
            sessions = c.sessions.values()
            return EngineStats(
                pages_total=c.cache.num_pages, pages_free=len(c.cache.free),
                pages_used=c.cache.num_pages - len(c.cache.free),
                pages_evictable=sum(s.table.pages for s in sessions if not s.running),
                sessions_resident=sum(1 for s in sessions if s.table.pages),
                sessions_known=len(c.sessions), sessions_running=sum(1 for s in sessions if s.running),
                queue_depth=len(sched.waiting), evictions=sched.evictions, rebuilds=c.rebuilds,
                tokens_generated=c.tokens_generated,
                tokens_per_s=c.tokens_generated / max(time.monotonic() - self._started_at, 1e-9))

    # ---- synchronous convenience for scripts ------------------------------
    def generate_sync(self, session_id: str, **kw) -> list[GenerationEvent]:
        async def run():
            return [ev async for ev in self.generate(session_id, **kw)]
        return asyncio.run(run())

    def score_sync(self, session_id: str, token_ids: list[int]) -> list[float | None]:
        return asyncio.run(self.score(session_id, token_ids))

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
