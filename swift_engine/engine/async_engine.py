"""StreamingEngine: the public API. The engine core runs in its own process; callers await its events.

The front end (this object, in the caller's process) renders chat turns, sends requests and
aborts to the engine process (engine/core_process.py) and streams back each step's events;
it keeps what the engine last reported (the published view, idle sessions' snapshots) so
that stats, routing reads and snapshots of idle sessions never wait for a step. A dead or
stuck engine process turns into EngineDeadError for every waiting caller (core_client.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future

import cloudpickle
from pydantic import ValidationError

from ..config import EngineConfig
from ..errors import CapacityError, EngineDeadError, EngineError, InvalidRequestError, SessionBusyError
from ..models.families import ModelArgs
from ..models.loader import read_config, resolve_model_dir
from ..models.tensor_parallel import check_tensor_parallel
from ..outputs import GenerationEvent, SessionSnapshot
from ..sampling import SamplingParams
from ..tokenizer import ChatTokenizer
from .core_client import CoreClient
from .protocol import CoreSpec, ModelSource, StepOutput
from .request import Request
from .stats import EngineStats
from .tp_group import free_address
from .tp_worker import StartWorkers, spawn_workers
from .turn_render import RenderedTurn, TurnState, render_turn


class StreamingEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer: ChatTokenizer | None = None,
                 progress: bool = True, start_workers: StartWorkers | None = None):
        """`model`: None (load config.model in the engine process), a CausalLM (shared with it), or a
        ModelSource. tensor_parallel_size > 1: ranks 1..N-1 start through `start_workers` (default:
        local processes, tp_worker.spawn_workers); the engine process is rank 0."""
        source = model if isinstance(model, ModelSource) else ModelSource(model=model)
        if source.model is not None and config.tensor_parallel_size > 1:
            raise InvalidRequestError("tensor_parallel_size: a tensor-parallel engine loads its model on every "
                                      "rank itself (pass model=None)")
        workers, address = self._start_ranks(config, start_workers)
        own = source.model is None and source.random_hf_config is None  # the engine loads model and tokenizer
        try:
            self._client = CoreClient(
                lambda inputs, outputs: CoreSpec(config, source, None if own else tokenizer, progress, inputs,
                                                 outputs, os.getpid(), address),
                config.stall_timeout_s, workers)
        except BaseException:
            if workers is not None:
                workers.stop(wait_s=0)
            raise
        ready = self._client.ready
        for warning in ready.warnings:
            logging.getLogger("swift_engine.engine.cache_fit").warning(warning)
        self.config = ready.config  # S + W fitted to the model
        self.vocab_size = ready.vocab_size
        self.tokenizer = ChatTokenizer(resolve_model_dir(config.model)) if own else tokenizer
        self._view = ready.view
        self._idle: dict[str, SessionSnapshot] = {}  # sessions as they were when their last request ended
        self._busy: dict[str, int] = {}  # sessions with a request in flight from here
        self._client.on_step = self._on_step

    @staticmethod
    def _start_ranks(config: EngineConfig, start_workers: StartWorkers | None):
        if config.tensor_parallel_size == 1:
            return None, None
        check_tensor_parallel(ModelArgs.from_hf_config(read_config(resolve_model_dir(config.model))),
                              config.tensor_parallel_size)  # before any rank starts
        address = free_address()
        return (start_workers or spawn_workers)(config, address), address

    @classmethod
    def random(cls, hf_config: dict, config: EngineConfig, tokenizer: ChatTokenizer | None = None,
               seed: int = 0) -> "StreamingEngine":
        """An engine over random weights for the given HF config (tests, benchmarks), built in its process."""
        return cls(config, model=ModelSource(random_hf_config=hf_config, random_seed=seed), tokenizer=tokenizer)

    def _on_step(self, out: StepOutput) -> None:  # the client's reader thread, once per step
        self._view = out.view
        for sid in out.forgotten:  # forgotten at a submit, before the step whose ended states follow: a
            self._idle.pop(sid, None)  # session forgotten and rebuilt within one step is known
        self._idle.update(out.ended)

    # ---- life -------------------------------------------------------------------
    def shutdown(self, abort: bool = True) -> None:
        """Stop accepting work; abort (or finish) running requests; end the engine process."""
        self._client.close(abort)

    def is_alive(self) -> bool:
        """Whether the engine process (and, tensor-parallel, every rank) is running (health checks)."""
        return self._client.alive()

    @property
    def pid(self) -> int:
        """The engine process's pid (operators' tools, fault tests)."""
        return self._client.proc.pid

    # ---- requests -----------------------------------------------------------------
    async def generate(self, session_id: str, prompt_token_ids: list[int] | None = None,
                       messages: list[dict] | None = None, sampling: SamplingParams | dict | None = None,
                       request_id: str | None = None, pin: str = "none", pinned_tokens: int = 0,
                       require_session: bool = False) -> AsyncIterator[GenerationEvent]:
        """Stream events of one turn. `messages` is the full history (OpenAI style). A new session pins
        (engine/pinned.py) BOS + its system prompt with pin="system", or its first `pinned_tokens` ids.
        require_session: raise UnknownSessionError, before any event, if the engine no longer knows the
        session (has_session answers from its last report; the idle bounds may have forgotten it since)
        instead of starting it new: a caller with its own copy restores it then."""
        if (prompt_token_ids is None) == (messages is None):
            raise InvalidRequestError("pass exactly one of prompt_token_ids or messages")
        if pin not in ("none", "system"):
            raise InvalidRequestError(f"pin: expected 'none' or 'system', got {pin!r}")
        req = Request(request_id or uuid.uuid4().hex, session_id, "generate", list(prompt_token_ids or []),
                      emit=None, sampling=_sampling(sampling), pin=pin, pinned_tokens=pinned_tokens,
                      require_session=require_session)
        # the history check, template and tokens here, not in the engine process (engine/turn_render.py)
        rendered = self._prerender(session_id, messages, pin) if messages is not None else None
        async for event in self._stream(req, "submit", req, messages, rendered):
            yield event

    async def score(self, session_id: str, token_ids: list[int], pinned_tokens: int = 0) -> list[float | None]:
        """Log-probability of each token given the session's streaming context; appends them."""
        req = Request(uuid.uuid4().hex, session_id, "score", list(token_ids), emit=None, pinned_tokens=pinned_tokens)
        async for event in self._stream(req, "submit", req, None, None):
            if event.finish_reason is not None:
                return event.logprobs
        raise CapacityError("score was cancelled")

    async def restore(self, session_id: str, snapshot: SessionSnapshot) -> float:
        """Rebuild a session from a snapshot (re-prefill of at most S + W ids); returns seconds."""
        start = asyncio.get_running_loop().time()
        req = Request(uuid.uuid4().hex, session_id, "reprefill", [], emit=None)
        async for _ in self._stream(req, "restore", req, snapshot):
            pass
        return asyncio.get_running_loop().time() - start

    async def _stream(self, req: Request, method: str, *args) -> AsyncIterator[GenerationEvent]:
        events: asyncio.Queue = asyncio.Queue()
        client, sid = self._client, req.session_id
        client.streams[req.id] = (asyncio.get_running_loop(), events)
        self._busy[sid] = self._busy.get(sid, 0) + 1
        finished = False
        try:
            await asyncio.wrap_future(client.call(method, *args))
            while not finished:
                event = await events.get()
                if isinstance(event, BaseException):  # the engine died (core_client.py)
                    raise event
                finished = event.finish_reason is not None
                if finished:  # the session's ended state arrived with it: snapshot() answers from it now
                    self._release(sid)
                if event.finish_reason == "error":
                    raise EngineError(event.text)
                yield event
        finally:
            client.streams.pop(req.id, None)
            if not finished:  # consumer went away (or the submit failed): free the request's work
                self._release(sid)
                try:
                    client.abort(req.id)
                except EngineDeadError:
                    pass

    def _release(self, session_id: str) -> None:
        self._busy[session_id] -= 1
        if not self._busy[session_id]:
            del self._busy[session_id]

    def _prerender(self, session_id: str, messages: list[dict], pin: str) -> RenderedTurn | None:
        """A turn rendered here against the session's last reported state, or None where that fails
        (whatever the reason): then the engine renders it itself and raises what is wrong there."""
        if self.tokenizer is None:
            return None
        try:
            return render_turn(self.tokenizer, TurnState.of_snapshot(self._idle.get(session_id)), session_id,
                               messages, pin)
        except Exception:  # noqa: BLE001
            return None

    # ---- sessions: answered here where the engine's last report suffices ---------------
    def snapshot(self, session_id: str) -> SessionSnapshot:
        """An idle session's ids at once (as its last request left them); a running session's at the end
        of the current step."""
        snap = self._idle.get(session_id)
        if snap is not None and session_id not in self._busy:
            return snap
        return self._wait(self._client.call("snapshot", session_id))

    def drop(self, session_id: str) -> bool:
        """Forget a session and free its pages (at the end of the current step)."""
        if session_id in self._busy:
            raise SessionBusyError(f"session {session_id!r} has a request running")
        dropped = self._wait(self._client.call("drop", session_id))
        self._idle.pop(session_id, None)
        return dropped

    def has_session(self, session_id: str) -> bool:
        """Whether the engine knows the session, as it last reported (or a request for it is in flight).
        It may forget an idle one before the next turn arrives: see generate's require_session."""
        return session_id in self._idle or session_id in self._busy

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

    def inspect(self, fn, *args, wait: bool = True):
        """fn(core, *args) run in the engine process between steps, its result returned (tests and
        benchmarks read or instrument the EngineCore with it; fn travels with cloudpickle). With
        wait=False, a future of it."""
        fut = self._client.call("inspect", cloudpickle.dumps(fn), args)
        return cloudpickle.loads(self._wait(fut)) if wait else fut

    @staticmethod
    def _wait(fut: Future):
        return fut.result()  # bounded: a dead or stuck engine settles every call (core_client.py)

    # ---- synchronous convenience for scripts ------------------------------------------
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
