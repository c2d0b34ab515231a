"""EmbeddedSessionStore: the local default store, needing no external service.

Records live in memory in one named Ray actor that every replica of the local
Ray cluster shares. Its methods run one at a time (a sync actor), which makes
each claim/commit atomic. The data lives as long as the actor: this store is
for local runs, not for surviving a cluster restart (use Redis for that).
"""

from __future__ import annotations

import asyncio
import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from routing.store import (
    DEFAULT_PREFIX,
    DEFAULT_TTL_S,
    MAX_EPOCH,
    Claim,
    CorruptRecordError,
    SessionRecord,
    SessionStore,
    StaleEpochError,
    StoreError,
    StoreUnavailableError,
    check_owner,
    check_prefix,
    check_ttl,
    group_key,
    record_key,
    stamp,
)

ACTOR_NAME = "swiftserve-embedded-store"
ACTOR_NAMESPACE = "swiftserve"


class MemoryRecords:
    """The store's semantics on a dict: records by key, each with an expiry deadline.

    Not thread-safe; the actor serialises calls.
    """

    def __init__(self) -> None:
        self._records: dict[str, tuple[SessionRecord, float]] = {}  # key -> (record, deadline)
        self._groups: dict[str, dict[str, float]] = {}  # group key -> session id -> deadline (0: none)
        self._next_sweep = 0.0

    def get(self, key: str) -> SessionRecord | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] and entry[1] <= time.time():
            del self._records[key]
            return None
        return entry[0]

    def claim(self, key: str, session_id: str, owner: str, ttl_s: float) -> Claim:
        now = time.time()
        previous = self.get(key)
        if previous is not None and previous.epoch == MAX_EPOCH:
            raise CorruptRecordError(f"session {session_id!r}: epoch is at its maximum")
        epoch = 1 if previous is None else previous.epoch + 1
        base = SessionRecord.empty(session_id, owner, epoch, now) if previous is None else previous
        record = base.model_copy(update={"epoch": epoch, "owner": owner})
        self._put(key, record, ttl_s, now)
        return Claim(epoch, previous, record)

    def commit(self, key: str, record: SessionRecord, ttl_s: float) -> None:
        held = self.get(key)
        if held is None or (held.epoch, held.owner) != (record.epoch, record.owner):
            raise StaleEpochError(
                record.session_id,
                record.epoch,
                record.owner,
                None if held is None else held.epoch,
                None if held is None else held.owner,
            )
        now = time.time()
        self._put(key, stamp(record, now), ttl_s, now)

    def delete(self, key: str) -> bool:
        existed = self.get(key) is not None  # an expired record counts as gone
        self._records.pop(key, None)
        return existed

    def admit(self, key: str, session_id: str, limit: int, ttl_s: float) -> bool:
        now = time.time()
        live = {s: d for s, d in self._groups.get(key, {}).items() if not d or d > now}
        if session_id not in live and len(live) >= limit:
            return False
        live[session_id] = now + ttl_s if ttl_s else 0.0
        self._groups[key] = live
        return True

    def release(self, key: str, session_id: str) -> None:
        self._groups.get(key, {}).pop(session_id, None)

    def _put(self, key: str, record: SessionRecord, ttl_s: float, now: float) -> None:
        self._records[key] = (record, now + ttl_s if ttl_s else 0.0)
        if now >= self._next_sweep:  # drop expired records at most once a second
            self._next_sweep = now + 1.0
            self._records = {k: e for k, e in self._records.items() if not e[1] or e[1] > now}


@ray.remote(num_cpus=0)
class _StoreActor:
    """Holds one MemoryRecords; Ray runs its methods one at a time."""

    def __init__(self) -> None:
        self._records = MemoryRecords()

    def call(self, method: str, *args: object) -> object:
        return getattr(self._records, method)(*args)


class EmbeddedSessionStore(SessionStore):
    """Client of the shared store actor; creates the actor on first use if it is not running.

    ``detached=True`` keeps the actor alive when the replica that created it
    dies (other replicas still use it); it then lives until the Ray cluster
    stops. If the actor is lost, calls raise StoreUnavailableError and the next
    call starts a fresh, empty one.
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: float | None = DEFAULT_TTL_S,
        name: str = ACTOR_NAME,
        namespace: str = ACTOR_NAMESPACE,
        detached: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        self._prefix = check_prefix(prefix)
        self._ttl_s = check_ttl(ttl_s)
        self._name = name
        self._namespace = namespace
        self._detached = detached
        self._timeout_s = timeout_s
        self._actor: ray.actor.ActorHandle | None = None

    def __repr__(self) -> str:
        return f"EmbeddedSessionStore({self._namespace}/{self._name}, prefix={self._prefix!r})"

    async def get(self, session_id: str) -> SessionRecord | None:
        return await self._call("get", record_key(self._prefix, session_id))

    async def claim(self, session_id: str, owner: str) -> Claim:
        key = record_key(self._prefix, session_id)
        return await self._call("claim", key, session_id, check_owner(owner), self._ttl_s)

    async def commit(self, record: SessionRecord) -> None:
        key = record_key(self._prefix, record.session_id)
        await self._call("commit", key, record, self._ttl_s)

    async def delete(self, session_id: str) -> bool:
        return await self._call("delete", record_key(self._prefix, session_id))

    async def admit(self, group: str, session_id: str, limit: int) -> bool:
        return await self._call("admit", group_key(self._prefix, group), session_id, limit, self._ttl_s)

    async def release(self, group: str, session_id: str) -> None:
        await self._call("release", group_key(self._prefix, group), session_id)

    async def close(self) -> None:
        self._actor = None  # the actor is shared: closing a client must not stop it

    async def _call(self, method: str, *args: object) -> object:
        try:
            ref = self._handle().call.remote(method, *args)
            return await asyncio.wait_for(ref, self._timeout_s)
        except RayTaskError as err:
            if isinstance(err.cause, StoreError):
                raise err.cause from None  # the typed error, without Ray's wrapping
            raise
        except (RayActorError, TimeoutError) as err:
            self._actor = None  # resolve (or recreate) the actor on the next call
            raise StoreUnavailableError(
                f"embedded store actor {self._name!r} failed: {err}"
            ) from err

    def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = _StoreActor.options(
                name=self._name,
                namespace=self._namespace,
                get_if_exists=True,
                lifetime="detached" if self._detached else None,
            ).remote()
        return self._actor
