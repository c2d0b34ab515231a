"""A request's progress through the engine: generate, score, or re-prefill (of retained ids)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from ..outputs import GenerationEvent
from ..sampling import LogitState, SamplingParams
from ..tokenizer import IncrementalDetokenizer, StopStringMatcher

Kind = Literal["generate", "score", "reprefill"]


@dataclass
class Request:
    id: str
    session_id: str
    kind: Kind
    new_ids: list[int]                       # ids this request adds to the session
    emit: Callable[[GenerationEvent], None]
    sampling: SamplingParams | None = None
    new_messages: list[dict] | None = None   # consumed when the turn completes
    pin: Literal["none", "system"] = "none"  # a new session's messages: pin BOS + its system prompt
    pinned_tokens: int = 0                   # a new session's prompt ids: pin the first this many
    require_session: bool = False            # refuse (UnknownSessionError) rather than start the session new
    # progress
    feed: list[int] = field(default_factory=list)  # ids to compute: replay prefix + new ids
    n_replay: int = 0                        # leading ids of feed the session has already seen
    fed: int = 0
    phase: Literal["waiting", "prefill", "decode", "done"] = "waiting"
    aborted: bool = False
    rebuild_from: float | None = None        # generate after eviction: when the replay of retained ids began
    rebuild_s: float | None = None           # ... and how long until it was fed
    # generate
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    detok: IncrementalDetokenizer | None = None
    stopper: StopStringMatcher | None = None
    seed: int = 0                            # the sampler's noise key (drawn when sampling has no seed)
    logit_state: LogitState | None = None    # the sampler's bias/penalty tensors
    # score
    logprobs: list[float | None] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.feed) - self.fed

    def event(self, **kw) -> GenerationEvent:
        return GenerationEvent(request_id=self.id, session_id=self.session_id, **kw)
