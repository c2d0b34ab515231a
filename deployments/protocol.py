"""Typed messages between ingress (or any DeploymentHandle caller) and LLMServer."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from swift_engine.sampling import SamplingParams


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


class ErrorInfo(BaseModel):
    status: int
    type: str
    message: str
    code: str | None = None


class ChatChunk(BaseModel):
    """A streamed piece of a turn. The last one has finish_reason (or error) and usage."""

    replica_id: str
    session_id: str | None = None
    text: str = ""
    token_id: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ErrorInfo | None = None
    reprefill_s: float | None = None  # set on the first chunk when this turn rebuilt the cache


class SessionInfo(BaseModel):
    session_id: str
    tokens_seen: int
    turns: int
    owner: str
    epoch: int
    messages_consumed: int
    created_at: float
    updated_at: float
