"""A replica decides "no restore" from its engine's last report; the engine may forget that idle session
before the turn reaches it. The engine then refuses the turn (require_session) and the replica rebuilds the
session from the store and runs the turn: it neither fails nor starts the conversation over.

The race is made certain on the simulator (load_format: simulated) with a step table whose long prefill
step takes 6 s: session C's submit forgets A (evicted to ids only, max_idle_sessions 0) and its step holds
back the report, while A's next turn is decided and submitted (real Ray Serve app, openai client over HTTP).
"""
import asyncio
import json
from pathlib import Path

import openai
import pytest

from benchmarks import serve_load as load
from deployments.app import app_from_config
from tests.redis_server import free_port
from tests.serve_utils import stream_turn

pytestmark = [pytest.mark.ray]

SIM = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_sim.yaml"
MODEL = "swiftserve-llama-7m"
SLOW_PREFILL_S = 6.0  # one step of 256 prefill tokens; short prompts (< 64 tokens) take ~5 ms


def slow_prefill_table(path: Path) -> str:
    table = json.loads((Path(load.__file__).parents[1] / "swift_engine/models/step_tables/llama3-8b-h200.json")
                       .read_text())
    table["decode"] = {"x": [1, 64], "ms": [2.0, 2.0]}
    table["prefill"] = {"x": [1, 64, 256], "ms": [2.0, 3.0, 1000 * SLOW_PREFILL_S]}
    path.write_text(json.dumps(table))
    return str(path)


@pytest.fixture
def app(ray_local, tmp_path):
    from ray import serve

    engine = [f"simulated.step_table={slow_prefill_table(tmp_path / 'slow_prefill.json')}",
              "simulated.vocab_size=4096", "window_tokens=60", "page_size=16", "num_pages=23",
              "max_batch_tokens=256", "max_idle_sessions=0"]
    _, update = load.local_args(SIM, MODEL, engine)
    app, _ = app_from_config(SIM, update)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="swiftserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_a_session_forgotten_after_the_replica_looked_is_rebuilt_not_restarted(app):
    client = openai.AsyncOpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0)
    _, a1, _ = await stream_turn(client, "a", say("hello there"), max_tokens=3, model=MODEL)
    await stream_turn(client, "b", say("another one"), max_tokens=3, model=MODEL)  # evicts a to its ids
    long_turn = asyncio.create_task(stream_turn(client, "c", say(" ".join(f"w{i}" for i in range(120))),
                                                max_tokens=3, model=MODEL))  # its submit forgets a
    # c's submit has reached the engine (a loaded 2-core box: up to ~1 s) and its first prefill step runs:
    # a's forgetting is not reported before that step ends
    await asyncio.sleep(SLOW_PREFILL_S / 4)
    a_history = say("hello there") + [{"role": "assistant", "content": a1}] + say("and again")
    headers, a2, usage = await stream_turn(client, "a", a_history, max_tokens=3, model=MODEL)
    assert headers["x-swiftserve-reprefill-cause"] == "forgotten"  # rebuilt from the store, not started new
    assert usage is not None and usage.completion_tokens == 3
    again, _, _ = await stream_turn(client, "a", a_history + [{"role": "assistant", "content": a2}] + say("more"),
                                    max_tokens=3, model=MODEL)
    assert "x-swiftserve-reprefill-cause" not in again  # resident again, its history accepted as it stands
    _, _, c_usage = await long_turn
    assert c_usage is not None and c_usage.completion_tokens == 3
