"""Typed application arguments (the `args:` block of a Serve config)."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from routing.redis_connect import is_sentinel_url, parse_sentinel_url
from swift_engine import EngineConfig

from .sampling_defaults import SamplingDefaults

STORE_SCHEMES = ("embedded://", "redis://", "rediss://", "redis+sentinel://", "rediss+sentinel://")


class Limits(BaseModel):
    """Request limits enforced by each ingress replica (per replica: N replicas allow N times as much)."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: int = Field(8 * 2**20, ge=1024, description="larger request bodies get 413")
    max_messages: int = Field(8192, ge=1, description="more messages in one chat request get 400")
    max_concurrent_requests: int = Field(128, ge=1, description="requests in flight per tenant, every route "
                                                                "(streams until their last byte); more get 429")
    body_timeout_s: float = Field(10.0, gt=0, description="a body not fully received this long after the "
                                                          "headers gets 408")
    max_sessions_per_tenant: int | None = Field(None, ge=1, description="live sessions (stored records) per "
                                                                        "tenant, deployment-wide (kept in the "
                                                                        "store); a new one past it gets 429")
    rate_limit_per_s: float | None = Field(100.0, gt=0, description="per-tenant token bucket refill, "
                                                                     "requests/s; None: no rate limit")
    rate_limit_burst: int = Field(200, ge=1, description="per-tenant token bucket size (requests)")


class AppArgs(BaseModel):
    # errors never echo values: store_url may hold a password
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

    model_id: str = Field("swiftserve-tiny", min_length=1, description="name served on /v1/models")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    store_url: str = Field("embedded://", description="embedded://, redis://host:port/db, rediss://..., or "
                           "redis+sentinel://host1:26379,host2:26379/<service>/<db> (rediss+sentinel:// for TLS): "
                           "the primary Sentinel names for <service>, followed across failovers")
    store_password_env: str | None = Field(None, description="env var holding the Redis password")
    store_key_prefix: str = "swiftserve"
    session_ttl_s: int = Field(7 * 24 * 3600, ge=0)
    commit_timeout_s: float = Field(5.0, gt=0, description="commit retries stop after this long")
    min_replicas_acked: int = Field(0, ge=0, le=16, description=(
        "a commit counts as durable only once this many Redis replicas have it (WAIT): a WAIT that times out "
        "is handled like an unreachable store (strict: the turn fails; relaxed: not yet durable, written "
        "through later); 0: once the primary has it"))
    replica_ack_timeout_s: float = Field(0.5, gt=0, le=10, description="how long a commit's WAIT for "
                                                                       "min_replicas_acked replicas lasts")
    durability: Literal["strict", "relaxed"] = Field(
        "strict", description="store unreachable at commit: strict fails the turn; relaxed acknowledges it as "
                              "not yet durable and writes it through when the store is back")
    max_completion_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    stream_batching_interval_ms: float = Field(50.0, ge=0, le=1000, description=(
        "LLMServer merges a turn's tokens arriving within this interval into one message to the ingress "
        "(and one SSE chunk); the first token is never delayed; 0: merge only what is already waiting"))
    api_keys_env: str | None = Field(None, min_length=1, description="env var holding API keys "
                                                                     "(`tenant:key` entries, see deployments/auth.py)")
    api_keys_file: str | None = Field(None, min_length=1, description="file holding API keys, same format; "
                                                                      "neither set: no authentication")
    limits: Limits = Field(default_factory=Limits)
    generation_config: Literal["auto", "vllm"] = Field(
        "auto", description="auto: the model's generation_config.json gives the sampling defaults of requests that "
                            "leave a field out (as vLLM's --generation-config auto); vllm: OpenAI's defaults only")
    sampling_defaults: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="sampling defaults over the model's (each field set wins)")
    request_timeout_s: float | None = Field(
        None, gt=0, description="the proxy's http_options.request_timeout_s (swiftserve serve copies it): a prompt "
                                "whose prefill at the replica's measured rate would take longer is refused with a "
                                "400 up front; None: never refused")
    pin: Literal["none", "system"] = Field(
        "system", description="chat requests that do not say: a new session pins BOS + its system prompt "
                              "(never evicted, shared by sessions with the same prompt), or nothing beyond the sinks")

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(STORE_SCHEMES):
            raise ValueError(f"store_url must start with {', '.join(STORE_SCHEMES[:-1])} or {STORE_SCHEMES[-1]}, "
                             f"not scheme {urlsplit(v).scheme!r}")
        if is_sentinel_url(v):
            parse_sentinel_url(v)  # its ValueError names the part that is wrong, never the password
        return v

    @field_validator("min_replicas_acked")
    @classmethod
    def _replicas_need_redis(cls, v: int, info: ValidationInfo) -> int:
        if v and str(info.data.get("store_url", "")).startswith("embedded://"):
            raise ValueError("needs a Redis store_url (the embedded store has no replicas)")
        return v
