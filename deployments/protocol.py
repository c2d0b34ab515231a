"""Typed messages between ingress (or any DeploymentHandle caller) and LLMServer."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from swift_engine import SamplingParams


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    """One turn. `messages` is the full history (OpenAI style); or a raw `prompt` text."""

    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(None, description="None: a one-off conversation")
    messages: list[Message] | None = None
    prompt: str | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    pin: Literal["none", "system"] | None = Field(None, description="a new session pins BOS + its system prompt "
                                                                     "(system) or nothing; None: AppArgs.pin")
    pinned_tokens: int = Field(0, ge=0, description="a new session's prompt: pin its first this many tokens")
    pinned_key: str | None = Field(None, description="routing: content key of the system prompt to pin "
                                                      "(routing.affinity.pinned_key); None: nothing to prefer")
    logprobs: bool = Field(False, description="report each token's log-probability (and sampling.top_logprobs "
                                              "alternatives) in the chunks")
    turn_id: str | None = Field(None, description="the ingress's id of this turn; LLMServer.cancel_turn(turn_id) "
                                                   "stops it, or keeps it from starting if it arrives later")


class ErrorInfo(BaseModel):
    status: int
    type: str
    message: str


class TopLogprob(BaseModel):
    """One token with its log-probability, as OpenAI's logprobs report it."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChunk(BaseModel):
    """A streamed piece of a turn: one or more tokens (LLMServer coalesces them over a short interval).
    The last one has finish_reason (or error) and usage."""

    replica_id: str
    session_id: str | None = None
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ErrorInfo | None = None
    reprefill_s: float | None = None  # set on the first chunk when this turn rebuilt the cache
    reprefill_cause: str | None = None  # with it: why (deployments.metrics.REPREFILL_CAUSES)
    durable: bool = True  # on the final chunk: False if acknowledged before the store had it (durability: relaxed)


class SessionInfo(BaseModel):
    session_id: str
    tokens_seen: int
    turns: int
    owner: str
    epoch: int
    messages_consumed: int
    created_at: float
    updated_at: float
