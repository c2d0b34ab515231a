"""Conversation store API: the session record, the store contract, errors, key layout.

A record holds enough of a conversation for any replica to rebuild its
StreamingLLM cache (sink ids + last W ids) plus ownership (owner, epoch).
Ownership is fenced: ``claim`` bumps the epoch, and ``commit`` lands only if
the stored (epoch, owner) still equals the record's, so a stale owner can
never overwrite a newer one.
"""

from __future__ import annotations

import abc
import asyncio
import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PREFIX = "swiftserve"
DEFAULT_TTL_S = 7 * 24 * 3600.0
MAX_SESSION_ID_LEN = 256
MAX_EPOCH = 2**63 - 1  # Redis HINCRBY works on signed 64-bit integers


class StoreError(Exception):
    """Base class for every error the conversation store raises on purpose."""


class StaleEpochError(StoreError):
    """A commit was refused: the stored epoch/owner is not the writer's (it was fenced off)."""

    def __init__(
        self,
        session_id: str,
        attempted_epoch: int,
        attempted_owner: str,
        stored_epoch: int | None,
        stored_owner: str | None,
    ) -> None:
        self.session_id = session_id
        self.attempted_epoch = attempted_epoch
        self.attempted_owner = attempted_owner
        self.stored_epoch = stored_epoch
        self.stored_owner = stored_owner
        held = (
            "no record"
            if stored_epoch is None
            else f"epoch {stored_epoch} owned by {stored_owner!r}"
        )
        super().__init__(
            f"session {session_id!r}: commit at epoch {attempted_epoch} by "
            f"{attempted_owner!r} refused; the store holds {held}"
        )

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Pickle by fields (Ray ships errors between processes); the default uses args.
        return (
            type(self),
            (
                self.session_id,
                self.attempted_epoch,
                self.attempted_owner,
                self.stored_epoch,
                self.stored_owner,
            ),
        )


class CorruptRecordError(StoreError):
    """Data under a session's key is not a valid record (malformed, foreign, wrong type)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (refused, timed out, failing over); retry with backoff."""


class ReplicationTimeoutError(StoreUnavailableError):
    """A commit reached the primary but not the replicas it must reach (WAIT timed out): not durable yet.

    Handled like an unreachable store (retried; then a failed turn, or under relaxed durability a pending
    one): a failover now could lose it. Repeating the commit is safe."""


class QuotaExceededError(StoreError):
    """A new session was refused: its group (tenant) has as many live sessions as it may."""


class StoreAuthError(StoreError):
    """The store rejected our credentials. Not retryable; the message never holds secrets."""


class InvalidSessionIdError(StoreError, ValueError):
    """The session id is empty, too long, or not encodable as UTF-8."""


def check_session_id(session_id: str) -> str:
    """Return ``session_id`` if it can be stored, else raise InvalidSessionIdError."""
    if not isinstance(session_id, str) or not session_id:
        raise InvalidSessionIdError("session id must be a non-empty string")
    if len(session_id) > MAX_SESSION_ID_LEN:
        raise InvalidSessionIdError(
            f"session id is {len(session_id)} characters; the limit is {MAX_SESSION_ID_LEN}"
        )
    try:
        return _check_utf8(session_id)
    except UnicodeEncodeError:
        raise InvalidSessionIdError("session id is not encodable as UTF-8") from None


def _check_utf8(value: str) -> str:
    value.encode("utf-8")  # UnicodeEncodeError is a ValueError: pydantic reports it
    return value


TokenId = Annotated[int, Field(ge=0)]


class SessionRecord(BaseModel):
    """What the store keeps per session. Immutable: derive new ones with ``model_copy(update=...)``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    session_id: str
    owner: str = Field(min_length=1, max_length=256)
    epoch: int = Field(ge=0, le=MAX_EPOCH)
    sink_ids: list[TokenId]
    tail_ids: list[TokenId]
    tokens_seen: int = Field(ge=0)
    turns: int = Field(ge=0)
    messages_consumed: int = Field(ge=0)
    messages_digest: str
    open_turn: bool = False
    model: str = ""  # the engine's model when committed (SessionSnapshot.model); "" in older records
    pinned_tokens: int | None = Field(None, ge=1)  # sink_ids are a pinned region of this many ids (a rebuild
    # pins them again, so the layout and the shared pages are the same); None: the engine's S sinks
    # The last committed turn, so a client retrying a turn whose reply it never saw gets that reply
    # back instead of a history conflict (the replica may die between commit and acknowledge).
    last_request_digest: str = ""
    last_reply: str = ""
    last_finish_reason: str = ""
    last_prompt_tokens: int = Field(0, ge=0)
    last_completion_tokens: int = Field(0, ge=0)
    created_at: float
    updated_at: float

    @field_validator("session_id")
    @classmethod
    def _valid_session_id(cls, value: str) -> str:
        return check_session_id(value)

    @field_validator("owner", "messages_digest", "model", "last_request_digest", "last_reply", "last_finish_reason")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return _check_utf8(value)

    @classmethod
    def empty(cls, session_id: str, owner: str, epoch: int, now: float) -> SessionRecord:
        """The record a claim creates for a session the store has never seen (digest "")."""
        return cls(
            session_id=session_id,
            owner=owner,
            epoch=epoch,
            sink_ids=[],
            tail_ids=[],
            tokens_seen=0,
            turns=0,
            messages_consumed=0,
            messages_digest="",
            created_at=now,
            updated_at=now,
        )


def stamp(record: SessionRecord, now: float) -> SessionRecord:
    """``record`` with ``updated_at = now``, re-validated (``model_copy(update=...)`` skips validation)."""
    return SessionRecord.model_validate({**record.model_dump(), "updated_at": now})


def check_ttl(ttl_s: float | None) -> float:
    """Normalise a TTL in seconds: None or 0 means no expiry (returned as 0.0)."""
    if ttl_s is None:
        return 0.0
    if not 0 <= ttl_s < math.inf:
        raise ValueError(f"ttl_s must be a finite number >= 0, or None; got {ttl_s}")
    return float(ttl_s)


def check_owner(owner: str) -> str:
    """Return ``owner`` if it is a valid replica id, else raise ValueError."""
    if not isinstance(owner, str) or not 1 <= len(owner) <= 256:
        raise ValueError("owner must be a string of 1 to 256 characters")
    return _check_utf8(owner)


@dataclass(frozen=True)
class Claim:
    """Result of ``SessionStore.claim``."""

    epoch: int
    previous: SessionRecord | None  # the record before the claim; None for a new session
    record: SessionRecord  # the record as stored after the claim (new epoch and owner)


# --- key layout -----------------------------------------------------------------
# Session ids are caller strings, so braces are escaped (not rejected): '%' -> %25,
# '{' -> %7B, '}' -> %7D. Escaping '%' too keeps the mapping injective (no two ids
# share a key), and with no braces left the hash tag is exactly the escaped id.

_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if usable in keys: non-empty and brace-free (a brace would move the hash tag)."""
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"key prefix must be non-empty and contain no braces, got {prefix!r}")
    return prefix


def record_key(prefix: str, session_id: str) -> str:
    """``{prefix}:{<escaped session id>}:rec``; every key of a session carries the same hash tag."""
    escaped = check_session_id(session_id).translate(_ESCAPES)
    return f"{check_prefix(prefix)}:{{{escaped}}}:rec"


def group_key(prefix: str, group: str) -> str:
    """``{prefix}:{<escaped group>}:sessions``: the live sessions of a group (a tenant), for its quota."""
    return f"{check_prefix(prefix)}:{{{group.translate(_ESCAPES)}}}:sessions"


# --- the contract -----------------------------------------------------------------


class SessionStore(abc.ABC):
    """Async conversation store. Every write (claim, commit) resets the key's TTL."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None:
        """The stored record, or None if there is none (never stored, deleted or expired)."""

    @abc.abstractmethod
    async def claim(self, session_id: str, owner: str) -> Claim:
        """Atomically take ownership: epoch := stored epoch + 1 (1 if new), owner := ``owner``.

        Concurrent claims get distinct epochs; the last one wins. A new session
        is stored as ``SessionRecord.empty``; an existing one keeps its content.
        """

    @abc.abstractmethod
    async def commit(self, record: SessionRecord) -> None:
        """Store ``record`` iff the stored epoch and owner equal the record's.

        Otherwise raise StaleEpochError and write nothing. The store sets
        ``updated_at``. Safe to repeat after an ambiguous failure.
        """

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Remove the session's record; True if there was one. The epoch goes too:
        the next claim starts again at 1."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store's data is untouched."""

    @abc.abstractmethod
    async def admit(self, group: str, session_id: str, limit: int) -> bool:
        """Count ``session_id`` as a live session of ``group`` until the TTL from now (a session counted
        already is refreshed); False, counting nothing, if ``group`` has ``limit`` other live sessions."""

    @abc.abstractmethod
    async def release(self, group: str, session_id: str) -> None:
        """Stop counting ``session_id`` in ``group`` (its session was deleted)."""


async def retry_commit(
    store: SessionStore,
    record: SessionRecord,
    attempts: int = 5,
    base_delay_s: float = 0.05,
    max_delay_s: float = 1.0,
) -> None:
    """Commit, retrying only StoreUnavailableError with bounded exponential backoff.

    StaleEpochError (and every other error) propagates at once: a fenced-off
    writer must drop its copy, not retry.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        try:
            await store.commit(record)
            return
        except StoreUnavailableError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(max_delay_s, base_delay_s * 2**attempt))
