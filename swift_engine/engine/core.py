"""EngineCore: synchronous engine. Submit requests, call step(), events go to each request's emit.

Not thread-safe: StreamingEngine's engine thread is its only caller (others reach it
through the engine's inbox).
"""
from __future__ import annotations

import time
from collections import OrderedDict

import torch

from ..config import EngineConfig
from ..errors import CapacityError, InvalidRequestError, SessionBusyError, UnknownSessionError
from ..models.llama import CausalLM
from ..outputs import SessionSnapshot, Usage
from ..sampling import Sampler
from ..tokenizer import ChatTokenizer, IncrementalDetokenizer, StopStringMatcher
from .cache import SinkWindowCache, page_bytes, running_pages
from .cache_fit import fit_cache_to_model
from .host_tier import HostTier
from .idle import IdleBound
from .idle_cache import CacheAgeing
from .model_runner import ModelRunner
from .pinned import pinned_hash
from .request import Request
from .scheduler import Scheduler
from .session import Session, chain_digest
from .turn_render import RenderedTurn, TurnState, render_turn
from .tp_group import StepBroadcaster


def kv_cache_for(config: EngineConfig, model: CausalLM) -> SinkWindowCache:
    """The page pool of `config` for `model` (of a tensor-parallel rank: its share of the KV heads)."""
    a = model.args
    num_pages = config.num_pages or pages_for_memory(config, a)
    return SinkWindowCache(config.sink_tokens, config.window_tokens, config.page_size, num_pages,
                           (a.num_layers, a.num_kv_heads, a.head_dim),
                           model.lm_head.weight.device, model.lm_head.weight.dtype, config.kv_cache_dtype,
                           config.max_pinned_tokens)


def pages_for_memory(config: EngineConfig, a) -> int:
    """Pages that fit in kv_cache_memory_gb (fp8: its bytes and scales)."""
    per_page = page_bytes((a.num_layers, a.num_kv_heads, a.head_dim), config.page_size, config.torch_dtype,
                          config.kv_cache_dtype)
    return max(1, int(config.kv_cache_memory_gb * 2**30 // per_page))


class EngineCore:
    def __init__(self, config: EngineConfig, model: CausalLM, tokenizer: ChatTokenizer | None):
        a = model.args
        config = fit_cache_to_model(config, a)
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.cache = kv_cache_for(config, model)
        self.host = HostTier(self.cache, config.host_cache_bytes)
        self.scheduler = Scheduler(self.cache, config.max_batch_tokens, config.max_running, self.host)
        if not self.scheduler.can_ever_fit():
            raise CapacityError(f"num_pages={self.cache.num_pages} cannot hold one session: it needs "
                                f"{self.scheduler.reserve} pages of {config.page_size} tokens")
        runner, group = ModelRunner(model, self.cache, config), getattr(model, "tp_group", None)
        self.runner = runner if group is None else StepBroadcaster(runner, group, self.host)  # rank 0 of a TP engine
        self.sampler = Sampler(a.vocab_size, self.runner.device)
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        # those that may hold pages, in the same order: the per-step walks (view, eviction, ageing) go over
        # these, not over the many more known as ids only (max_idle_sessions); see `with_pages`
        self.resident: OrderedDict[str, Session] = OrderedDict()
        self.vocab_size = a.vocab_size
        self.tokens_generated = 0
        self.reprefills = 0
        self.idle = IdleBound(config.max_idle_sessions, config.idle_session_ttl_s)
        self.ageing = CacheAgeing(config.idle_cache_ttl_s)

    # ---- submission -------------------------------------------------------
    def submit(self, req: Request, messages: list[dict] | None = None,
               rendered: RenderedTurn | None = None) -> None:
        """Validate and queue. Raises typed errors; on error nothing changes. `rendered`: the turn's
        `messages` as the front end rendered them (used if the session is as it was then)."""
        ids_only = len(self.sessions) - len(self.with_pages()) - len(self.host.entries)
        self.idle.trim(self.sessions, ids_only, keep=req.session_id, in_host=self.host.holds)
        session = self.sessions.get(req.session_id)
        if session is not None and session.running:
            raise SessionBusyError(f"session {req.session_id!r} already has a request running")
        if session is None and req.require_session:  # the caller's view is older than the idle bounds
            raise UnknownSessionError(f"session {req.session_id!r} is not known to this engine "
                                      "(forgotten as idle); restore it first")
        session = session or Session(req.session_id, self.config.sink_tokens, self.config.window_tokens)
        if messages is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass prompt_token_ids")
            if rendered is None or rendered.state != TurnState.of(session):
                rendered = render_turn(self.tokenizer, TurnState.of(session), session.id, messages, req.pin)
            req.new_ids, req.new_messages = rendered.ids, rendered.new_messages
        self._check_ids(req.new_ids, allow_empty=req.kind == "reprefill")
        if len(req.new_ids) > self.config.max_prompt_tokens:
            raise InvalidRequestError(f"turn has {len(req.new_ids)} prompt tokens; the limit "
                                      f"(max_prompt_tokens) is {self.config.max_prompt_tokens}")
        pinned = self._pinned_length(session, req, rendered)
        if req.kind == "generate":
            p = req.sampling
            self.sampler.prepare(req)
            req.detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
            req.stopper = StopStringMatcher(p.stop)
        if pinned:
            session.pin(pinned)
        for known in (self.sessions, self.resident):  # a session gains pages only in a turn
            known[req.session_id] = session
            known.move_to_end(req.session_id)
        session.running = True
        self.scheduler.add(req)

    def _pinned_length(self, session: Session, req: Request, rendered: RenderedTurn | None) -> int:
        """P of a new session's pinned region (0: none, the S sinks as usual): BOS + its system prompt
        (pin="system"), or its first req.pinned_tokens ids; at least S, at most max_pinned_tokens."""
        if session.tokens_seen or session.needs_reprefill:
            return 0  # pinning applies to a session's first turn only
        n = req.pinned_tokens
        if req.pin == "system" and rendered is not None:
            n = rendered.pinned or 0
        limit = self.config.max_pinned_tokens
        if n < 0:
            raise InvalidRequestError(f"pinned_tokens must be >= 0, got {n}")
        if n > limit:
            raise InvalidRequestError(f"the pinned region has {n} tokens; the limit (max_pinned_tokens) is {limit}")
        if n > len(req.new_ids):
            raise InvalidRequestError(f"pinned_tokens {n} exceeds the prompt's {len(req.new_ids)} tokens")
        P = max(n, self.config.sink_tokens)
        if not n or P > len(req.new_ids):
            return 0
        if running_pages(P, self.cache.W, self.cache.P, self.config.max_batch_tokens) > self.cache.num_pages:
            raise InvalidRequestError(f"a session pinning {P} tokens cannot fit the KV pool "
                                      f"(num_pages {self.cache.num_pages})")
        return P

    def _check_ids(self, ids: list[int], allow_empty: bool = False) -> None:
        if not ids and not allow_empty:
            raise InvalidRequestError("prompt must contain at least one token")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")

    def abort(self, request_id: str | None = None) -> None:
        """End one request (None: every request) at the next step, finish reason "cancelled"."""
        self.scheduler.abort(request_id)

    # ---- sessions ---------------------------------------------------------
    def snapshot(self, session_id: str) -> SessionSnapshot:
        return self._session(session_id).snapshot().model_copy(update={"model": self.config.model})

    def restore(self, req: Request, snap: SessionSnapshot) -> None:
        """Rebuild from a snapshot, re-split to this engine's S and W (session.resplit) or refused."""
        if snap.session_id != req.session_id:
            raise InvalidRequestError(f"snapshot is of session {snap.session_id!r}, not {req.session_id!r}")
        if snap.model and snap.model != self.config.model:
            raise InvalidRequestError(f"snapshot of {snap.session_id!r} holds token ids of model {snap.model!r}; "
                                      f"this engine serves {self.config.model!r}")
        self._check_ids(snap.sink_ids + snap.tail_ids, allow_empty=True)
        P = snap.pinned_tokens
        if P is not None and not self.config.sink_tokens <= P <= self.config.max_pinned_tokens:
            raise InvalidRequestError(f"snapshot of {snap.session_id!r} pins {P} tokens; this engine pins "
                                      f"{self.config.sink_tokens} to {self.config.max_pinned_tokens} (max_pinned_tokens)")
        session = Session.from_snapshot(snap, self.config.sink_tokens, self.config.window_tokens)
        self.drop(req.session_id)
        self.sessions[req.session_id] = session
        self.submit(req)

    def drop(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        if session.running:
            raise SessionBusyError(f"session {session_id!r} has a request running")
        self.cache.release(session.table)
        self.host.discard(session_id)
        del self.sessions[session_id]
        self.resident.pop(session_id, None)
        return True

    def with_pages(self) -> "OrderedDict[str, Session]":
        """The sessions holding pages or running, least recently used first (engine thread). Costs
        what they number, not what the sessions known do: those that lost their pages leave here."""
        gone = [sid for sid, s in self.resident.items()
                if not (s.running or s.table.pages) or self.sessions.get(sid) is not s]
        for sid in gone:
            del self.resident[sid]
        return self.resident

    def _session(self, session_id: str) -> Session:
        if session_id not in self.sessions:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return self.sessions[session_id]

    # ---- stepping ---------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def age_caches(self) -> None:
        """Idle sessions past idle_cache_ttl_s give their pages back (cheap: see CacheAgeing.age)."""
        self.ageing.age(self.with_pages(), self.scheduler, time.monotonic())
        if not self.has_work():  # idle: pages whose copy to the host tier finished are free now, not
            self.host.poll()     # at the next step (the router and metrics read the free count)

    def step(self) -> bool:
        """One engine step: schedule -> run the model -> postprocess (account, sample, emit). True if it
        made progress: ran a batch, ended a request or waited for host-tier copies (the watchdog's measure)."""
        finished = self.scheduler.finished
        batch = self._schedule()
        if batch:
            self._postprocess(batch, self._run(batch))
        elif self.host.busy():  # all that can run waits for host-tier copies: wait for them, not spin
            self.host.wait()
            return True
        return bool(batch) or self.scheduler.finished != finished

    def _schedule(self) -> list[tuple[Request, int]]:
        self.host.poll()
        for req in self.scheduler.take_aborted():
            self._complete(req, finish_reason="cancelled")
        for req in self.scheduler.admit(self.with_pages()):
            self._start(req)
        return self.scheduler.select()

    def _run(self, batch: list[tuple[Request, int]]) -> list[torch.Tensor]:
        chunks, plans, rows = [], [], []
        for req, n in batch:
            table = self.sessions[req.session_id].table
            chunks.append(req.feed[req.fed:req.fed + n])
            plans.append(self.cache.append(table, n))
            rows.append(self._logit_rows(req, n))
        return self.runner.run(chunks, plans, rows)

    def _postprocess(self, batch: list[tuple[Request, int]], logits: list[torch.Tensor]) -> None:
        ready = [(req, lg[-1:]) for (req, n), lg in zip(batch, logits) if self._advance(req, n, lg)]
        if ready:
            self._sample(ready)

    def _start(self, req: Request) -> None:
        session = self.sessions[req.session_id]
        replay = session.replay_prefix()
        if self.host.holds(session.id):  # copied back, not re-prefilled: it runs once its pages arrived
            self.host.reload(session.id, session.table)
        if session.needs_reprefill:
            self.cache.release(session.table)
            self.reprefills += 1
            if req.kind == "generate":  # evicted, rebuilt in this turn: timed until the replay is fed
                req.rebuild_from = time.perf_counter()
        if req.kind == "reprefill":  # the newest retained id stays pending, as before the loss
            replay = replay[:-1]
        feed_new = req.new_ids[:-1] if req.kind == "score" else req.new_ids
        req.feed, req.n_replay, req.phase = replay + feed_new, len(replay), "prefill"
        self._attach_pinned(session, req)
        if req.kind == "score" and not replay and req.new_ids:
            req.logprobs.append(None)  # first token of a fresh session has no context
        if req.remaining == 0:
            self._finish_feed(req)

    def _attach_pinned(self, session: Session, req: Request) -> None:
        """A session starting from an empty table whose pinned region is resident: point its table at
        the shared pages and feed only what follows (the region is not prefilled again)."""
        P = session.S
        if not session.pinned or req.kind == "score" or len(req.feed) <= P:
            return
        if not self.cache.pinned.attach(session.table, pinned_hash(self.config.model, req.feed[:P])):
            return
        for i in range(req.n_replay, P):
            session.see(req.feed[i])
        req.feed, req.n_replay = req.feed[P:], max(req.n_replay - P, 0)

    def _publish_pinned(self, session: Session) -> None:
        """Once a session's pinned region is prefilled, it becomes (or joins) the shared copy."""
        table = session.table
        if session.pinned and table.pinned_hash is None and table.sink_len == session.S:
            key = pinned_hash(self.config.model, session.sink_ids)
            self.cache.free.extend(self.cache.pinned.publish(table, key))

    def _logit_rows(self, req: Request, n: int) -> list[int]:
        if req.kind == "generate":
            return [n - 1] if req.fed + n == len(req.feed) else []
        if req.kind == "score":
            first = max(req.n_replay - 1, 0)  # row predicting the first scored token
            return [r for r in range(n) if req.fed + r >= first]
        return []

    def _advance(self, req: Request, n: int, logits: torch.Tensor) -> bool:
        """Account for n fed tokens; True when the request now needs a sampled token."""
        session = self.sessions[req.session_id]
        for i in range(req.fed, req.fed + n):
            if i >= req.n_replay:
                session.see(req.feed[i])
        req.fed += n
        if req.rebuild_from is not None and req.rebuild_s is None and req.fed >= req.n_replay:
            req.rebuild_s = time.perf_counter() - req.rebuild_from
        self.cache.evict(session.table)
        self._publish_pinned(session)
        session.pending, session.needs_reprefill = None, False
        if req.kind == "score":
            req.logprobs += self._scored_logprobs(req, logits, n)
        if req.remaining > 0:
            return False
        if req.kind == "generate":
            return True
        self._finish_feed(req)
        return False

    def _scored_logprobs(self, req: Request, logits: torch.Tensor, n: int) -> list[float]:
        start = max(req.n_replay - 1, 0)
        rows = [req.fed - n + r for r in range(n) if req.fed - n + r >= start]
        targets = [(req.feed + req.new_ids[-1:])[r + 1] for r in rows]
        lp = torch.log_softmax(logits, dim=-1)
        return lp[torch.arange(len(rows)), torch.tensor(targets, dtype=torch.long)].tolist()

    def _finish_feed(self, req: Request) -> None:
        """A score or re-prefill request has fed everything: complete it."""
        session = self.sessions[req.session_id]
        if req.kind == "score" and req.new_ids:
            session.see(req.new_ids[-1])
            session.pending = req.new_ids[-1]
        if req.kind == "reprefill":
            retained = session.retained()
            session.pending = retained[-1] if retained else None
            session.needs_reprefill = False
        self._complete(req, finish_reason="stop")

    def _sample(self, ready: list[tuple[Request, torch.Tensor]]) -> None:
        """One sampler pass (one device->host copy) for every request that needs a token."""
        reqs = [req for req, _ in ready]
        out = self.sampler.sample(torch.cat([lg for _, lg in ready]), reqs,
                                  context=lambda r: self.sessions[r.session_id].retained())
        for req, tok, lp, top in zip(reqs, out.ids, out.logprobs, out.top):
            self._take_token(req, tok, lp, top)

    def _take_token(self, req: Request, tok: int, lp: float, top: list[tuple[int, float]] | None) -> None:
        p, session = req.sampling, self.sessions[req.session_id]
        first = {"reprefill_s": req.rebuild_s} if not req.output_ids else {}  # on the turn's first token
        session.see(tok)
        session.pending = tok
        req.output_ids.append(tok)
        self.tokens_generated += 1
        is_eos = not p.ignore_eos and self.tokenizer is not None and tok in self.tokenizer.eos_token_ids
        delta = req.detok.push(tok) if req.detok and not is_eos else ""
        delta, hit_stop = req.stopper.feed(delta)
        req.text += delta
        if is_eos or tok in p.stop_token_ids or hit_stop:
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens:
            reason = "length"
        else:
            req.emit(req.event(token_id=tok, text=delta, logprob=lp, top_logprobs=top, **first))
            req.phase, req.feed, req.fed, req.n_replay = "decode", [tok], 0, 1
            return
        tail = "" if hit_stop else req.stopper.flush()
        req.text += tail
        session.open_turn = not is_eos
        self._complete(req, finish_reason=reason, token_id=tok, text=delta + tail, logprob=lp, top_logprobs=top,
                       **first)

    def _complete(self, req: Request, finish_reason: str, **kw) -> None:
        session = self.sessions[req.session_id]
        if req.kind == "generate" and finish_reason in ("stop", "length"):
            session.turns += 1
            if req.new_messages is not None:
                consumed = req.new_messages + [{"role": "assistant", "content": req.text}]
                session.messages_digest = chain_digest(session.messages_digest, consumed)
                session.messages_consumed += len(consumed)
        if finish_reason == "cancelled" and req.phase == "prefill" and self._cut_short(req, session):
            self.host.wait()  # its pages may still be arriving from the host tier
            self.cache.release(session.table)  # re-prefill the retained ids next time
            session.needs_reprefill = bool(session.retained())
        session.running = False
        session.last_used = time.monotonic()
        req.phase = "done"
        self.scheduler.finish(req, session)
        usage = Usage(prompt_tokens=len(req.new_ids), completion_tokens=len(req.output_ids))
        req.emit(req.event(finish_reason=finish_reason, usage=usage, logprobs=req.logprobs, **kw))

    @staticmethod
    def _cut_short(req: Request, session: Session) -> bool:
        """Whether a prefill cut off (cancelled) left a cache its session's next turn cannot continue: its
        replay unfinished, or ids fed whose last one's logits, which score the next id, were dropped
        (`pending` is gone: the next score's first log-prob came back None, as if there were no context)."""
        return req.fed < req.n_replay or (session.pending is None and session.tokens_seen > 0)

    def fail_all(self, message: str) -> None:
        """A step raised: end every request with an error; their sessions re-prefill from retained ids."""
        self.host.wait()
        for req in self.scheduler.take_all():
            session = self.sessions[req.session_id]
            self.cache.release(session.table)  # the failed step may have left pages half-written
            self.host.discard(session.id)  # one way back for all of them: the retained ids
            session.needs_reprefill = bool(session.retained())
            session.pending = None
            self._complete(req, finish_reason="error", text=message)
