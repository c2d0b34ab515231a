"""Start the real Serve app (local config) on a free port for integration tests."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ray import serve

from deployments.app import app_from_config
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def running_app(config_path: Path = ROOT / "configs" / "local.yaml", args_update: dict | None = None):
    """serve.run the config's app (args updated) on a free port; yields the base URL."""
    app, _ = app_from_config(config_path, args_update)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="swiftserve", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


async def stream_turn(client, sid: str, history: list[dict], max_tokens: int = 6, model: str = "swiftserve-tiny"):
    """Stream one greedy chat turn with the openai client; returns (headers, text, usage or None)."""
    async with client.chat.completions.with_streaming_response.create(
            model=model, messages=history, stream=True, max_tokens=max_tokens, temperature=0.0,
            stream_options={"include_usage": True}, extra_headers={"x-session-id": sid}) as resp:
        text, usage = [], None
        async for chunk in await resp.parse():
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
    return resp.headers, "".join(text), usage
