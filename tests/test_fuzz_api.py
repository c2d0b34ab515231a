"""Fuzzing: schemathesis against the running app's own OpenAPI schema, hypothesis against the request models."""
import os
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from deployments.openai_schema import SESSION_ID_MAX, ChatCompletionRequest, CompletionRequest
from deployments.sampling_defaults import OPENAI_DEFAULTS
from swift_engine.sampling import Sampler
from tests.serve_utils import TINY_MODEL_ID as MODEL, running_app


KEY = "fuzz-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("SWIFTSERVE_FUZZ_EXAMPLES", "20"))  # per operation and mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def url(ray_local, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"fuzz:{KEY}\n")
    update = {"api_keys_file": str(keys), "max_completion_tokens": 16,
              "limits": {"max_request_bytes": 65536, "max_messages": 64, "rate_limit_per_s": None}}
    with running_app(args_update=update) as base:
        yield base


@pytest.mark.ray
def test_schemathesis_finds_no_server_error_and_the_app_still_serves(url):
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH, timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    seen: Counter[tuple[str, int]] = Counter()
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/sessions/{session_id}"}
    for op in operations:
        fuzzable = len(op.body) > 0 or len(op.path_parameters) > 0  # else no invalid request can be made
        for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * fuzzable:
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                # Ray Serve's proxy (2.60) decodes x-session-id as UTF-8 before our code runs: other bytes get
                # its plain-text 500 (an upstream bug, see README Security); the app never sees them
                assume(all(value.isascii() for value in (case.headers or {}).values()))
                if isinstance(case.body, dict) and "model" in case.body and sum(seen.values()) % 4:
                    case.body["model"] = MODEL  # 3 in 4 name the served model, so that turns run
                response = case.call(base_url=url, headers=AUTH, timeout=60)
                seen[op.path, response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            try:
                call()
            except Unsatisfiable:  # a path parameter that takes any string (a model id) has no invalid value
                if mode is GenerationMode.POSITIVE or len(op.body) > 0:
                    raise
    assert seen["/v1/chat/completions", 200] and seen["/v1/completions", 200]  # turns did run
    body = {"model": MODEL, "max_tokens": 3, "ignore_eos": True,  # sampled: an end-of-turn could come first
            "messages": [{"role": "user", "content": "still there?"}]}
    ok = httpx.post(url + "/v1/chat/completions", json=body, headers={**AUTH, "x-session-id": "after-fuzz"},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    # what it found: a subnormal top_p or temperature failed the replica's whole batch (500 for everyone), and a
    # seed beyond 64 bits failed the turn (500, and the ingress retried it)
    for extreme, status in [({"top_p": 5e-324}, 200), ({"temperature": 1e-320}, 200),
                            ({"temperature": 2.0, "top_p": 1e-300}, 200), ({"seed": 2**64}, 400)]:
        r = httpx.post(url + "/v1/chat/completions", json={**body, **extreme}, headers=AUTH, timeout=60)
        assert r.status_code == status, (extreme, r.text)


# ---- the request models alone --------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                           "content": st.text(max_size=40)}), min_size=1, max_size=5)
valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": messages},
    optional={"max_tokens": st.integers(1, 10**6), "temperature": st.floats(0, 2),
              "top_p": st.floats(0, 1, exclude_min=True),
              "top_k": st.integers(0, 1000), "seed": st.integers(-2**63, 2**63 - 1), "stream": st.booleans(),
              "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4) | st.text(min_size=1, max_size=5),
              "session_id": st.text(st.characters(min_codepoint=32, exclude_characters="\x7f"), min_size=1,
                                    max_size=SESSION_ID_MAX),
              "logprobs": st.booleans(), "ignore_eos": st.booleans(), "unknown_field": json_values,
              "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
              "repetition_penalty": st.floats(0, 10, exclude_min=True),
              "logit_bias": st.dictionaries(st.integers(0, 63), st.floats(-100, 100), max_size=3),
              "tools": st.just([]), "response_format": st.just({"type": "text"})})


@settings(max_examples=200, deadline=None)
@given(valid_chat, st.integers(0, 2**32 - 1))
def test_valid_chat_bodies_make_sampling_the_engine_can_run(body, logits_seed):
    req = ChatCompletionRequest.model_validate(body)
    params = req.sampling({**OPENAI_DEFAULTS, "max_tokens": 256})
    assert params.max_tokens == body.get("max_tokens", 256)
    assert len(params.stop) <= 4 and len(req.messages) == len(body["messages"])
    logits = 30 * torch.randn(2, 64, generator=torch.Generator().manual_seed(logits_seed))
    sampler = Sampler(64, torch.device("cpu"))
    rows = [SimpleNamespace(sampling=params, output_ids=[3] * i, seed=0, logit_state=None) for i in range(2)]
    for r in rows:
        sampler.prepare(r)
    ids = sampler.sample(logits, rows, context=lambda r: [1, 2]).ids
    assert all(0 <= i < 64 for i in ids)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n",
                                        "stop", "session_id", "stream_options", "logprobs"]), json_values))
def test_arbitrary_bodies_parse_or_raise_validation_error(body):
    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            req = model.model_validate(body)
        except ValidationError:
            continue
        req.sampling({**OPENAI_DEFAULTS, "max_tokens": 16})  # whatever parses makes valid sampling parameters


@settings(max_examples=100, deadline=None)
@given(valid_chat, st.sampled_from([("temperature", 2.5), ("top_p", 0), ("n", 2), ("max_tokens", 0),
                                    ("stop", ["a", "b", "c", "d", "e"]), ("session_id", ""),
                                    ("session_id", "x" * (SESSION_ID_MAX + 1)), ("session_id", "a\nb"),
                                    ("messages", []), ("messages", [{"role": "robot", "content": "x"}]),
                                    ("messages", [{"role": "user", "content": "\ud800"}]), ("stop", "\udc00"),
                                    ("session_id", "\udbff"), ("seed", 2**63), ("seed", -2**63 - 1),
                                    ("logit_bias", {"5": 101}), ("presence_penalty", 2.5), ("min_p", 1.5),
                                    ("top_logprobs", 21), ("tools", [{"type": "function"}]),
                                    ("response_format", {"type": "json_object"}), ("tool_choice", "auto")]))
def test_out_of_range_fields_are_rejected(body, bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**body, bad[0]: bad[1]})
