"""Start the real Serve app (local config) on a free port for integration tests."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml
from ray import serve

from deployments.app import app_from_config
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "configs" / "local.yaml"
TINY_MODEL_ID = "swiftserve-tiny"


def local_app_spec() -> dict:
    """The local config's application with the tiny random-weight model in place of SmolLM2:
    serving tests exercise serving, and the tiny model keeps them fast on 2 cores."""
    spec = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]
    spec["args"]["model_id"] = TINY_MODEL_ID
    spec["args"]["engine"]["model"] = "tiny"
    return spec


@contextmanager
def running_app(args_update: dict | None = None, tiny: bool = True):
    """serve.run the local app (tiny model unless `tiny=False`, args updated) on a free port; yields the base URL."""
    model = {k: local_app_spec()["args"][k] for k in ("model_id", "engine")} if tiny else {}
    app, _ = app_from_config(LOCAL_CONFIG, {**model, **(args_update or {})})
    port = free_port()
    try:  # a deploy that fails (or a test interrupted while it waits) still tears down what started
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="swiftserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


async def stream_turn(client, sid: str, history: list[dict], max_tokens: int = 6, model: str = TINY_MODEL_ID,
                      final: dict | None = None):
    """Stream one greedy chat turn with the openai client; returns (headers, text, usage or None).
    `final`, if given, receives the fields swiftserve adds to the final chunk (durable, reprefill)."""
    async with client.chat.completions.with_streaming_response.create(
            model=model, messages=history, stream=True, max_tokens=max_tokens, temperature=0.0,
            stream_options={"include_usage": True}, extra_headers={"x-session-id": sid}) as resp:
        text, usage = [], None
        async for chunk in await resp.parse():
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                if chunk.choices[0].finish_reason is not None and final is not None:
                    final.update(chunk.model_extra or {})
            if chunk.usage:
                usage = chunk.usage
    return resp.headers, "".join(text), usage
