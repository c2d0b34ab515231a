"""Security: API keys, tenant-scoped sessions, request limits, Redis AUTH/TLS, and no secrets in logs.

Unit tests first (no Ray); then the real app (real Ray, real redis-server with a password, the real
openai client) with one API key per tenant and small limits.
"""
import asyncio
import hashlib
import hmac
import json
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st

from deployments.auth import KeyListError, KeyRing, parse_keys, scoped_session_id
from deployments.config import AppArgs, Limits
from deployments.guard import TENANT_SCOPE_KEY, Guard
from deployments.limits import TenantLimiter, TokenBucket
from deployments.store_factory import make_store
from routing.redis_store import RedisSessionStore
from routing.store import StoreAuthError, StoreUnavailableError, record_key
from tests.redis_server import REDIS_SERVER, free_port, redis_server
from tests.serve_utils import TINY_MODEL_ID as MODEL, local_app_spec, running_app, stream_turn
from tests.tls_cert import self_signed_cert

TENANTS = ("alpha", "beta", "size", "conc", "rate", "logs")
KEYS = {t: f"{t}-key-{secrets.token_hex(12)}" for t in TENANTS}
REDIS_PASSWORD = f"redis-pw-{secrets.token_hex(12)}"
SECRET_TEXTS: list[str] = []  # message texts the tests send; none may reach a log


def secret_text(label: str) -> str:
    SECRET_TEXTS.append(f"{label} {secrets.token_hex(8)}")
    return SECRET_TEXTS[-1]


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def is_openai_error(r: httpx.Response, status: int, code: str | None = None) -> bool:
    err = r.json().get("error", {})
    return (r.status_code == status and set(err) == {"message", "type", "param", "code"} and bool(err["message"])
            and (code is None or err["code"] == code))


# ---- API keys -------------------------------------------------------------------------------------
def test_key_lists_parse_plain_and_hashed_keys_and_errors_never_show_a_key():
    hashed = hashlib.sha256(b"second-key-0123456789").hexdigest()
    text = f"# comment\nteam-a:first-key-0123456789, team-b:sha256:{hashed}\n\n team-a:third-key-0123456789"
    entries = parse_keys(text, "test")
    assert [t for _, t in entries] == ["team-a", "team-b", "team-a"]
    assert entries[1][0] == bytes.fromhex(hashed)
    bad = ["no-tenant-0123456789", "bad/tenant:key-0123456789abc", "a:short", "a:sha256:abc",
           "a:dup-key-0123456789 b:dup-key-0123456789", f"{'t' * 33}:long-tenant-0123456789"]
    for text in bad:
        with pytest.raises(KeyListError) as info:
            parse_keys(text, "test")
        assert not any(word in str(info.value) for word in ("0123456789", "short", "abc"))
    with pytest.raises(KeyListError):
        KeyRing(parse_keys("# only a comment", "test"))


def test_key_ring_from_env_and_file(monkeypatch, tmp_path):
    assert KeyRing.from_args(None, None) is None  # no auth
    path = tmp_path / "keys"
    path.write_text("file-tenant:file-key-0123456789\n")
    monkeypatch.setenv("TEST_API_KEYS", "env-tenant:env-key-0123456789")
    ring = KeyRing.from_args("TEST_API_KEYS", str(path))
    assert ring.tenant("Bearer env-key-0123456789") == "env-tenant"
    assert ring.tenant("bearer  file-key-0123456789 ") == "file-tenant"
    for header in (None, "", "Bearer", "Bearer ", "Basic env-key-0123456789", "env-key-0123456789",
                   "Bearer env-key-012345678", "Bearer sha256:" + hashlib.sha256(b"env-key-0123456789").hexdigest()):
        assert ring.tenant(header) is None, header
    monkeypatch.delenv("TEST_API_KEYS")
    with pytest.raises(KeyListError, match="TEST_API_KEYS"):
        KeyRing.from_args("TEST_API_KEYS", None)
    with pytest.raises(KeyListError, match="cannot read"):
        KeyRing.from_args(None, str(tmp_path / "missing"))


def test_every_stored_digest_is_compared_in_constant_time(monkeypatch):
    ring = KeyRing(parse_keys(" ".join(f"t{i}:key-number-{i}-0123456789" for i in range(5)), "test"))
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert ring.tenant("Bearer key-number-0-0123456789") == "t0" and len(calls) == 5  # no early exit
    assert ring.tenant("Bearer wrong-key-0123456789") is None and len(calls) == 10


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True), st.text(min_size=1, max_size=200),
       st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True), st.text(min_size=1, max_size=200))
def test_tenant_scoping_is_injective_down_to_the_store_key(t1, s1, t2, s2):
    a, b = scoped_session_id(t1, s1), scoped_session_id(t2, s2)
    assert len(a) <= 256 and a.split("/", 1) == [t1, s1]
    assert (a == b) == ((t1, s1) == (t2, s2))
    assert (record_key("p", a) == record_key("p", b)) == (a == b)


# ---- limits ---------------------------------------------------------------------------------------
def test_token_bucket_allows_the_burst_then_refills_at_the_rate():
    now = [0.0]
    limiter = TenantLimiter(Limits(rate_limit_per_s=0.5, rate_limit_burst=3), clock=lambda: now[0])
    assert [limiter.retry_after("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.retry_after("a") == 2 and limiter.retry_after("b") == 0  # tenants are independent
    now[0] = 1.9
    assert limiter.retry_after("a") == 1  # 0.95 tokens: not yet
    now[0] = 2.0
    assert limiter.retry_after("a") == 0 and limiter.retry_after("a") == 2
    bucket = TokenBucket(rate=10, burst=2, now=0)
    assert bucket.take(100) == 0 and bucket.take(100) == 0 and bucket.take(100) == pytest.approx(0.1)
    assert TenantLimiter(Limits(rate_limit_per_s=None)).retry_after("a") == 0


def test_requests_in_flight_are_counted_per_tenant():
    limiter = TenantLimiter(Limits(max_concurrent_requests=2))
    assert limiter.enter("a") and limiter.enter("a") and not limiter.enter("a")
    assert limiter.enter("b")
    limiter.leave("a")
    assert limiter.enter("a")


async def guarded(guard: Guard, body_parts: list[bytes], headers: dict[str, str],
                  path: str = "/v1/completions") -> tuple[int, bytes | None]:
    """Run one request through the Guard; returns (status, the body the app got or None)."""
    got: list[bytes] = []
    messages = [{"type": "http.request", "body": p, "more_body": i < len(body_parts) - 1}
                for i, p in enumerate(body_parts)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        assert scope[TENANT_SCOPE_KEY] == "t"
        message = await receive()
        got.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    await guard(app, scope, receive, send)
    return sent[0]["status"], (got[0] if got else None)


async def test_guard_counts_body_bytes_with_and_without_content_length():
    guard = Guard(KeyRing(parse_keys("t:the-key-0123456789", "test")), Limits(max_request_bytes=1024))
    key = {"authorization": "Bearer the-key-0123456789"}
    assert await guarded(guard, [b"x" * 1024], {**key, "content-length": "1024"}) == (200, b"x" * 1024)
    assert await guarded(guard, [b"x" * 1025], {**key, "content-length": "1025"}) == (413, None)
    assert await guarded(guard, [b"x" * 500, b"y" * 524], key) == (200, b"x" * 500 + b"y" * 524)
    assert await guarded(guard, [b"x" * 500, b"y" * 525], key) == (413, None)
    assert await guarded(guard, [b"x" * 10], {**key, "content-length": "1" * 30}) == (413, None)
    assert await guarded(guard, [b"x"], {**key, "content-length": "-1"}) == (400, None)
    assert await guarded(guard, [b"x"], {"authorization": "Bearer the-key-012345678"}) == (401, None)
    assert guard.limiter.in_flight["t"] == 0  # every slot was given back


# ---- Redis AUTH and TLS ---------------------------------------------------------------------------
@pytest.mark.redis
async def test_store_password_from_env_authenticates(monkeypatch):
    with redis_server(password=REDIS_PASSWORD) as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        monkeypatch.setenv("TEST_REDIS_PASSWORD", REDIS_PASSWORD)
        store = make_store(AppArgs(store_url=url, store_password_env="TEST_REDIS_PASSWORD"))
        assert (await store.claim("alpha/s", "r1")).epoch == 1
        monkeypatch.setenv("TEST_REDIS_PASSWORD", "wrong-password")
        with pytest.raises(StoreAuthError) as info:
            await make_store(AppArgs(store_url=url, store_password_env="TEST_REDIS_PASSWORD")).get("alpha/s")
        assert "wrong-password" not in str(info.value)


@pytest.mark.redis
async def test_rediss_url_speaks_tls_to_a_real_redis(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                             "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD, "--save", "",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the CA that signed the server's certificate
        monkeypatch.setenv("TEST_REDIS_PASSWORD", REDIS_PASSWORD)
        tls = AppArgs(store_url=f"rediss://127.0.0.1:{port}/0", store_password_env="TEST_REDIS_PASSWORD")
        for _ in range(100):
            try:
                assert (await make_store(tls).claim("alpha/s", "r1")).epoch == 1
                break
            except StoreUnavailableError:
                await asyncio.sleep(0.05)
        assert (await make_store(tls).get("alpha/s")).owner == "r1"
        with pytest.raises(StoreUnavailableError):  # plain text to the TLS port is refused
            await RedisSessionStore(f"redis://127.0.0.1:{port}/0", password=REDIS_PASSWORD, timeout_s=0.5).get("x")
    finally:
        proc.kill()
        proc.wait()


# ---- the real app ---------------------------------------------------------------------------------
LIMITS = {"max_request_bytes": 4096, "max_messages": 6, "max_concurrent_requests": 2,
          "rate_limit_per_s": 0.2, "rate_limit_burst": 30}
MAX_PROMPT_TOKENS = 200


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    lines = [f"{t}:sha256:{hashlib.sha256(k.encode()).hexdigest()}" if t == "beta" else f"{t}:{k}"
             for t, k in KEYS.items()]
    keys.write_text("# tenant:key\n" + "\n".join(lines) + "\n")
    local = local_app_spec()["args"]
    with redis_server(password=REDIS_PASSWORD) as redis:
        update = {"store_url": redis.url, "store_key_prefix": "sec", "api_keys_file": str(keys), "limits": LIMITS,
                  "engine": {**local["engine"], "max_prompt_tokens": MAX_PROMPT_TOKENS}}
        with running_app(args_update=update) as url:
            yield url, redis


def client(url: str, tenant: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def chat(content: str, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.ray
@pytest.mark.redis
async def test_every_route_but_health_needs_a_valid_key(app):
    url, _ = app
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        spec = (await http.get("/openapi.json", headers=auth("alpha"))).json()
        routes = [(m.upper(), p.replace("{session_id}", "some-session").replace("{model_id}", MODEL))
                  for p, ops in spec["paths"].items() for m in ops if p != "/health"]
        assert len(routes) == 6  # chat, completions, models, models/{id}, sessions/{id} GET and DELETE
        routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics"), ("POST", "/v1/nope")]
        wrong = [{}, {"authorization": "Bearer wrong-key-0123456789"}, {"authorization": f"Basic {KEYS['alpha']}"},
                 {"authorization": KEYS["alpha"]}, {"authorization": f"Bearer {KEYS['alpha'][:-1]}"},
                 {"authorization": "Bearer sha256:" + hashlib.sha256(KEYS["beta"].encode()).hexdigest()}]
        for method, path in routes:
            for headers in wrong:
                r = await http.request(method, path, headers=headers, json=chat("x"))
                assert is_openai_error(r, 401, "invalid_api_key"), (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/health")).json() == {"status": "ready"}
        assert (await http.get("/metrics", headers=auth("alpha"))).status_code == 404  # no metrics on the API port
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong-key-0123456789",
                                     max_retries=0).models.list()
        assert [m.id for m in (await client(url, "beta").models.list()).data] == [MODEL]  # hashed entry works


@pytest.mark.ray
@pytest.mark.redis
async def test_another_tenants_session_is_404_and_never_continued(app):
    url, redis = app
    alice, bob = client(url, "alpha"), client(url, "beta")
    history = []
    for n in range(2):
        history.append({"role": "user", "content": secret_text(f"alpha turn {n}")})
        _, text, _ = await stream_turn(alice, "shared-id", history)
        history.append({"role": "assistant", "content": text})
    store = RedisSessionStore(redis.url, prefix="sec")
    before = await store.get("alpha/shared-id")
    assert before.turns == 2 and await store.get("shared-id") is None  # stored under the tenant's scope
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        info_before = (await http.get("/v1/sessions/shared-id", headers=auth("alpha"))).json()
        for method in ("GET", "DELETE"):
            r = await http.request(method, "/v1/sessions/shared-id", headers=auth("beta"))
            assert is_openai_error(r, 404, "session_not_found") and "shared-id" in r.json()["error"]["message"]
        # a history that does not extend alpha's is no 409 for beta: it starts beta's own session
        await stream_turn(bob, "shared-id", [{"role": "user", "content": secret_text("beta")}])
        with pytest.raises(openai.ConflictError, match="session 'shared-id' has"):  # beta's own, in beta's words
            await stream_turn(bob, "shared-id", history)
        assert (await http.delete("/v1/sessions/shared-id", headers=auth("beta"))).status_code == 200
        # alpha's history plus a new turn, as beta: a new session of beta's, alpha's is not continued
        headers, _, usage = await stream_turn(bob, "shared-id", history + [{"role": "user", "content": "more"}])
        assert headers["x-session-id"] == "shared-id" and usage.completion_tokens > 0
        bob_info = (await http.get("/v1/sessions/shared-id", headers=auth("beta"))).json()
        assert bob_info["turns"] == 1 and bob_info["id"] == "shared-id"
        assert await store.get("alpha/shared-id") == before  # alpha's record is untouched
        assert (await http.get("/v1/sessions/shared-id", headers=auth("alpha"))).json() == info_before
        # alpha carries on where it was: its cache and record still hold its own two turns
        history.append({"role": "user", "content": secret_text("alpha turn 2")})
        await stream_turn(alice, "shared-id", history)
        assert (await store.get("alpha/shared-id")).turns == 3
        assert (await http.delete("/v1/sessions/shared-id", headers=auth("beta"))).status_code == 200
        assert (await store.get("alpha/shared-id")).turns == 3


@pytest.mark.ray
@pytest.mark.redis
async def test_body_size_limit_counts_declared_and_streamed_bytes(app):
    url, _ = app
    limit = LIMITS["max_request_bytes"]

    def body(size: int) -> bytes:
        raw = json.dumps(chat(secret_text("size"))).encode()
        return raw[:-1] + b" " * (size - len(raw)) + b"}"

    async def chunks(data: bytes):  # no Content-Length: chunked transfer encoding
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        headers = {**auth("size"), "content-type": "application/json"}
        assert (await http.post("/v1/chat/completions", content=body(limit), headers=headers)).status_code == 200
        r = await http.post("/v1/chat/completions", content=body(limit + 1), headers=headers)
        assert is_openai_error(r, 413, "request_too_large") and str(limit) in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", content=chunks(body(limit)), headers=headers)
        assert r.status_code == 200 and "content-length" not in r.request.headers
        r = await http.post("/v1/chat/completions", content=chunks(body(limit + 1)), headers=headers)
        assert is_openai_error(r, 413, "request_too_large")
        assert (await http.post("/v1/chat/completions", json=chat("hi"), headers=auth("beta"))).status_code == 200


@pytest.mark.ray
@pytest.mark.redis
async def test_message_and_token_limits_are_400_at_their_value(app):
    url, _ = app
    limit = LIMITS["max_messages"]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        many = [{"role": "user", "content": "m"}] * limit
        assert (await http.post("/v1/chat/completions", json={**chat(""), "messages": many},
                                headers=auth("size"))).status_code == 200
        r = await http.post("/v1/chat/completions", json={**chat(""), "messages": many + many[:1]},
                            headers=auth("size"))
        assert is_openai_error(r, 400, "too_many_messages") and f"limit is {limit}" in r.json()["error"]["message"]
        ok = await http.post("/v1/completions", json={"model": MODEL, "max_tokens": 1, "prompt": "a" * MAX_PROMPT_TOKENS},
                             headers=auth("size"))
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == MAX_PROMPT_TOKENS
        r = await http.post("/v1/completions", json={"model": MODEL, "max_tokens": 1,
                                                     "prompt": "a" * (MAX_PROMPT_TOKENS + 1)}, headers=auth("size"))
        assert is_openai_error(r, 400) and "max_prompt_tokens" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", json=chat("x", max_tokens=1025), headers=auth("size"))
        assert is_openai_error(r, 400) and "1024" in r.json()["error"]["message"]
        async with http.stream("POST", "/v1/chat/completions", json=chat("x", max_tokens=1024, stream=True),
                               headers=auth("size")) as r:
            assert r.status_code == 200  # the limit itself is allowed (cut off after the headers)


@pytest.mark.ray
@pytest.mark.redis
async def test_concurrent_streams_limit_is_per_tenant(app):
    url, _ = app
    limit = LIMITS["max_concurrent_requests"]
    long = chat("tell me everything", max_tokens=1024, ignore_eos=True, stream=True)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=long, headers=auth("conc")) for _ in range(limit)]
        opened = [await s.__aenter__() for s in streams]
        try:
            lines = [r.aiter_lines() for r in opened]  # kept: a dropped iterator closes its response
            for r, it in zip(opened, lines):
                assert r.status_code == 200 and (await it.__anext__()).startswith("data:")  # the turn runs
            r = await http.post("/v1/chat/completions", json=chat("one more"), headers=auth("conc"))
            assert is_openai_error(r, 429, "too_many_concurrent_requests") and str(limit) in r.text
            other = await http.post("/v1/chat/completions", json=chat("meanwhile"), headers=auth("beta"))
            assert other.status_code == 200  # other tenants are served meanwhile
        finally:
            for s in streams:
                await s.__aexit__(None, None, None)
        deadline = time.monotonic() + 20
        while (r := await http.post("/v1/chat/completions", json=chat("again"), headers=auth("conc"))).status_code == 429:
            assert time.monotonic() < deadline, "closed streams were not given back"
            await asyncio.sleep(0.2)
        assert r.status_code == 200


@pytest.mark.ray
@pytest.mark.redis
async def test_rate_limit_allows_the_burst_then_429_with_retry_after(app):
    url, _ = app
    burst = LIMITS["rate_limit_burst"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        statuses = [(await http.get("/v1/models", headers=auth("rate"))).status_code for _ in range(burst)]
        assert statuses == [200] * burst
        r = await http.get("/v1/models", headers=auth("rate"))
        assert is_openai_error(r, 429, "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 1 / LIMITS["rate_limit_per_s"]
        assert (await http.get("/v1/models", headers=auth("beta"))).status_code == 200
        await asyncio.sleep(int(r.headers["retry-after"]))
        assert (await http.get("/v1/models", headers=auth("rate"))).status_code == 200


@pytest.mark.ray
@pytest.mark.redis
async def test_logs_hold_no_keys_passwords_or_messages(app, capfd):
    """Last in the module: scans everything logged while the tests above and this one ran."""
    url, _ = app
    logs = client(url, "logs")
    history = [{"role": "user", "content": secret_text("logged?")}]
    await stream_turn(logs, "log-session", history)
    with pytest.raises(openai.ConflictError):  # an error path with the message in the request
        await stream_turn(logs, "log-session", [{"role": "user", "content": secret_text("conflict")}])
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        bad = [{"role": "robot", "content": secret_text("invalid")}]
        assert (await http.post("/v1/chat/completions", json={**chat(""), "messages": bad},
                                headers=auth("logs"))).status_code == 400
        near_key = KEYS["logs"][:-1] + ("1" if KEYS["logs"].endswith("0") else "0")  # one character off
        assert (await http.get("/v1/models", headers={"authorization": f"Bearer {near_key}"})).status_code == 401
    log_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for _ in range(30):  # the replicas' log lines reach their files a little later, on a busy host later still
        await asyncio.sleep(0.5)
        texts = {str(p): p.read_text(errors="replace") for p in log_dir.rglob("*") if p.is_file()}
        everything = "\n".join(texts.values())
        if "POST /v1/chat/completions 200" in everything and "GET /v1/models 401" in everything:
            break
    captured = capfd.readouterr()
    texts["captured"] = captured.out + captured.err
    secrets_ = [*KEYS.values(), near_key, REDIS_PASSWORD, *SECRET_TEXTS]
    leaks = [(name, s) for name, text in texts.items() for s in secrets_ if s in text]
    assert not leaks, leaks
    everything = "\n".join(texts.values())
    assert "POST /v1/chat/completions 200" in everything and "GET /v1/models 401" in everything  # logs were read
