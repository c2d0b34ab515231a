"""Typed application arguments (the `args:` block of a Serve config)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swift_engine.config import EngineConfig


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field("swiftserve-tiny", min_length=1, description="name served on /v1/models")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    store_url: str = Field("embedded://", description="embedded://, redis://host:port/db or rediss://...")
    store_password_env: str | None = Field(None, description="env var holding the Redis password")
    store_key_prefix: str = "swiftserve"
    session_ttl_s: int = Field(7 * 24 * 3600, ge=0)
    commit_timeout_s: float = Field(5.0, gt=0, description="commit retries stop after this long")
    max_completion_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask")

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(("embedded://", "redis://", "rediss://")):
            raise ValueError(f"store_url must start with embedded://, redis:// or rediss://, got {v!r}")
        return v
