"""The Redis store behind Sentinel (real redis-server and Sentinel processes): discovery by service name,
fencing across a failover, and durable commits (WAIT for replicas) that time out when the replicas stall."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from pydantic import ValidationError

from deployments.config import AppArgs
from routing.redis_connect import parse_sentinel_url
from routing.redis_store import RedisSessionStore
from routing.store import (ReplicationTimeoutError, StaleEpochError, StoreUnavailableError, record_key,
                           retry_commit)
from tests.redis_server import REDIS_SERVER, free_port, reap, spawn
from tests.sentinel_cluster import SentinelCluster, sentinel_cluster
from tests.tls_cert import self_signed_cert

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster():
    with sentinel_cluster(replicas=2) as c:
        yield c


@pytest.fixture
async def store(cluster: SentinelCluster):
    s = RedisSessionStore(cluster.url, prefix=f"t{uuid.uuid4().hex[:8]}", min_replicas_acked=1,
                          replica_ack_timeout_s=0.3)
    yield s
    await s.close()


async def until_served(call, timeout_s: float = 30.0):
    """Retry ``call()`` through a failover; the first answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_discovers_the_primary_by_service_name(cluster: SentinelCluster, store: RedisSessionStore):
    claim = await store.claim("s", "a")
    await store.commit(claim.record.model_copy(update={"tail_ids": [1, 2, 3]}))
    assert (await store.get("s")).tail_ids == [1, 2, 3]
    # the commit waited for a replica: it is there (read with raw RESP, not the client under test)
    key = record_key(store._prefix, "s").encode()
    assert any(node.request([b"HGET", key, b"epoch"]) == b"$1\r\n1\r\n" for node in cluster.replicas())
    assert cluster.password not in repr(store)


async def test_acknowledged_commits_and_fencing_survive_a_failover(cluster: SentinelCluster,
                                                                   store: RedisSessionStore):
    old = await store.claim("f", "old-owner")
    new = await store.claim("f", "new-owner")  # fences the old owner off, before the failover
    await store.commit(new.record.model_copy(update={"tail_ids": [7, 8], "turns": 1}))
    victim = cluster.kill_primary()
    try:
        cluster.wait_promoted(victim)
        record = await until_served(lambda: store.get("f"))
        # the acknowledged commit and the epoch that fences are in the promoted replica's data
        assert (record.epoch, record.owner, record.tail_ids) == (2, "new-owner", [7, 8])
        with pytest.raises(StaleEpochError):
            await until_served(lambda: store.commit(old.record))
        assert (await store.claim("f", "third")).epoch == 3  # the Lua scripts run on the new primary
    finally:
        cluster.rejoin(victim)


async def test_commit_waits_for_a_replica_and_times_out_without_one(cluster: SentinelCluster,
                                                                   store: RedisSessionStore):
    claim = await store.claim("w", "a")
    record = claim.record.model_copy(update={"tail_ids": [5]})
    replicas = cluster.replicas()
    for node in replicas:
        node.pause()
    try:
        start = time.monotonic()
        with pytest.raises(ReplicationTimeoutError, match="0 of the 1 replicas"):
            await store.commit(record)
        assert 0.3 <= time.monotonic() - start < 2.0
        assert isinstance(ReplicationTimeoutError("x"), StoreUnavailableError)  # retried, relaxed: pending
        # without min_replicas_acked the same commit returns once the primary has it
        fast = RedisSessionStore(cluster.url, prefix=store._prefix)
        try:
            start = time.monotonic()
            await fast.commit(record)
            assert time.monotonic() - start < 0.3
        finally:
            await fast.close()
        # the commit is on the primary only: a claim that would hand it to a new owner (who may answer a
        # retried turn from it) waits for the replicas just the same
        with pytest.raises(ReplicationTimeoutError, match="the claim reached 0"):
            await store.claim("w", "b")
    finally:
        for node in replicas:
            node.resume()
    claim = await store.claim("w", "a")  # the replicas catch up
    await retry_commit(store, record.model_copy(update={"epoch": claim.epoch}), attempts=20, base_delay_s=0.05)
    assert (await store.get("w")).tail_ids == [5]


async def test_retry_commit_rides_out_a_failover(cluster: SentinelCluster, store: RedisSessionStore):
    claim = await store.claim("r", "a")
    victim = cluster.kill_primary()
    try:
        record = claim.record.model_copy(update={"turns": 4})
        await retry_commit(store, record, attempts=60, base_delay_s=0.1, max_delay_s=0.2)
        assert (await store.get("r")).turns == 4
    finally:
        cluster.rejoin(victim)


def test_sentinel_urls():
    target = parse_sentinel_url("rediss+sentinel://u:p%40ss@h1:26380,[::1],h3/mymaster/2")
    assert target.sentinels == (("h1", 26380), ("::1", 26379), ("h3", 26379))
    assert (target.service, target.db, target.tls, target.username, target.password) == \
        ("mymaster", 2, True, "u", "p@ss")
    assert parse_sentinel_url("redis+sentinel://h/m").db == 0


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://:secret@h1:port/m/0", "host[:port]"),
    ("redis+sentinel://:secret@h1:26379/", "/<service name>"),
    ("redis+sentinel://:secret@h1:26379/m/zero", "a number"),
    ("sentinel://:secret@h1:26379/m/0", "must start with"),
])
def test_bad_sentinel_urls_name_the_field_not_the_password(url, message):
    with pytest.raises(ValidationError) as caught:
        AppArgs(store_url=url)
    assert caught.value.errors()[0]["loc"] == ("store_url",)
    assert message in str(caught.value) and "secret" not in str(caught.value)


def test_min_replicas_acked_is_typed_and_needs_redis():
    assert AppArgs().min_replicas_acked == 0
    args = AppArgs(store_url="redis+sentinel://h1,h2/m/0", min_replicas_acked=1, durability="strict")
    assert (args.min_replicas_acked, args.replica_ack_timeout_s) == (1, 0.5)
    for bad in ({"min_replicas_acked": -1, "store_url": "redis://h:1/0"}, {"min_replicas_acked": 1},
                {"replica_ack_timeout_s": 0, "store_url": "redis://h:1/0"}):
        with pytest.raises(ValidationError) as caught:
            AppArgs(**bad)
        assert caught.value.errors()[0]["loc"][0] in bad


async def test_rediss_sentinel_speaks_tls_to_sentinels_and_primary(tmp_path, monkeypatch):
    """rediss+sentinel://: TLS to the Sentinel (discovery) and to the primary it names, the password on both."""
    cert, key = self_signed_cert(tmp_path)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
           "--tls-auth-clients", "no", "--port", "0", "--bind", "127.0.0.1", "--requirepass", "pw"]
    primary, sentinel = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its config file
    conf.write_text(f"sentinel monitor m 127.0.0.1 {primary} 1\nsentinel auth-pass m pw\n")
    procs = [spawn([REDIS_SERVER, "--tls-port", str(primary), "--save", "", "--dir", str(tmp_path), *tls]),
             spawn([REDIS_SERVER, str(conf), "--sentinel", "--tls-port", str(sentinel), "--tls-replication", "yes",
                    "--dir", str(tmp_path), *tls])]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the CA that signed the servers' certificate
    store = RedisSessionStore(f"rediss+sentinel://:pw@127.0.0.1:{sentinel}/m/0", timeout_s=0.5)
    plain = RedisSessionStore(f"redis+sentinel://:pw@127.0.0.1:{sentinel}/m/0", timeout_s=0.5)
    try:
        assert (await until_served(lambda: store.claim("s", "a"), timeout_s=20)).epoch == 1
        assert (await store.get("s")).owner == "a"
        with pytest.raises(StoreUnavailableError):  # plain text to the TLS Sentinel finds no primary
            await plain.get("s")
    finally:
        await store.close()
        await plain.close()
        for proc in procs:
            reap(proc)
