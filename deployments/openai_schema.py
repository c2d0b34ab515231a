"""OpenAI request bodies we accept (a compatible subset plus vLLM's `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos` and our `session_id`), and errors. Known OpenAI fields we do not implement are a 400 naming the
field; unknown fields are ignored, as vLLM does."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, ValidationInfo

from swift_engine import SamplingParams

from .field_errors import unsupported

SAMPLING_EPS = 1e-5  # as vLLM: a lower temperature is greedy, a lower top_p keeps the top token only
SESSION_ID_MAX = 200  # leaves room for the tenant prefix within the store's 256 characters
SESSION_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # no control characters


def _utf8(text: str) -> str:
    text.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"): a 400, not a failure further in
    return text


Text = Annotated[str, AfterValidator(_utf8)]
SessionId = Annotated[str, StringConstraints(min_length=1, max_length=SESSION_ID_MAX, pattern=SESSION_ID_PATTERN),
                      AfterValidator(_utf8)]


def _unsupported(*neutral) -> Any:
    """A known OpenAI field this server does not implement: a 400 naming it, unless it asks for nothing."""
    def reject(v):
        if v not in neutral:
            raise unsupported()
        return v
    return Annotated[Any, AfterValidator(reject)]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # like vLLM: unknown OpenAI fields are ignored

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # None: the served default (sampling_defaults.py: the config's, the model's, or OpenAI's)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    ignore_eos: bool = False
    response_format: _unsupported(None, {"type": "text"}) = None
    session_id: SessionId | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def sampling(self, defaults: dict) -> SamplingParams:
        """The request's sampling: its own fields, else `defaults` (sampling_defaults.merged_defaults)."""
        own = {f: getattr(self, f) for f in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        s = {**defaults, **{f: v for f, v in own.items() if v is not None}}
        # tiny values would overflow float32 in the sampler and fail the replica's whole batch
        return SamplingParams(max_tokens=self.max_completion_tokens or self.max_tokens or defaults["max_tokens"],
                              temperature=s["temperature"] if s["temperature"] >= SAMPLING_EPS else 0.0,
                              top_p=max(s["top_p"], SAMPLING_EPS), top_k=s["top_k"], min_p=s["min_p"],
                              seed=self.seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=s["repetition_penalty"],
                              logit_bias=self.logit_bias or {}, top_logprobs=self.top_alternatives,
                              stop=self.stop or [], ignore_eos=self.ignore_eos)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    pin: Literal["none", "system"] | None = None  # ours: a new session pins its system prompt; None: served default
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: _unsupported(None, []) = None
    tool_choice: _unsupported(None, "none") = None
    functions: _unsupported(None, []) = None
    function_call: _unsupported(None, "none") = None
    audio: _unsupported(None) = None
    modalities: _unsupported(None, ["text"]) = None
    prediction: _unsupported(None) = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return v

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    @property
    def top_alternatives(self) -> int:
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields):
    prompt: Text = Field(min_length=1)
    pinned_tokens: int = Field(0, ge=0)  # ours: a new session pins its prompt's first this many tokens
    # OpenAI's completions take an integer here: how many top alternatives to return per token (0-5)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: _unsupported(None, False) = None
    suffix: _unsupported(None, "") = None
    best_of: _unsupported(None, 1) = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def top_alternatives(self) -> int:
        return self.logprobs or 0


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


_ERRORS = {400: "invalid request", 401: "missing or unknown API key", 404: "unknown model or session",
           409: "history does not extend the session, or the session is running a turn",
           413: "request body too large", 429: "rate or concurrency limit reached (see Retry-After)",
           503: "no replica or store could serve the request"}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for the errors a route gives (the gate's 400, 401, 413 and 429 always)."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in sorted({400, 401, 413, 429, *statuses})}
