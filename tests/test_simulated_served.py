"""Served-path regression on the simulator (load_format: simulated, docs/load-simulator.md): a short steady
load through Ray + HTTP + the openai client beside the engine alone on the same turns, in one test. It fails
when the served path regressed badly, not on the noise of a loaded 2-core box (bounds from measured runs)."""
import asyncio
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from ray import serve

from benchmarks import serve_load as load
from deployments.app import app_from_config
from deployments.config import AppArgs
from swift_engine import StreamingEngine
from tests.redis_server import free_port

pytestmark = pytest.mark.ray

SIM = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_sim.yaml"
# the bundled 7M model's tokenizer (4,096 ids) and logits as wide: the CPU sampler stays a small share of a step
ENGINE_SET = ["simulated.vocab_size=4096"]
WORK = load.Workload(conversations=8, turns=4, rate=math.inf, think_s=0.1, user_words=12, seed=0, warmup_s=1.5,
                     duration_s=12.0, grace_s=5.0)
ROUNDS = 2  # served and engine alone alternate: 2 rounds of 6 s measured each
GREEDY = {"greedy": {"max_tokens": 16, "temperature": 0.0, "seed": 0, "ignore_eos": True}}
# measured on the 2-core dev box at load 14 (docs/load-simulator.md): tok/s 0.73, TPOT p50 1.21x
MIN_TOKENS_RATIO = 0.4
MAX_TPOT_RATIO = 3.0


@contextmanager
def app_and_engine(update: dict, app_args: dict):
    """The simulator's app on the session's Ray (a free port) and the same engine alone in this process."""
    app, _ = app_from_config(SIM, update)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    threads = torch.get_num_threads()
    engine = None
    try:
        serve.run(app, name="swiftserve", route_prefix="/")
        torch.set_num_threads(load.replica_threads(SIM))  # the replica's engine is no wider
        engine = StreamingEngine(AppArgs.model_validate(app_args).engine, progress=False)
        yield f"http://127.0.0.1:{port}", engine
    finally:
        if engine is not None:
            engine.shutdown()
        torch.set_num_threads(threads)
        serve.shutdown()


def test_the_served_path_keeps_up_with_the_engine_alone(ray_local):
    app_args, update = load.local_args(SIM, "swiftserve-llama-7m", ENGINE_SET)
    with app_and_engine(update, app_args) as (url, engine):  # interleaved: the host's swings hit both
        runs = asyncio.run(load.measure_http(url, app_args["model_id"], WORK, GREEDY, True, engine, ROUNDS))
    served, alone = (load.summarize(runs["greedy"][path]) for path in ("served", "engine alone"))
    assert served["errors"] == 0 and alone["errors"] == 0, (served["error_samples"], alone["error_samples"])
    assert served["turns"] >= WORK.conversations and alone["turns"] >= WORK.conversations
    ratios = load.ratios(served, alone)
    print("served / engine alone:", {k: round(v, 2) for k, v in ratios.items()})
    assert ratios["tokens_per_s"] >= MIN_TOKENS_RATIO, ratios
    assert ratios["tpot_ms_p50"] <= MAX_TPOT_RATIO, ratios
