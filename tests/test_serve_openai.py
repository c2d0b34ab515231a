"""The Serve app end to end: real local Ray, 2 LLMServer replicas, the real openai client over HTTP."""
import asyncio

import httpx
import openai
import pytest
from ray import serve

from deployments.protocol import ChatRequest
from swift_engine import SamplingParams
from tests.serve_utils import TINY_MODEL_ID as MODEL, running_app, stream_turn

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def url(ray_local):
    with running_app() as base:
        yield base


async def one_turn(client, sid, history):
    """Stream one turn; returns (replica, text, usage)."""
    headers, text, usage = await stream_turn(client, sid, history)
    return headers["x-swiftserve-replica"], text, usage


async def conversation(client, sid, turns):
    history, replicas, tokens = [], [], 0
    for t in range(turns):
        history.append({"role": "user", "content": f"turn {t} of {sid}"})
        replica, text, usage = await one_turn(client, sid, history)
        history.append({"role": "assistant", "content": text})
        replicas.append(replica)
        tokens += usage.prompt_tokens + usage.completion_tokens
    return replicas, tokens


async def test_concurrent_conversations_stay_on_their_replica(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    sids = [f"conv-{i}" for i in range(24)]
    results = await asyncio.gather(*[conversation(client, sid, 4) for sid in sids])
    async with httpx.AsyncClient(base_url=url) as http:
        for sid, (replicas, tokens) in zip(sids, results):
            assert len(set(replicas)) == 1, f"{sid} moved between replicas: {replicas}"
            info = (await http.get(f"/v1/sessions/{sid}")).json()
            # the model saw every prior turn: the session holds all prompt and reply tokens
            assert info["turns"] == 4 and info["tokens_seen"] == tokens and info["owner"] == replicas[0]
    assert len({r[0][0] for r in results}) == 2  # both replicas took sessions


async def test_handle_streams_the_same_tokens_as_http(url):
    history = [{"role": "user", "content": "same question"}]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    resp = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0.9,
                                                seed=11, extra_headers={"x-session-id": "via-http"},
                                                extra_body={"ignore_eos": True})
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    request = ChatRequest(session_id="via-handle", messages=history,
                          sampling=SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True))
    chunks = [c async for c in handle.options(stream=True, session_id="via-handle").chat.remote(request)]
    assert chunks[-1].finish_reason == resp.choices[0].finish_reason
    assert "".join(c.text for c in chunks) == resp.choices[0].message.content
    assert chunks[-1].completion_tokens == resp.usage.completion_tokens == 12


async def test_bad_input_gets_openai_shaped_4xx_and_service_continues(url):
    async with httpx.AsyncClient(base_url=url) as http:
        cases = [
            (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
            (dict(json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404),
            (dict(json={"model": MODEL}), 400),
            (dict(json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), 400),
            (dict(json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}), 400),
            (dict(json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 40000}]}), 400),
            (dict(json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400),
        ]
        for kw, status in cases:
            r = await http.post("/v1/chat/completions", **kw)
            assert r.status_code == status, (kw, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"]
        for method in ("GET", "DELETE"):
            r = await http.request(method, "/v1/sessions/never-seen")
            assert r.status_code == 404 and "never-seen" in r.json()["error"]["message"]
        ok = await http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "fine"}]})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


async def test_history_that_does_not_extend_the_session_is_409(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    first = [{"role": "user", "content": "hello"}]
    await one_turn(client, "hist", first)
    with pytest.raises(openai.ConflictError, match="do not extend"):
        await one_turn(client, "hist", [{"role": "user", "content": "a different start"}])


async def test_completions_models_delete(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    c = await client.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0,
                                        extra_body={"session_id": "compl"})
    assert c.usage.completion_tokens == 4 and c.choices[0].finish_reason == "length"
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v1/sessions/compl")).json()["turns"] == 1
        assert (await http.delete("/v1/sessions/compl")).json()["deleted"] is True
        assert (await http.get("/v1/sessions/compl")).status_code == 404


async def test_client_disconnect_frees_the_request(url):
    sid = "disconnect"
    history = [{"role": "user", "content": "tell me everything"}]
    body = {"model": MODEL, "messages": history, "stream": True, "max_tokens": 1000, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-session-id": sid}) as r:
            replica = r.headers["x-swiftserve-replica"]
            lines = 0
            async for line in r.aiter_lines():
                lines += line.startswith("data:")
                if lines == 3:
                    break
    handle = serve.get_deployment_handle("LLMServer", app_name="swiftserve")
    for _ in range(100):
        stats = await handle.options(session_id=sid).engine_stats.remote()
        if stats["sessions_running"] == 0:
            break
        await asyncio.sleep(0.1)
    assert stats["replica_id"] == replica and stats["sessions_running"] == 0
    # the cut-off turn was never acknowledged, so it is not in the session: the same history continues
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3},
                            headers={"x-session-id": sid})
        assert r.status_code == 200, r.text
        info = (await http.get(f"/v1/sessions/{sid}")).json()
    assert info["turns"] == 1 and info["tokens_seen"] == r.json()["usage"]["total_tokens"]


async def test_logprobs_in_openai_shapes_for_chat_and_completions(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    history = [{"role": "user", "content": "logprobs please"}]
    chat = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.token == (bytes(t.bytes).decode() if not t.token.startswith("bytes:") else
                           "bytes:" + "".join(f"\\x{b:02x}" for b in t.bytes))
    streamed = []
    stream = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=5, temperature=0,
                                                  logprobs=True, stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.top_logprobs) for t in streamed] == [(t.token, []) for t in content]
    done = await client.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0, logprobs=2,
                                           extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(2 <= len(top) <= 3 and top[tok] == pytest.approx(p) for tok, p, top in
               zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)), lp
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


async def test_logit_bias_and_seed_reach_the_sampler(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    history = [{"role": "user", "content": "say A"}]
    forced = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=6, logit_bias={"32": 100},
                                                  extra_body={"ignore_eos": True})  # token 32 is "A"
    assert forced.choices[0].message.content == "AAAAAA"
    same = [(await client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, seed=5, top_p=0.9,
                                                  extra_body={"ignore_eos": True})).choices[0].message.content
            for _ in range(2)]
    assert same[0] == same[1]


async def test_unsupported_openai_fields_are_a_400_naming_the_field(url):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url) as http:
        for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                             ("response_format", {"type": "json_object"}), ("top_logprobs", 2)]:
            r = await http.post("/v1/chat/completions", json={**chat, field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        for field, value in [("echo", True), ("suffix", "end"), ("best_of", 3)]:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = await http.post("/v1/chat/completions", json={**chat, "tools": [], "some_future_field": 1})
        assert r.status_code == 200  # empty tools ask for nothing; unknown fields are ignored


async def test_tokens_stream_in_fewer_messages_than_tokens(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go on"}],
                                                  max_tokens=60, temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    pieces, usage = 0, None
    async for chunk in stream:
        pieces += bool(chunk.choices)
        usage = chunk.usage or usage
    assert usage.completion_tokens == 60 and pieces < 30  # 50 ms stream batching merges tokens
