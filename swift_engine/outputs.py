"""What the engine hands back: streamed events and session snapshots."""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationEvent:
    """One streamed step of a request. The last event has `finish_reason` and `usage`."""

    request_id: str
    session_id: str
    token_id: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-prob), most likely first, when asked
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" (text says why)
    usage: Usage | None = None
    # first token of a turn whose session's cache was evicted: seconds it took to rebuild it (re-prefill)
    reprefill_s: float | None = None
    # score requests: log-probability of each scored token (None where no context)
    logprobs: list[float | None] = field(default_factory=list)


class SessionSnapshot(BaseModel):
    """Enough of a session to rebuild its cache anywhere: at most S + W token ids."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    sink_ids: list[int] = Field(default_factory=list)
    tail_ids: list[int] = Field(default_factory=list, description="last W token ids seen")
    tokens_seen: int = 0
    turns: int = 0
    messages_consumed: int = 0
    messages_digest: str = ""
    open_turn: bool = False  # last turn ended without its end-of-turn token
    pinned_tokens: int | None = Field(None, ge=1, description="P: sink_ids are a pinned region of P ids "
                                      "(None: the engine's S sinks)")
    model: str = Field("", description="the engine's model (EngineConfig.model); '' when unknown")
