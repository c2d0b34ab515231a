"""Hardening (issue 16) without a Ray cluster: the Guard's per-tenant in-flight count on every route, its body
deadline and cheap chat checks, the session quota on a real redis-server and in memory, and the bounds set in
configs/ and the k8s Ingress."""
import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.auth import KeyRing, parse_keys
from deployments.config import AppArgs, Limits
from deployments.guard import Guard
from routing.embedded_store import MemoryRecords
from routing.redis_store import RedisSessionStore
from routing.store import group_key

ROOT = Path(__file__).resolve().parents[1]
KEYS = "a:key-of-tenant-a-0123456789 b:key-of-tenant-b-0123456789"


def headers(tenant: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer key-of-tenant-{tenant}-0123456789".encode())]


class Call:
    """One request through the Guard: the client sends `parts` of the body, then (maybe) nothing more."""

    def __init__(self, guard: Guard, tenant: str, path: str, parts: list[bytes], method: str = "POST",
                 finish: bool = True):
        self.sent: list[dict] = []
        self.app_got: bytes | None = None
        queue = [{"type": "http.request", "body": p, "more_body": not (finish and i == len(parts) - 1)}
                 for i, p in enumerate(parts)]
        self.gone = asyncio.Event()

        async def receive():
            if queue:
                return queue.pop(0)
            await self.gone.wait()  # a body that never ends, until the client goes away
            return {"type": "http.disconnect"}

        async def send(message):
            self.sent.append(message)

        async def app(scope, receive, send):
            self.app_got = (await receive())["body"]
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers(tenant)}
        self.task = asyncio.ensure_future(guard(app, scope, receive, send))

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None

    def body(self) -> dict:
        return json.loads(self.sent[1]["body"])


async def test_requests_in_flight_count_on_every_route_per_tenant():
    guard = Guard(KeyRing(parse_keys(KEYS, "test")), Limits(max_concurrent_requests=2, body_timeout_s=30))
    held = [Call(guard, "a", "/v1/models", [b"x"], method="GET", finish=False) for _ in range(2)]
    await asyncio.sleep(0.01)
    third = Call(guard, "a", "/v1/sessions/s", [b""], method="GET")
    other = Call(guard, "b", "/v1/models", [b""], method="GET")
    await asyncio.gather(third.task, other.task)
    assert third.status == 429 and third.body()["error"]["code"] == "too_many_concurrent_requests"
    assert other.status == 200  # another tenant is not counted against a's limit
    for call in held:
        call.gone.set()
    await asyncio.gather(*(c.task for c in held))
    assert guard.limiter.in_flight == {"a": 0, "b": 0}  # slots given back, also by clients that went away


async def test_a_body_that_does_not_arrive_in_time_is_408():
    guard = Guard(KeyRing(parse_keys(KEYS, "test")), Limits(body_timeout_s=0.2))
    start = time.monotonic()
    slow = Call(guard, "a", "/v1/completions", [b"{"], finish=False)
    await slow.task
    assert slow.status == 408 and slow.body()["error"]["code"] == "request_timeout"
    assert 0.2 <= time.monotonic() - start < 1.0 and slow.app_got is None
    logger, lines = logging.getLogger("ray.serve"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    try:
        gone = Call(guard, "a", "/v1/completions", [b"{"], finish=False)
        await asyncio.sleep(0.01)
        gone.gone.set()
        await gone.task  # no exception escapes: one log line
    finally:
        logger.removeHandler(handler)
    assert lines == ["POST /v1/completions: the client went away (ClientDisconnect)"]


async def test_chat_bodies_are_counted_before_validation():
    guard = Guard(None, Limits(max_messages=3))
    over = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 4}).encode()
    at = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 3}).encode()
    calls = [Call(guard, "a", "/v1/chat/completions", [over[:10], over[10:]]),
             Call(guard, "a", "/v1/chat/completions", [at]), Call(guard, "a", "/v1/chat/completions", [b"{no"]),
             Call(guard, "a", "/v1/completions", [over])]  # only chat bodies have messages
    await asyncio.gather(*(c.task for c in calls))
    too_many, ok, not_json, completions = calls
    assert too_many.status == 400 and too_many.app_got is None
    assert too_many.body()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                          "param": "messages", "code": "too_many_messages"}
    assert "4 messages; the limit is 3" in too_many.body()["error"]["message"]
    assert ok.status == 200 and ok.app_got == at and completions.status == 200
    assert not_json.status == 400 and not_json.body()["error"]["message"] == "the body is not valid JSON"


def test_new_settings_reject_bad_values_naming_the_field():
    for bad in ({"durability": "eventual"}, {"limits": {"body_timeout_s": 0}},
                {"limits": {"max_sessions_per_tenant": 0}}, {"limits": {"max_concurrent_requests": 0}}):
        with pytest.raises(ValidationError) as info:
            AppArgs.model_validate(bad)
        assert list(bad)[0] in str(info.value)


# ---- the session quota ---------------------------------------------------------------------------
@pytest.mark.redis
async def test_session_quota_counts_live_sessions_per_group_in_redis(redis_server):
    store = RedisSessionStore(redis_server.url, prefix="q", ttl_s=0.3)
    assert [await store.admit("t", f"t/{i}", 2) for i in range(3)] == [True, True, False]
    assert await store.admit("t", "t/0", 2)  # counted already: refreshed, not refused
    assert await store.admit("u", "u/0", 2)  # another group has its own count
    await store.release("t", "t/1")
    assert await store.admit("t", "t/2", 2) and not await store.admit("t", "t/3", 2)
    await asyncio.sleep(0.4)  # every entry expired with the TTL, as the records do
    assert await store.admit("t", "t/3", 2) and await store.admit("t", "t/4", 2)
    assert group_key("q", "t{x}") == "q:{t%7Bx%7D}:sessions"


def test_session_quota_in_the_embedded_store_s_memory():
    records = MemoryRecords()
    assert [records.admit("g", f"s{i}", 2, 0.2) for i in range(3)] == [True, True, False]
    records.release("g", "s0")
    assert records.admit("g", "s2", 2, 0.2) and not records.admit("g", "s3", 2, 0.2)
    time.sleep(0.25)
    assert records.admit("g", "s3", 2, 0.2)


# ---- what configs/ and the k8s Ingress bound ---------------------------------------------------------
@pytest.mark.parametrize("config", ["configs/gpu.yaml", "configs/local.yaml"])
def test_serve_configs_bound_requests_before_a_replica_runs(config):
    data = yaml.safe_load((ROOT / config).read_text())
    http = data["http_options"]
    assert 60 <= http["request_timeout_s"] <= 900 and 5 <= http["keep_alive_timeout_s"] <= 90


def test_public_ingress_serves_only_the_api_with_body_and_time_bounds():
    ingress = yaml.safe_load((ROOT / "k8s/base/ingress.yaml").read_text())
    paths = {(p["path"], p["pathType"]) for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {("/v1", "Prefix"), ("/health", "Exact")}  # not /-/routes, /-/healthz, /docs
    notes = ingress["metadata"]["annotations"]
    gpu = yaml.safe_load((ROOT / "configs/gpu.yaml").read_text())
    body_mib = int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].rstrip("m"))
    assert gpu["applications"][0]["args"]["limits"]["max_request_bytes"] < body_mib * 2**20 <= 16 * 2**20
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > gpu["http_options"]["request_timeout_s"]
    assert int(notes["nginx.ingress.kubernetes.io/limit-connections"]) > 0
