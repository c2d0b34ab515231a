"""LLMServer: one Ray Serve replica wrapping one StreamingEngine, with store-backed sessions.

Per turn: make sure this replica owns the session (claim + re-prefill from the
store when it does not hold a current copy), stream the turn, commit the
session record, and only then send the final chunk (commit before acknowledge).
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from collections.abc import AsyncIterator

from ray import serve

from routing.affinity import pack_epochs, pack_sessions
from routing.store import (QuotaExceededError, SessionRecord, StaleEpochError, StoreError, StoreUnavailableError,
                           retry_commit)
from swift_engine import (CapacityError, EngineDeadError, EngineError, HistoryMismatchError, InvalidRequestError, SessionBusyError,
                          SessionSnapshot, StreamingEngine, UnknownSessionError, chain_digest, generation_defaults,
                          pinned_hash, resolve_model_dir)

from .autoscaling import autoscaling_stats
from .config import AppArgs
from .logprobs import token_logprobs
from .metrics import ServerMetrics
from .prefill_watch import Prefill, PrefillWatch
from .protocol import ChatChunk, ChatRequest, ErrorInfo, SessionInfo
from .sampling_defaults import merged_defaults
from .store_factory import make_store
from .stream_batching import coalesce
from .tp_workers import start_ray_workers

WRITE_THROUGH_PERIOD_S = 0.5  # relaxed durability: how often pending records are retried
LAST_TURN = ("last_request_digest", "last_reply", "last_finish_reason", "last_prompt_tokens",
             "last_completion_tokens")
_STATUS = [(InvalidRequestError, 400, "invalid_request_error"), (HistoryMismatchError, 409, "history_mismatch"),
           (SessionBusyError, 409, "session_busy"), (UnknownSessionError, 404, "not_found"),
           (CapacityError, 503, "capacity"), (EngineDeadError, 503, "engine_dead"), (StoreUnavailableError, 503, "store_unavailable"),
           (StaleEpochError, 409, "session_moved"),
           (QuotaExceededError, 429, "session_quota_exceeded")]


def error_info(exc: Exception) -> ErrorInfo:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return ErrorInfo(status=status, type=kind, message=str(exc))
    return ErrorInfo(status=500, type="internal_error", message=f"{type(exc).__name__}: {exc}")


CUT_KEEP_S = 60.0  # a cut turn id is remembered this long: its request arrives within it or never


REBUILD_ATTEMPTS = 3  # rebuilds of a session the engine forgot after the replica looked, before a 503


@dataclass
class Owned:
    """How a turn's session is held here (LLMServer._ensure_owned)."""
    reprefill: tuple[float, str] | None = None  # rebuilt for this turn: (seconds, cause)
    resident: bool = False  # in the engine, as it last reported: its submit requires the session
    record: SessionRecord | None = None  # what rebuilds a resident session the engine forgot meanwhile


class LLMServer:
    def __init__(self, args: dict | AppArgs):
        self.args = AppArgs.model_validate(args)
        self.engine = StreamingEngine(self.args.engine, progress=False, start_workers=start_ray_workers)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.store = make_store(self.args)
        self.epochs: dict[str, int] = {}      # sessions this replica owns -> epoch
        self.created: dict[str, float] = {}
        self.last_turn: dict[str, dict] = {}  # the LAST_TURN fields of each owned session's record
        self.pending: dict[str, SessionRecord] = {}  # acknowledged, not yet in the store (durability: relaxed)
        self.pruned_at = time.monotonic()  # last time bookkeeping of sessions the engine forgot was dropped
        self.in_turn: Counter[str] = Counter()  # requests between their claim and their end: never pruned
        self.dropping: dict[str, asyncio.Task] = {}  # a cut turn's drop: the session's next turn waits for it
        self.cut_turns: dict[str, float] = {}  # turn ids the ingress cut (cancel_turn) -> when, kept CUT_KEEP_S
        self.turn_tasks: dict[str, asyncio.Task] = {}  # turn id -> the task running it here
        self.write_through: asyncio.Task | None = None
        self.unreachable = False  # relaxed: the store failed lately; no turn waits on it until the write-through
        self.metrics = ServerMetrics(self.args.model_id, self.replica_id)
        self.pinned_keys: dict[str, str] = {}  # routing.affinity.pinned_key -> the engine's pinned_hash
        self.prefill = PrefillWatch(self.args.request_timeout_s)
        model = generation_defaults(resolve_model_dir(self.args.engine.model)) \
            if self.args.generation_config == "auto" else {}
        self.defaults = merged_defaults(model, self.args.sampling_defaults, self.args.max_completion_tokens)

    # ---- the turn ---------------------------------------------------------
    async def chat(self, request: ChatRequest | dict) -> AsyncIterator[ChatChunk]:
        req = ChatRequest.model_validate(request)
        sid = req.session_id or _context_session_id()
        persisted = sid is not None
        sid = sid or f"oneoff-{uuid.uuid4().hex}"
        if req.sampling.max_tokens > self.args.max_completion_tokens:
            yield self._error(sid, InvalidRequestError(
                f"max_tokens {req.sampling.max_tokens} exceeds the limit {self.args.max_completion_tokens}"))
            return
        if req.turn_id in self.cut_turns:  # cut before it arrived (Serve's cancellation is best effort)
            return
        done = False
        self.in_turn[sid] += 1
        if req.turn_id is not None:
            self.turn_tasks[req.turn_id] = asyncio.current_task()
        try:
            if sid in self.dropping:  # the cache an earlier cut turn left must be gone before this turn reads it
                await asyncio.shield(self.dropping[sid])
            try:
                owned = await self._ensure_owned(sid) if persisted else Owned()
            except (StoreError, EngineError) as exc:
                done = True
                yield self._error(sid, exc)
                return
            turn = self._turn(sid, req, persisted, owned)
            async for chunk in coalesce(turn, self.args.stream_batching_interval_ms / 1000):
                done = chunk.finish_reason is not None or chunk.error is not None
                yield chunk
        finally:
            self.in_turn[sid] -= 1
            if not self.in_turn[sid]:
                del self.in_turn[sid]
            self.turn_tasks.pop(req.turn_id, None)
            if not done and persisted:  # client went away: the turn is not committed
                self._drop_soon(sid)
            if not persisted:
                asyncio.get_running_loop().create_task(self._drop_when_idle(sid))

    def _drop_soon(self, sid: str) -> None:
        task = asyncio.get_running_loop().create_task(self.drop_cached(sid))
        self.dropping[sid] = task
        task.add_done_callback(lambda t: self.dropping.pop(sid, None) if self.dropping.get(sid) is t else None)

    async def cancel_turn(self, turn_id: str) -> None:
        """The ingress cut this turn (its client left): stop it here, or keep it from starting if its
        request is still on its way (Serve may deliver a request after cancelling it)."""
        now = time.monotonic()
        self.cut_turns = {t: at for t, at in self.cut_turns.items() if now - at < CUT_KEEP_S}
        self.cut_turns[turn_id] = now
        task = self.turn_tasks.get(turn_id)
        if task is not None:
            task.cancel()

    async def _turn(self, sid: str, req: ChatRequest, persisted: bool, owned: Owned) -> AsyncIterator[ChatChunk]:
        messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
        request_digest = chain_digest("", messages) if messages is not None else ""
        replay = self._committed_reply(sid, messages, request_digest) if persisted else None
        if replay is not None:
            yield replay
            return
        start = last = time.perf_counter()
        text: list[str] = []
        prefill = None
        try:
            kw = dict(messages=messages, pin=req.pin or self.args.pin) if messages is not None else \
                dict(prompt_token_ids=self._encode(req.prompt), pinned_tokens=req.pinned_tokens)
            prefill = self._start_prefill(sid, messages, kw.get("prompt_token_ids"))
            async for ev in self._events(sid, owned, sampling=req.sampling, **kw):
                now, first = time.perf_counter(), last == start
                if first:
                    prefill.first_token()
                (self.metrics.ttft if first else self.metrics.itl).observe(1000 * (now - last))
                last = now
                if first and owned.reprefill is None and ev.reprefill_s is not None:  # evicted: rebuilt from kept ids
                    owned.reprefill = (ev.reprefill_s, "evicted")
                    self.metrics.reprefilled(*owned.reprefill)
                seconds, cause = owned.reprefill if first and owned.reprefill else (None, None)  # first chunk only
                chunk = ChatChunk(replica_id=self.replica_id, session_id=sid, text=ev.text,
                                  token_ids=[] if ev.token_id is None else [ev.token_id], reprefill_s=seconds,
                                  reprefill_cause=cause,
                                  logprobs=token_logprobs(self.engine.tokenizer, ev) if req.logprobs else None)
                if ev.finish_reason is None:
                    text.append(ev.text)
                    yield chunk
                    continue
                if ev.usage.completion_tokens:
                    self.metrics.tokens.inc(ev.usage.completion_tokens)
                if ev.finish_reason == "cancelled":  # the engine is shutting down: not committed
                    await self.drop_cached(sid)
                    yield self._error(sid, CapacityError("the replica is shutting down; retry the turn"))
                    return
                text.append(ev.text)
                last_turn = dict(last_request_digest=request_digest, last_reply="".join(text),
                                 last_finish_reason=ev.finish_reason, last_prompt_tokens=ev.usage.prompt_tokens,
                                 last_completion_tokens=ev.usage.completion_tokens)
                self._learn_pinned(sid, req.pinned_key)
                try:
                    durable = await self._commit(sid, last_turn) if persisted else True
                except StoreError as exc:
                    yield self._error(sid, exc)
                    return
                yield chunk.model_copy(update=dict(finish_reason=ev.finish_reason, durable=durable,
                                                   prompt_tokens=ev.usage.prompt_tokens,
                                                   completion_tokens=ev.usage.completion_tokens))
        except (EngineError, StoreError) as exc:
            if type(exc) is EngineError and persisted:  # a failed step, maybe mid-turn: rebuild from the store
                await self.drop_cached(sid)
            yield self._error(sid, exc)
        finally:
            if prefill is not None:
                prefill.stop()

    async def _events(self, sid: str, owned: Owned, **kw) -> AsyncIterator:
        """The engine's events of the turn. A session `_ensure_owned` found in the engine's last report may
        have been forgotten since (idle bounds): the engine refuses it before any event, and it is rebuilt
        from the record here, then submitted again (still required: the idle bounds may strike again)."""
        for rebuilds in range(REBUILD_ATTEMPTS + 1):
            try:
                async for ev in self.engine.generate(sid, require_session=owned.resident, **kw):
                    yield ev
                return
            except UnknownSessionError:
                if not owned.resident:
                    raise
            if owned.record is None:  # no copy to rebuild from: the store could not be read
                raise StoreUnavailableError("the session's cache here was forgotten and the store could not "
                                            "be read; retry the turn")
            if rebuilds == REBUILD_ATTEMPTS:
                break
            owned.reprefill = await self._restore(sid, owned.record, "forgotten")
        raise CapacityError("the replica forgot the session again as soon as it was rebuilt (too many "
                            "sessions for its memory); retry the turn")

    def _start_prefill(self, sid: str, messages: list[dict] | None, prompt_ids: list[int] | None) -> Prefill:
        """Watch this turn's prefill, or refuse it (InvalidRequestError) if it cannot finish in time. Its size:
        the prompt's ids, or the new messages' text tokens (the chat template's few are left out)."""
        if prompt_ids is not None:
            tokens = len(prompt_ids)
        else:
            consumed = self.engine.snapshot(sid).messages_consumed if self.engine.has_session(sid) else 0
            tokens = sum(len(self.engine.tokenizer.encode(m["content"])) for m in messages[consumed:])
        self.prefill.check(tokens)
        return self.prefill.start(sid, tokens)

    def _learn_pinned(self, sid: str, key: str | None) -> None:
        """Remember which engine region a request's pinned_key names, for the routing stats."""
        if not key or key in self.pinned_keys:  # equal system messages render to equal ids: learnt once
            return
        snap = self.engine.snapshot(sid)
        if snap is not None and snap.pinned_tokens:
            self.pinned_keys[key] = pinned_hash(self.args.engine.model, snap.sink_ids)

    def _committed_reply(self, sid: str, messages: list[dict] | None, request_digest: str) -> ChatChunk | None:
        """The stored reply if this request retries the session's last committed turn."""
        last = self.last_turn.get(sid)
        if messages is None or not last or last["last_request_digest"] != request_digest:
            return None
        if not self.engine.has_session(sid) or self.engine.snapshot(sid).messages_consumed != len(messages) + 1:
            return None
        return ChatChunk(replica_id=self.replica_id, session_id=sid, text=last["last_reply"],
                         finish_reason=last["last_finish_reason"], prompt_tokens=last["last_prompt_tokens"],
                         completion_tokens=last["last_completion_tokens"])

    def _encode(self, prompt: str | None) -> list[int]:
        if prompt is None:
            raise InvalidRequestError("a request needs messages or a prompt")
        return self.engine.tokenizer.encode(prompt)

    def _error(self, sid: str, exc: Exception) -> ChatChunk:
        return ChatChunk(replica_id=self.replica_id, session_id=sid, error=error_info(exc))

    # ---- ownership --------------------------------------------------------
    async def _ensure_owned(self, sid: str) -> Owned:
        """Own a current copy of the session: the engine's (as it last reported it: `Owned.resident`), or
        one rebuilt from the store record (`Owned.reprefill`)."""
        self._prune_forgotten(keep=sid)
        resident = self.engine.has_session(sid)
        if sid in self.epochs and self.unreachable:  # relaxed and the store failed lately: serve what we hold
            if resident:
                return Owned(resident=True, record=self.pending.get(sid))
            if sid in self.pending:  # newer than the store's record
                return Owned(await self._restore(sid, self.pending[sid], "forgotten"))
        record, current = None, False
        if sid in self.epochs:
            try:
                record = await self.store.get(sid)
            except StoreUnavailableError:
                if not resident:
                    raise
                if self.args.durability == "relaxed":
                    self.unreachable = True
                    self._write_through_soon()
                return Owned(resident=True, record=self.pending.get(sid))  # serve it while the store is down
            if record is None and resident:
                # the store lost the record (restart without persistence): our copy is the best left
                self.epochs[sid] = (await self.store.claim(sid, self.replica_id)).epoch
                return Owned(resident=True)
            current = record is not None and record.epoch == self.epochs[sid] and record.owner == self.replica_id
        if not current:
            await self._forget(sid)  # drops the engine's copy
            await self._admit(sid)
            claim = await self.store.claim(sid, self.replica_id)
            self.epochs[sid], self.created[sid] = claim.epoch, claim.record.created_at
            record, resident = claim.previous, False
            if record is not None and record.owner != self.replica_id:
                self.metrics.claims.inc()
        if record is not None:
            self.last_turn[sid] = record.model_dump(include=set(LAST_TURN))
        if record is None or record.tokens_seen == 0:
            return Owned()
        if resident:
            return Owned(resident=True, record=record)
        return Owned(await self._restore(sid, record, "moved" if record.owner != self.replica_id else "forgotten"))

    def _prune_forgotten(self, keep: str) -> None:
        """The engine forgets idle sessions (max_idle_sessions, idle_session_ttl_s); drop our bookkeeping of
        them too, at most once a second. Their next turn claims and rebuilds them, as after a failover."""
        now = time.monotonic()
        if now - self.pruned_at < 1.0:
            return
        self.pruned_at = now
        # a session in a turn may not be in the engine yet (its submission waits in the engine's inbox)
        for sid in [s for s in self.epochs if s != keep and s not in self.pending and s not in self.in_turn
                    and not self.engine.has_session(s)]:
            del self.epochs[sid]
            self.created.pop(sid, None)
            self.last_turn.pop(sid, None)

    async def _admit(self, sid: str) -> None:
        """Count a session this replica takes on against its tenant's quota of live sessions."""
        limit = self.args.limits.max_sessions_per_tenant
        if limit is not None and not await self.store.admit(self._tenant(sid), sid, limit):
            raise QuotaExceededError(f"session {sid!r} is refused: its tenant has {limit} live sessions, the "
                                     "most it may; delete one (DELETE /v1/sessions/{id}) or reuse an id")

    def _tenant(self, sid: str) -> str:
        """The tenant of a tenant-scoped id (`tenant/id`); without API keys there is one tenant, ""."""
        keyed = self.args.api_keys_env is not None or self.args.api_keys_file is not None
        return sid.partition("/")[0] if keyed else ""

    async def _restore(self, sid: str, record: SessionRecord, cause: str) -> tuple[float, str]:
        snap = SessionSnapshot(**record.model_dump(include=set(SessionSnapshot.model_fields) - {"session_id"}),
                               session_id=sid)
        seconds = await self.engine.restore(sid, snap)
        self.metrics.reprefilled(seconds, cause)
        return seconds, cause

    async def _commit(self, sid: str, last_turn: dict) -> bool:
        """Store the turn before it is acknowledged; True once durable. A store that cannot be reached fails
        the turn (StoreError), or with `durability: relaxed` leaves it pending for the write-through (False)."""
        await asyncio.sleep(0)  # a cancellation on its way (the client left) lands here, before the commit
        snap = self.engine.snapshot(sid)
        now = time.time()
        record = SessionRecord(**snap.model_dump(), **last_turn, owner=self.replica_id, epoch=self.epochs[sid],
                               created_at=self.created.get(sid, now), updated_at=now)
        start = time.perf_counter()
        relaxed = self.args.durability == "relaxed"
        try:
            if self.unreachable:  # the store failed a moment ago: no turn waits on it until it is back
                raise StoreUnavailableError("the store did not answer the last write; writing through later")
            await self._write(sid, record, 1 if relaxed else max(1, int(self.args.commit_timeout_s / 0.5) + 3))
        except StoreError as exc:
            self.metrics.commit_failed(exc)
            if relaxed and isinstance(exc, StoreUnavailableError):
                self.pending[sid], self.last_turn[sid], self.unreachable = record, last_turn, True
                self._write_through_soon()
                return False
            await self._forget(sid)  # not committed: drop our copy; the next turn rebuilds from the store
            raise
        self.metrics.commit_ms.observe(1000 * (time.perf_counter() - start))
        self.last_turn[sid] = last_turn
        return True

    async def _write(self, sid: str, record: SessionRecord, attempts: int) -> None:
        """Commit `record`, epoch-fenced; re-seed a record the store lost (restarted without persistence)."""
        try:
            await retry_commit(self.store, record, attempts=attempts, base_delay_s=0.05, max_delay_s=0.5)
        except StaleEpochError as exc:
            if exc.stored_epoch is not None:
                raise
            # the record vanished (store restarted without persistence): ours is the best copy left
            claim = await self.store.claim(sid, self.replica_id)
            self.epochs[sid] = claim.epoch
            await retry_commit(self.store, record.model_copy(update={"epoch": claim.epoch}))

    def _write_through_soon(self) -> None:
        if self.write_through is None or self.write_through.done():
            self.write_through = asyncio.get_running_loop().create_task(self._write_through())

    async def _write_through(self) -> None:
        """Relaxed durability: write the pending records, epoch-fenced, once the store answers again.

        A session another replica claimed meanwhile loses its pending turns here (this copy is dropped).
        """
        while True:
            await asyncio.sleep(WRITE_THROUGH_PERIOD_S)
            for sid, record in list(self.pending.items()):
                try:
                    await self._write(sid, record.model_copy(update={"epoch": self.epochs[sid]}), attempts=1)
                except StoreUnavailableError:
                    break  # still unreachable
                except StoreError as exc:
                    self.metrics.commit_failed(exc)
                    await self._forget(sid)
                    continue
                if self.pending.get(sid) is record:  # a later turn may have replaced it meanwhile
                    del self.pending[sid]
            if not self.pending:
                break
        self.unreachable = False

    async def _forget(self, sid: str) -> None:
        self.pending.pop(sid, None)
        self.epochs.pop(sid, None)
        self.created.pop(sid, None)
        self.last_turn.pop(sid, None)
        await self._drop_when_idle(sid)

    async def drop_cached(self, sid: str) -> None:
        """Lose this replica's cache of a session but keep ownership: the next turn rebuilds it from the store.

        Used after an abandoned turn, and by operators and tests to exercise a re-prefill.
        """
        await self._drop_when_idle(sid)

    async def _drop_when_idle(self, sid: str) -> None:
        for _ in range(500):  # the engine ends an aborted request at its next step
            try:
                await asyncio.to_thread(self.engine.drop, sid)  # answered between the engine's steps
                return
            except SessionBusyError:
                await asyncio.sleep(0.01)

    # ---- sessions, health, stats -----------------------------------------
    async def get_session(self, session_id: str) -> SessionInfo | None:
        record = await self.store.get(session_id)
        if record is None:
            return None
        return SessionInfo(**record.model_dump(include=set(SessionInfo.model_fields)))

    async def delete_session(self, session_id: str) -> bool:
        await self._forget(session_id)
        if self.args.limits.max_sessions_per_tenant is not None:
            await self.store.release(self._tenant(session_id), session_id)
        return await self.store.delete(session_id)

    def sampling_defaults(self) -> dict:
        """What a request gets for the sampling fields it leaves out (sampling_defaults.py)."""
        return self.defaults

    def engine_stats(self) -> dict:
        return {"replica_id": self.replica_id, "pid": os.getpid(), "engine_pid": self.engine.pid,
                **asdict(self.engine.stats())}

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("engine loop is not running")

    def record_routing_stats(self) -> dict:
        st = self.engine.stats()
        self.metrics.engine_state(st)
        held = self.engine.held_sessions()
        pinned = set(self.engine.pinned_regions())
        self.pinned_keys = {k: h for k, h in self.pinned_keys.items() if h in pinned}
        # held: resident and host-tier sessions (cheap to resume here, so routed here); only the resident
        # ones use pages. Idle sessions' pages are not free (routing.capacity): placing there would evict one
        return {"replica_id": self.replica_id, "free_pages": st.pages_free, "live_pages": st.pages_live,
                "total_pages": st.pages_total, "running": st.sessions_running,
                "max_running": self.args.engine.max_running, "resident": st.sessions_resident,
                "host": st.sessions_host, "sessions": pack_sessions(held),
                "epochs": pack_epochs({sid: self.epochs.get(sid, 0) for sid in held}),
                "min_free_pages": st.pages_to_admit, "pinned": sorted(self.pinned_keys)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return autoscaling_stats(self.record_routing_stats())

    def __del__(self):
        if hasattr(self, "engine"):  # the constructor may have failed before the engine existed
            self.engine.shutdown()


def _context_session_id() -> str | None:
    """Session id given with `handle.options(session_id=...)` when the request body has none."""
    return getattr(serve.context._get_serve_request_context(), "session_id", None) or None
