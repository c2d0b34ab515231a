"""The Serve app with a TP = 2 LLMServer replica (real local Ray, placement group bundles of CPUs,
the real openai client over HTTP): it answers a conversation exactly as a one-rank engine does."""
import openai
import pytest
import ray
from ray import serve

from deployments.app import compose_app
from swift_engine import EngineConfig, StreamingEngine
from tests.redis_server import free_port
from tests.serve_utils import TINY_MODEL_ID, local_app_spec

pytestmark = pytest.mark.ray
GREEDY = dict(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def tp_url(ray_local):
    spec = local_app_spec()
    args = {**spec["args"], "engine": {**spec["args"]["engine"], "tensor_parallel_size": 2}}
    overrides = {d.pop("name"): d for d in spec["deployments"]}
    overrides["LLMServer"].update(  # one replica over 2 ranks; the CPU "bundles" reserve CPUs, not GPUs
        num_replicas=1, ray_actor_options={"num_cpus": 0.25}, placement_group_strategy="STRICT_PACK",
        placement_group_bundles=[{"CPU": 0.25}, {"CPU": 0.25}])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose_app(args, overrides), name="swiftserve", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", args["engine"]
    finally:
        serve.shutdown()


def test_a_tp2_replica_answers_as_one_rank(tp_url):
    url, engine_args = tp_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    one_rank = StreamingEngine(EngineConfig(**{**engine_args, "tensor_parallel_size": 1}), progress=False)
    try:
        history = []
        for turn in ("hello there", "and a second turn"):
            history.append({"role": "user", "content": turn})
            resp = client.chat.completions.create(model=TINY_MODEL_ID, messages=history, **GREEDY,
                                                  extra_headers={"x-session-id": "tp-conv"},
                                                  extra_body={"ignore_eos": True})
            events = one_rank.generate_sync("ref", messages=history, sampling={**GREEDY, "ignore_eos": True})
            expected = "".join(ev.text for ev in events)
            assert resp.choices[0].message.content == expected and resp.usage.completion_tokens == 8
            history.append({"role": "assistant", "content": expected})
    finally:
        one_rank.shutdown()
    stats = serve.get_deployment_handle("LLMServer", app_name="swiftserve").engine_stats.remote().result()
    assert stats["sessions_resident"] == 1
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [list(g["bundles"].values()) for g in groups] == [[{"CPU": 0.25}, {"CPU": 0.25}]]  # one replica, 2 ranks
