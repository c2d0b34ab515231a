"""The SessionStore contract, run against Redis (a real redis-server) and the embedded store (real Ray).

Redis-only behaviour (key TTL, outages, AUTH) is at the end of the file.
"""

from __future__ import annotations

import asyncio
import random
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import ray
import redis.asyncio as aioredis

from routing.embedded_store import ACTOR_NAMESPACE, EmbeddedSessionStore
from routing.redis_store import RedisSessionStore
from routing.store import (
    Claim,
    InvalidSessionIdError,
    SessionRecord,
    SessionStore,
    StaleEpochError,
    StoreAuthError,
    StoreUnavailableError,
    record_key,
    retry_commit,
)
from tests.redis_server import RedisServer, redis_server

MakeStore = Callable[..., SessionStore]


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("embedded", marks=pytest.mark.ray),
    ]
)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """make_store(**kwargs) -> a new client; clients of one test share a fresh key prefix."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    stores: list[SessionStore] = []
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")

        def build(**kwargs: object) -> SessionStore:
            return RedisSessionStore(server.url, prefix=prefix, **kwargs)
    else:
        request.getfixturevalue("ray_local")

        def build(**kwargs: object) -> SessionStore:
            return EmbeddedSessionStore(prefix=prefix, **kwargs)

    def make(**kwargs: object) -> SessionStore:
        stores.append(build(**kwargs))
        return stores[-1]

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def store(make_store: MakeStore) -> SessionStore:
    return make_store()


def full_record(base: SessionRecord, seed: int) -> SessionRecord:
    """``base`` with every content field set to something not default."""
    return base.model_copy(
        update={
            "sink_ids": [1, 2, 3, seed],
            "tail_ids": list(range(seed, seed + 50)),
            "tokens_seen": 10_000 + seed,
            "turns": 3 + seed,
            "messages_consumed": 6 + seed,
            "messages_digest": f"sha256:{seed:064x}",
            "open_turn": True,
            "updated_at": 0.0,
        }
    )


async def test_get_unknown_is_none(store: SessionStore) -> None:
    assert await store.get("never-seen") is None


async def test_claim_new_session(store: SessionStore) -> None:
    before = time.time()
    claim = await store.claim("s", "replica-a")
    assert (claim.epoch, claim.previous) == (1, None)
    assert claim.record == SessionRecord.empty("s", "replica-a", 1, claim.record.created_at)
    assert before - 1 <= claim.record.created_at <= time.time() + 1
    assert await store.get("s") == claim.record


async def test_claims_count_up(store: SessionStore) -> None:
    epochs = [(await store.claim("s", owner)).epoch for owner in ("a", "a", "b", "a")]
    assert epochs == [1, 2, 3, 4]
    assert (await store.get("s")).owner == "a"


async def test_commit_round_trips_every_field(store: SessionStore) -> None:
    claim = await store.claim("s", "replica-a")
    record = full_record(claim.record, seed=7)
    before = time.time()
    await store.commit(record)
    stored = await store.get("s")
    assert stored.model_dump(exclude={"updated_at"}) == record.model_dump(exclude={"updated_at"})
    assert stored.updated_at >= before - 1  # set by the store, not the caller's 0.0


async def test_new_owner_fences_old_one(store: SessionStore) -> None:
    a = await store.claim("s", "replica-a")
    v1 = full_record(a.record, seed=1)
    await store.commit(v1)
    b = await store.claim("s", "replica-b")
    assert b.epoch == 2
    assert b.previous.model_dump(exclude={"updated_at"}) == v1.model_dump(exclude={"updated_at"})
    held = await store.get("s")

    with pytest.raises(StaleEpochError) as caught:
        await store.commit(full_record(a.record, seed=2))
    err = caught.value
    assert (err.attempted_epoch, err.attempted_owner) == (1, "replica-a")
    assert (err.stored_epoch, err.stored_owner) == (2, "replica-b")
    assert "epoch 1" in str(err) and "epoch 2" in str(err) and "'replica-b'" in str(err)
    assert await store.get("s") == held  # nothing was written

    # Neither a forged epoch with the wrong owner nor a future epoch lands.
    for forged in (
        held.model_copy(update={"owner": "replica-a", "turns": 99}),
        held.model_copy(update={"epoch": 3, "turns": 99}),
    ):
        with pytest.raises(StaleEpochError):
            await store.commit(forged)
    assert await store.get("s") == held

    await store.commit(full_record(b.record, seed=3))  # the current owner still can
    assert (await store.get("s")).turns == 6


async def test_commit_without_claim_is_stale(store: SessionStore) -> None:
    with pytest.raises(StaleEpochError) as caught:
        await store.commit(SessionRecord.empty("s", "replica-a", 1, time.time()))
    assert caught.value.stored_epoch is None and "no record" in str(caught.value)
    assert await store.get("s") is None


async def test_ttl_expires_and_writes_refresh_it(make_store: MakeStore) -> None:
    store = make_store(ttl_s=1.5)  # margins of 0.6 s: a loaded host may stall the loop a few hundred ms
    claim = await store.claim("s", "a")
    await asyncio.sleep(0.9)
    await store.commit(claim.record)  # refreshes the TTL
    await asyncio.sleep(0.9)  # 1.8 s after the claim, 0.9 s after the commit
    assert await store.get("s") is not None
    await asyncio.sleep(1.2)
    assert await store.get("s") is None


async def test_delete(store: SessionStore) -> None:
    await store.claim("s", "a")
    assert await store.delete("s")
    assert await store.get("s") is None
    assert not await store.delete("s")
    assert (await store.claim("s", "b")).previous is None


async def test_admit_counts_live_sessions_per_group(store: SessionStore) -> None:
    assert [await store.admit("t", f"t/{i}", 2) for i in range(3)] == [True, True, False]
    assert await store.admit("t", "t/1", 2) and await store.admit("u", "u/0", 1)  # counted already; own group
    await store.release("t", "t/0")
    assert await store.admit("t", "t/2", 2) and not await store.admit("t", "t/3", 2)


async def test_special_session_ids_do_not_collide(store: SessionStore) -> None:
    ids = [
        "{",
        "}",
        "{}",
        "a{b}c",
        "}{",
        "%7B",
        "%257B",
        "%",
        "a b",
        " ",
        "ünïcødé 会话 🚀",
        "x" * 256,
    ]
    for i, session_id in enumerate(ids):
        claim = await store.claim(session_id, f"owner-{i}")
        await store.commit(claim.record.model_copy(update={"tail_ids": [i]}))
    for i, session_id in enumerate(ids):
        record = await store.get(session_id)
        assert (record.session_id, record.owner, record.tail_ids) == (session_id, f"owner-{i}", [i])


@pytest.mark.parametrize("session_id", ["", "x" * 257, "bad \ud800 surrogate"])
async def test_invalid_session_ids(store: SessionStore, session_id: str) -> None:
    for call in (store.get(session_id), store.claim(session_id, "a"), store.delete(session_id)):
        with pytest.raises(InvalidSessionIdError):
            await call


async def test_retry_commit_never_retries_stale(store: SessionStore) -> None:
    old = await store.claim("s", "a")
    await store.claim("s", "b")
    started = time.monotonic()
    with pytest.raises(StaleEpochError):
        await retry_commit(store, old.record, attempts=5, base_delay_s=2.0)
    assert time.monotonic() - started < 1.0  # no backoff sleep happened


async def test_fencing_under_many_interleavings(make_store: MakeStore) -> None:
    """Rounds of concurrent claim+commit contenders, readers and zombie writers.

    Two clients (for Redis: two connection pools). Each contender commits
    ``turns = its epoch``, so every body names the epoch that wrote it. While
    the store holds epoch e, its body must be the one the claim of e found, or
    one written at e: a body from an older epoch landing later shows up here.
    """
    rng = random.Random(1234)
    clients = [make_store(), make_store()]
    claims: dict[int, Claim] = {}
    zombies: list[SessionRecord] = []
    seen: list[SessionRecord] = []
    last_epoch = 0

    async def pause() -> None:  # a few loop turns, so claims overlap other commits
        for _ in range(rng.randrange(8)):
            await asyncio.sleep(0)

    async def contender(owner: str, client: SessionStore) -> None:
        await pause()
        claim = await client.claim("s", owner)
        assert claim.epoch not in claims  # distinct epochs
        claims[claim.epoch] = claim
        await pause()
        record = claim.record.model_copy(update={"turns": claim.epoch, "tail_ids": [claim.epoch]})
        try:
            await client.commit(record)
        except StaleEpochError as err:
            assert err.stored_epoch > err.attempted_epoch  # fenced only by a newer claim
            zombies.append(record)

    async def reader(client: SessionStore) -> None:
        if (record := await client.get("s")) is not None:
            seen.append(record)

    async def zombie(client: SessionStore, record: SessionRecord) -> None:
        with pytest.raises(StaleEpochError):
            await client.commit(record)

    for _ in range(200):
        owners = [f"r{i}" for i in range(rng.randint(2, 4))]
        tasks = [contender(o, clients[i % 2]) for i, o in enumerate(owners)]
        tasks += [reader(clients[i]) for i in range(2)]
        tasks += [zombie(clients[0], z) for z in rng.sample(zombies, min(2, len(zombies)))]
        rng.shuffle(tasks)
        await asyncio.gather(*tasks)

        final = await clients[1].get("s")
        seen.append(final)
        winner = claims[max(claims)]
        assert final.epoch == winner.epoch > last_epoch  # last claim wins; never goes back
        # ...and the last claimer's commit landed
        assert (final.owner, final.turns) == (winner.record.owner, winner.epoch)
        last_epoch = final.epoch

    assert sorted(claims) == list(range(1, len(claims) + 1))  # no gaps
    for epoch, claim in claims.items():
        assert claim.record.turns == (0 if claim.previous is None else claim.previous.turns)
        if epoch > 1:
            assert claim.previous.epoch == epoch - 1
            assert claim.previous.turns in (claims[epoch - 1].record.turns, epoch - 1)
    for record in seen:
        assert record.turns in (claims[record.epoch].record.turns, record.epoch)
        assert record.tail_ids in ([], [record.turns])


# --- embedded only ----------------------------------------------------------------


@pytest.mark.ray
async def test_embedded_actor_loss_is_unavailable_then_recovers(ray_local: None) -> None:
    name = f"test-store-{uuid.uuid4().hex[:8]}"
    store = EmbeddedSessionStore(name=name)
    await store.claim("s", "a")
    ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE))
    for _ in range(200):  # ray.kill returns before the actor is gone: wait until its name is free
        try:
            ray.get_actor(name, namespace=ACTOR_NAMESPACE)
        except ValueError:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(StoreUnavailableError):
        await store.get("s")
    try:
        assert await store.get("s") is None  # a fresh, empty actor
        assert (await store.claim("s", "a")).epoch == 1
    finally:
        ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE))


# --- Redis only ---------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_key_ttl(redis_server: RedisServer) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    store = RedisSessionStore(redis_server.url, prefix="p", ttl_s=3600)
    key = record_key("p", "s")
    try:
        claim = await store.claim("s", "a")
        assert 3590 <= await raw.ttl(key) <= 3600
        await raw.expire(key, 5)
        await store.commit(claim.record)
        assert 3590 <= await raw.ttl(key) <= 3600

        forever = RedisSessionStore(redis_server.url, prefix="p", ttl_s=None)
        await forever.commit((await forever.claim("s", "b")).record)
        assert await raw.ttl(key) == -1  # -1: the key exists and never expires
        await forever.close()
    finally:
        await store.close()
        await raw.aclose()


@pytest.mark.redis
async def test_redis_outage_is_typed_and_recovers(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url)
    try:
        claim = await store.claim("s", "a")
        redis_server.stop()
        for call in (
            store.get("s"),
            store.claim("s", "a"),
            store.commit(claim.record),
            store.delete("s"),
        ):
            with pytest.raises(StoreUnavailableError, match="unavailable"):
                await call
        redis_server.start()  # same port; no persistence, so the data is gone
        assert await store.get("s") is None
        assert (await store.claim("s", "a")).epoch == 1
    finally:
        await store.close()


@pytest.mark.redis
async def test_retry_commit_rides_out_a_restart(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url, timeout_s=0.5)
    try:
        claim = await store.claim("s", "a")
        record = full_record(claim.record, seed=5)
        redis_server.stop(save=True)  # a restart that keeps the data

        with pytest.raises(StoreUnavailableError):
            await retry_commit(store, record, attempts=2, base_delay_s=0.01)

        async def restart_soon() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(redis_server.start)

        restart = asyncio.create_task(restart_soon())
        await retry_commit(store, record, attempts=8, base_delay_s=0.05)  # ~3.5 s of backoff
        await restart
        assert (await store.get("s")).tail_ids == record.tail_ids
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_auth() -> None:
    secret, wrong = f"pw-{uuid.uuid4().hex}", f"bad-{uuid.uuid4().hex}"
    with redis_server(password=secret) as server:
        good = RedisSessionStore(server.url)
        overridden = RedisSessionStore(server.url.replace(secret, wrong), password=secret)
        no_url_password = RedisSessionStore(f"redis://127.0.0.1:{server.port}/0", password=secret)
        try:
            for store in (good, overridden, no_url_password):
                assert (await store.claim("s", "a")).epoch >= 1
                assert secret not in repr(store)
        finally:
            for store in (good, overridden, no_url_password):
                await store.close()

        for url in (server.url.replace(secret, wrong), f"redis://127.0.0.1:{server.port}/0"):
            store = RedisSessionStore(url)
            try:
                with pytest.raises(StoreAuthError) as caught:
                    await store.get("s")
            finally:
                await store.close()
            report = "".join(traceback.format_exception(caught.value))
            assert "credentials" in str(caught.value)
            assert secret not in report and wrong not in report
            assert not isinstance(caught.value, StoreUnavailableError)  # retrying cannot help
