"""Record encoding: round trips, and malformed or foreign data always gives CorruptRecordError."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.redis_store import RedisSessionStore, decode_record, encode_record
from routing.store import (
    MAX_EPOCH,
    CorruptRecordError,
    SessionRecord,
    record_key,
)
from tests.redis_server import RedisServer

relaxed = settings(deadline=None)  # a loaded CI machine must not turn slowness into failures

token_ids = st.lists(st.integers(0, 2**40), max_size=40)
counts = st.integers(0, 2**62)
times = st.floats(allow_nan=False, allow_infinity=False)
records = st.builds(
    SessionRecord,
    session_id=st.text(min_size=1, max_size=256),
    owner=st.text(min_size=1, max_size=256),
    epoch=st.integers(0, MAX_EPOCH),
    sink_ids=token_ids,
    tail_ids=token_ids,
    tokens_seen=counts,
    turns=counts,
    messages_consumed=counts,
    messages_digest=st.text(max_size=80),
    open_turn=st.booleans(),
    created_at=times,
    updated_at=times,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)

# Values that are wrong for each body field, whatever the rest of the record.
_BAD_IDS = ["1,2", [1.5], [-1], [True], ["1"], None, {"0": 1}, 3]
_BAD_COUNTS = [-1, 1.0, "1", True, None, [1]]
WRONG_VALUES = {
    "session_id": [1, None, [], ""],
    "sink_ids": _BAD_IDS,
    "tail_ids": _BAD_IDS,
    "tokens_seen": _BAD_COUNTS,
    "turns": _BAD_COUNTS,
    "messages_consumed": _BAD_COUNTS,
    "messages_digest": [1, None, ["x"]],
    "open_turn": [1, "true", None],
    "created_at": ["1.0", None, True, [1.0], float("nan"), float("inf")],
    "updated_at": ["1.0", None, False, float("-inf")],  # json.dumps writes NaN/Infinity
}


def as_redis(fields: dict[str, str]) -> dict[bytes, bytes]:
    """The shape HGETALL returns."""
    return {k.encode(): v.encode() for k, v in fields.items()}


def assert_corrupt(session_id: str, fields: dict) -> CorruptRecordError:
    with pytest.raises(CorruptRecordError) as caught:
        decode_record(session_id, fields)
    assert str(caught.value).startswith(f"corrupt session record for {session_id!r}: ")
    return caught.value


@relaxed
@given(records)
def test_round_trip(record: SessionRecord) -> None:
    assert decode_record(record.session_id, as_redis(encode_record(record))) == record
    assert decode_record(record.session_id, encode_record(record)) == record


@relaxed
@given(st.text(min_size=1, max_size=256), st.text(min_size=1, max_size=256))
def test_keys_are_injective_and_keep_one_hash_tag(a: str, b: str) -> None:
    key = record_key("p", a)
    tag = key[key.index("{") + 1 : key.index("}")]
    assert key == f"p:{{{tag}}}:rec"  # the tag is the whole escaped id, nothing leaks out
    assert (record_key("p", a) == record_key("p", b)) == (a == b)


@relaxed
@given(
    st.dictionaries(
        st.sampled_from([b"epoch", b"owner", b"body"]) | st.binary(max_size=8),
        st.binary(max_size=120) | json_values.map(lambda v: json.dumps(v).encode()),
        max_size=5,
    )
)
def test_arbitrary_fields_give_a_record_or_corrupt(fields: dict[bytes, bytes]) -> None:
    try:
        decode_record("s", fields)
    except CorruptRecordError:
        pass


@relaxed
@given(records, st.data())
def test_missing_or_extra_fields(record: SessionRecord, data: st.DataObject) -> None:
    fields = encode_record(record)
    if data.draw(st.booleans()):
        del fields[data.draw(st.sampled_from(sorted(fields)))]
    else:
        fields[data.draw(st.text(max_size=8).filter(lambda k: k not in fields))] = "1"
    assert "expected fields" in str(assert_corrupt(record.session_id, fields))


@relaxed
@given(records, json_values.filter(lambda v: not isinstance(v, dict) or "session_id" not in v))
def test_body_of_another_shape(record: SessionRecord, body: object) -> None:
    fields = {**encode_record(record), "body": json.dumps(body)}
    assert_corrupt(record.session_id, fields)


@relaxed
@given(records, st.data())
def test_wrong_typed_body_field(record: SessionRecord, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(WRONG_VALUES)))
    fields = encode_record(record)
    body = {**json.loads(fields["body"]), name: data.draw(st.sampled_from(WRONG_VALUES[name]))}
    error = assert_corrupt(record.session_id, {**fields, "body": json.dumps(body)})
    assert name in str(error)  # the message names the bad field


@relaxed
@given(records, st.text(max_size=12).filter(lambda k: k not in SessionRecord.model_fields))
def test_unknown_body_field(record: SessionRecord, name: str) -> None:
    fields = encode_record(record)
    body = {**json.loads(fields["body"]), name: 1}
    assert "Extra inputs" in str(
        assert_corrupt(record.session_id, {**fields, "body": json.dumps(body)})
    )


@relaxed
@given(records, st.sampled_from(["epoch", "owner"]))
def test_body_may_not_repeat_fenced_fields(record: SessionRecord, name: str) -> None:
    fields = encode_record(record)
    body = {**json.loads(fields["body"]), name: json.loads(json.dumps(getattr(record, name)))}
    assert_corrupt(record.session_id, {**fields, "body": json.dumps(body)})


@relaxed
@given(
    records,
    st.text().filter(lambda t: t != "0" and not (t.isascii() and t.isdigit() and t[0] != "0")),
)
def test_bad_epoch_text(record: SessionRecord, epoch: str) -> None:
    assert_corrupt(record.session_id, {**encode_record(record), "epoch": epoch})


@pytest.mark.parametrize(
    "epoch", ["-1", "01", "1.0", " 1", "1e3", "\u0663", str(MAX_EPOCH + 1), "9" * 30]
)
def test_bad_epoch_examples(epoch: str) -> None:
    record = SessionRecord.empty("s", "a", 1, 0.0)
    assert_corrupt("s", {**encode_record(record), "epoch": epoch})


@relaxed
@given(records, st.sampled_from(["epoch", "owner", "body"]), st.binary(max_size=40))
def test_garbage_bytes(record: SessionRecord, name: str, junk: bytes) -> None:
    fields = as_redis(encode_record(record))
    fields[name.encode()] = b"\xff" + junk  # never valid UTF-8
    assert "UTF-8" in str(assert_corrupt(record.session_id, fields))


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser's recursion limit
        '{"tokens_seen": ' + "9" * 5000 + "}",  # more digits than int() accepts
        "",
        "null",
    ],
    ids=["deep", "huge-int", "empty", "null"],
)
def test_pathological_bodies(body: str) -> None:
    assert_corrupt("s", {"epoch": "1", "owner": "a", "body": body})


@relaxed
@given(records, st.text(min_size=1, max_size=20))
def test_record_of_another_session(record: SessionRecord, other: str) -> None:
    if other != record.session_id:
        assert "names session" in str(assert_corrupt(other, encode_record(record)))


# --- foreign data under our keys in a real Redis ------------------------------------


@pytest.fixture
async def clients(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[RedisSessionStore, aioredis.Redis]]:
    store = RedisSessionStore(redis_server.url, prefix="p")
    raw = aioredis.Redis.from_url(redis_server.url)
    yield store, raw
    await store.close()
    await raw.aclose()


WRITERS = {
    "string": lambda raw, key: raw.set(key, "hello"),
    "list": lambda raw, key: raw.rpush(key, "a", "b"),
    "set": lambda raw, key: raw.sadd(key, "a"),
    "zset": lambda raw, key: raw.zadd(key, {"a": 1.0}),
    "stream": lambda raw, key: raw.xadd(key, {"a": "b"}),
    "foreign hash": lambda raw, key: raw.hset(key, mapping={"epoch": "3", "name": "x"}),
    "hash, bad epoch": lambda raw, key: raw.hset(
        key, mapping={"epoch": "x", "owner": "a", "body": "{}"}
    ),
    "hash, epoch too big": lambda raw, key: raw.hset(
        key,
        mapping={
            **encode_record(SessionRecord.empty("s {1}", "a", 0, 0.0)),
            "epoch": str(MAX_EPOCH + 1),
        },
    ),
}


@pytest.mark.redis
@pytest.mark.parametrize("kind", sorted(WRITERS))
async def test_foreign_redis_data_is_corrupt_and_left_alone(
    clients: tuple[RedisSessionStore, aioredis.Redis], kind: str
) -> None:
    store, raw = clients
    session_id = "s {1}"
    key = record_key("p", session_id)
    await WRITERS[kind](raw, key)
    before = await raw.dump(key)
    calls = {
        "get": store.get(session_id),
        "claim": store.claim(session_id, "a"),
        "commit": store.commit(SessionRecord.empty(session_id, "a", 3, 0.0)),
    }
    for name, call in calls.items():
        with pytest.raises(CorruptRecordError) as caught:
            await call
        assert repr(session_id) in str(caught.value), name
    assert await raw.dump(key) == before  # a refused claim or commit wrote nothing


@pytest.mark.redis
async def test_claim_at_max_epoch_is_refused(
    clients: tuple[RedisSessionStore, aioredis.Redis],
) -> None:
    store, raw = clients
    record = SessionRecord.empty("s", "a", MAX_EPOCH, 0.0)
    await raw.hset(record_key("p", "s"), mapping=encode_record(record))
    assert await store.get("s") == record
    with pytest.raises(CorruptRecordError, match="maximum"):
        await store.claim("s", "b")
    assert await store.get("s") == record


@pytest.mark.redis
@settings(
    max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(
    record=records,
    body=json_values.filter(lambda v: not isinstance(v, dict) or "session_id" not in v),
)
async def test_foreign_json_in_redis_is_corrupt(
    clients: tuple[RedisSessionStore, aioredis.Redis], record: SessionRecord, body: object
) -> None:
    store, raw = clients
    session_id = uuid.uuid4().hex  # examples share the server: one key each
    fields = {**encode_record(record), "body": json.dumps(body)}
    await raw.hset(record_key("p", session_id), mapping=fields)
    with pytest.raises(CorruptRecordError):
        await store.get(session_id)
    with pytest.raises(CorruptRecordError):
        await store.claim(session_id, "a")
