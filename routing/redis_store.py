"""RedisSessionStore: the conversation store on Redis; claims and commits are Lua scripts."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping

from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from routing.redis_connect import connect, describe, without_password
from routing.store import (
    DEFAULT_PREFIX,
    DEFAULT_TTL_S,
    MAX_EPOCH,
    Claim,
    CorruptRecordError,
    ReplicationTimeoutError,
    SessionRecord,
    SessionStore,
    StaleEpochError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
    check_owner,
    check_prefix,
    check_ttl,
    group_key,
    record_key,
    stamp,
)

# --- record encoding --------------------------------------------------------------
# A record is a Redis hash of three fields. epoch and owner stand alone so Lua can
# fence on them without parsing JSON; body is the JSON of every other field.

RECORD_FIELDS = frozenset({"epoch", "owner", "body"})
_EPOCH_TEXT = re.compile(r"0|[1-9][0-9]{0,18}")  # canonical, as HINCRBY writes it


def encode_record(record: SessionRecord) -> dict[str, str]:
    """Hash fields for ``record``."""
    body = record.model_dump(exclude={"epoch", "owner"})
    return {
        "epoch": str(record.epoch),
        "owner": record.owner,
        "body": json.dumps(body, separators=(",", ":"), allow_nan=False),
    }


def decode_record(session_id: str, fields: Mapping[bytes | str, bytes | str]) -> SessionRecord:
    """Validate hash fields read from the store; anything malformed raises CorruptRecordError."""

    def corrupt(reason: str) -> CorruptRecordError:
        return CorruptRecordError(f"corrupt session record for {session_id!r}: {reason}")

    try:
        text = {_text(k): _text(v) for k, v in fields.items()}
    except UnicodeDecodeError:
        raise corrupt("a field is not UTF-8 text") from None
    if set(text) != RECORD_FIELDS:
        raise corrupt(f"expected fields {sorted(RECORD_FIELDS)}, found {sorted(text)[:8]}")
    if not _EPOCH_TEXT.fullmatch(text["epoch"]):
        raise corrupt("epoch is not a non-negative integer")
    try:
        body = json.loads(text["body"])
    except (ValueError, RecursionError):  # JSONDecodeError, huge ints, deep nesting
        raise corrupt("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise corrupt(f"body is a JSON {type(body).__name__}, not an object")
    if body.keys() & {"epoch", "owner"}:
        raise corrupt("body repeats epoch/owner")
    try:
        record = SessionRecord.model_validate(
            {**body, "epoch": int(text["epoch"]), "owner": text["owner"]}, strict=True
        )
    except ValidationError as err:
        raise corrupt(_summary(err)) from None
    if record.session_id != session_id:
        raise corrupt(f"it names session {record.session_id!r}")
    return record


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _summary(err: ValidationError) -> str:
    """Field paths and reasons, without echoing the (possibly huge) input."""
    errors = err.errors(include_input=False, include_url=False, include_context=False)
    parts = [f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in errors[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


# check(key) returns the key's kind ('none' or 'hash') and the stored epoch, or
# raises a CORRUPT/WRONGTYPE error reply, so both scripts refuse foreign data
# before writing anything. Epochs are canonical decimals <= MAX_EPOCH; digit
# strings of equal length compare like the numbers.
_CHECK = """
local MAX_EPOCH = '@MAX_EPOCH@'
local function check(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return kind, nil end
  if kind ~= 'hash' then
    error({err = 'WRONGTYPE key holds a ' .. kind .. ', not a session record'})
  end
  local epoch = redis.call('HGET', key, 'epoch')
  if redis.call('HLEN', key) ~= 3 or not epoch
      or not (epoch == '0' or string.match(epoch, '^[1-9]%d*$'))
      or #epoch > #MAX_EPOCH or (#epoch == #MAX_EPOCH and epoch > MAX_EPOCH)
      or redis.call('HEXISTS', key, 'owner') == 0
      or redis.call('HEXISTS', key, 'body') == 0 then
    error({err = 'CORRUPT session record hash lacks a valid epoch, owner or body'})
  end
  return kind, epoch
end
local function set_ttl(key, ttl_ms)
  if tonumber(ttl_ms) > 0 then redis.call('PEXPIRE', key, ttl_ms)
  else redis.call('PERSIST', key) end
end
""".replace("@MAX_EPOCH@", str(MAX_EPOCH))

# KEYS[1] record key. ARGV: owner, body of an empty record (used if new), ttl ms.
# Returns {new epoch, previous hash as a flat list (empty if new)}.
_CLAIM = (
    _CHECK
    + """
local key = KEYS[1]
local kind, held = check(key)
if held == MAX_EPOCH then error({err = 'CORRUPT epoch is at its maximum'}) end
local previous = {}
if kind == 'hash' then previous = redis.call('HGETALL', key) end
local epoch = redis.call('HINCRBY', key, 'epoch', 1)
if kind == 'none' then redis.call('HSET', key, 'body', ARGV[2]) end
redis.call('HSET', key, 'owner', ARGV[1])
set_ttl(key, ARGV[3])
return {epoch, previous}
"""
)

# KEYS[1] record key. ARGV: epoch, owner, body, ttl ms.
# Returns {1} if written, {0} if there is no record, {0, epoch, owner} if fenced.
_COMMIT = (
    _CHECK
    + """
local key = KEYS[1]
if check(key) == 'none' then return {0} end
local held = redis.call('HMGET', key, 'epoch', 'owner')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return {0, held[1], held[2]} end
redis.call('HSET', key, 'body', ARGV[3])
set_ttl(key, ARGV[4])
return {1}
"""
)

# KEYS[1] group key (a sorted set: session id -> expiry ms). ARGV: session id, limit, now ms, expiry ms
# ('+inf' without TTL), ttl ms. Returns 1 if counted, 0 if the group is full.
_ADMIT = """
local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[3])
if not redis.call('ZSCORE', key, ARGV[1]) and redis.call('ZCARD', key) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', key, ARGV[4], ARGV[1])
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', key, ARGV[5]) else redis.call('PERSIST', key) end
return 1
"""

_CORRUPT_CODES = ("WRONGTYPE", "CORRUPT")


class RedisSessionStore(SessionStore):
    """Session records in Redis (standalone or behind Sentinel; keys are Cluster-slot safe).

    ``url``: ``redis://[user:password@]host:port/db``, ``rediss://`` for TLS, or
    ``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>``
    (``rediss+sentinel://``) to follow the primary Sentinel names (routing/redis_connect.py).
    ``password`` overrides any password in the URL (k8s passes it from a Secret).
    ``min_replicas_acked``: a commit, and a claim (its previous record may hold a commit
    whose WAIT failed, and a retried turn may be answered from it), returns only once
    that many replicas have it (``WAIT``), else raises ReplicationTimeoutError after
    ``replica_ack_timeout_s``; 0 returns once the primary has it.
    A claim over a record whose JSON body is corrupt still takes effect (epoch
    and owner are valid) and then raises CorruptRecordError: ``delete`` it to
    start the session over.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        password: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: float | None = DEFAULT_TTL_S,
        timeout_s: float = 2.0,
        min_replicas_acked: int = 0,
        replica_ack_timeout_s: float = 0.5,
    ) -> None:
        self._prefix = check_prefix(prefix)
        ttl = check_ttl(ttl_s)
        self._ttl_ms = max(1, math.ceil(ttl * 1000)) if ttl else 0
        if min_replicas_acked < 0 or not replica_ack_timeout_s > 0:
            raise ValueError("min_replicas_acked must be >= 0 and replica_ack_timeout_s > 0")
        self._acks = min_replicas_acked
        self._ack_timeout_ms = max(1, math.ceil(replica_ack_timeout_s * 1000))
        if password is not None:
            url = without_password(url)
        self._where = describe(url)
        self._redis, self._sentinel = connect(
            url,
            password,
            # a WAIT blocks its connection for up to its timeout: the socket waits that long too
            socket_timeout=timeout_s + (replica_ack_timeout_s if min_replicas_acked else 0),
            socket_connect_timeout=timeout_s,
            # One immediate retry re-dials a pooled connection broken by a server
            # restart or failover; longer outages surface as StoreUnavailableError
            # for the caller's backoff (redis-py's default would block for seconds).
            retry=Retry(NoBackoff(), 1),
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._commit = self._redis.register_script(_COMMIT)
        self._admit = self._redis.register_script(_ADMIT)

    def __repr__(self) -> str:
        return f"RedisSessionStore({self._where!r}, prefix={self._prefix!r})"

    async def get(self, session_id: str) -> SessionRecord | None:
        key = record_key(self._prefix, session_id)
        with self._errors(session_id):
            fields = await self._redis.hgetall(key)
        return decode_record(session_id, fields) if fields else None

    async def claim(self, session_id: str, owner: str) -> Claim:
        key = record_key(self._prefix, session_id)
        fresh = SessionRecord.empty(session_id, check_owner(owner), 1, time.time())
        with self._errors(session_id):
            (epoch, flat), acked = await self._run_and_wait(
                self._claim, key, [owner, encode_record(fresh)["body"], self._ttl_ms])
        # The previous record may hold a commit that never reached the replicas (its turn failed); the
        # caller may answer a retry of that turn from it, so it must be as durable as a commit.
        self._check_acked(acked, session_id, "claim")
        previous = decode_record(session_id, dict(zip(flat[::2], flat[1::2]))) if flat else None
        base = fresh if previous is None else previous
        return Claim(epoch, previous, base.model_copy(update={"epoch": epoch, "owner": owner}))

    async def commit(self, record: SessionRecord) -> None:
        key = record_key(self._prefix, record.session_id)
        fields = encode_record(stamp(record, time.time()))
        args = [fields["epoch"], fields["owner"], fields["body"], self._ttl_ms]
        with self._errors(record.session_id):
            reply, acked = await self._run_and_wait(self._commit, key, args)
        if reply[0] != 1:
            stored_epoch, stored_owner = (None, None) if len(reply) == 1 else (reply[1], reply[2])
            raise StaleEpochError(
                record.session_id,
                record.epoch,
                record.owner,
                None if stored_epoch is None else int(stored_epoch),  # the script checked it
                None if stored_owner is None else stored_owner.decode("utf-8", "replace"),
            )
        self._check_acked(acked, record.session_id, "commit")

    async def _run_and_wait(self, script, key: str, args: list[object]) -> tuple[list, int]:
        """Run a write script, then WAIT on the same connection (WAIT counts the replicas that have this
        connection's writes, and every write before them), in one round trip. (script reply, replicas acked)."""
        if not self._acks:
            return await script(keys=[key], args=args), 0
        async with self._redis.pipeline(transaction=False) as pipe:
            await script(keys=[key], args=args, client=pipe)
            pipe.wait(self._acks, self._ack_timeout_ms)
            reply, acked = await pipe.execute()
        return reply, acked

    def _check_acked(self, acked: int, session_id: str, what: str) -> None:
        if acked < self._acks:
            raise ReplicationTimeoutError(
                f"session {session_id!r}: the {what} reached {acked} of the {self._acks} replicas required "
                f"within {self._ack_timeout_ms} ms (redis at {self._where}); it may be lost if the primary "
                "fails now"
            )

    async def delete(self, session_id: str) -> bool:
        key = record_key(self._prefix, session_id)
        with self._errors():
            return bool(await self._redis.delete(key))

    async def close(self) -> None:
        await self._redis.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def admit(self, group: str, session_id: str, limit: int) -> bool:
        now_ms = int(time.time() * 1000)
        expiry = now_ms + self._ttl_ms if self._ttl_ms else "+inf"
        with self._errors(session_id):
            return bool(await self._admit(keys=[group_key(self._prefix, group)],
                                          args=[session_id, limit, now_ms, expiry, self._ttl_ms]))

    async def release(self, group: str, session_id: str) -> None:
        with self._errors(session_id):
            await self._redis.zrem(group_key(self._prefix, group), session_id)

    @contextlib.contextmanager
    def _errors(self, session_id: str | None = None) -> Iterator[None]:
        """Map redis-py exceptions onto the store's typed errors."""
        try:
            yield
        # Auth errors subclass ConnectionError in redis-py, so they come first.
        except (AuthenticationError, AuthorizationError, NoPermissionError) as err:
            raise StoreAuthError(
                f"redis at {self._where} rejected our credentials ({type(err).__name__}); "
                "check the user and password"
            ) from err
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError) as err:
            raise StoreUnavailableError(f"redis at {self._where} is unavailable: {err}") from err
        except ResponseError as err:
            message = _script_message(str(err))
            if message.startswith(_CORRUPT_CODES):
                raise CorruptRecordError(f"session {session_id!r}: {message}") from err
            raise StoreError(f"redis at {self._where} refused the command: {message}") from err
        except RedisError as err:
            raise StoreError(f"redis at {self._where} failed: {err}") from err


def _script_message(message: str) -> str:
    """Drop the ' script: <sha>, on @user_script...' suffix Redis appends to script errors."""
    return re.split(r"\s+script: ", message, maxsplit=1)[0]
