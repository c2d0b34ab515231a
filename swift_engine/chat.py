"""Interactive terminal chat on the engine alone (no Ray, no server): `swiftserve chat --model ...`."""
from __future__ import annotations

import asyncio
import sys

from .config import EngineConfig
from .engine.async_engine import StreamingEngine
from .sampling import SamplingParams


async def chat_loop(engine: StreamingEngine, sampling: SamplingParams, session_id: str = "terminal") -> None:
    history: list[dict] = []
    print("swiftserve chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = await asyncio.to_thread(input, "you> ")
        except EOFError:
            return
        if not line.strip():
            return
        history.append({"role": "user", "content": line})
        reply = []
        print("bot> ", end="", flush=True)
        async for ev in engine.generate(session_id, messages=history, sampling=sampling):
            print(ev.text, end="", flush=True)
            reply.append(ev.text)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
        snap = engine.snapshot(session_id)
        print(f"[{snap.tokens_seen} tokens seen, cache <= {engine.config.cache_tokens}]", file=sys.stderr)


def run_chat(config: EngineConfig, sampling: SamplingParams) -> None:
    engine = StreamingEngine(config, progress=True)
    try:
        asyncio.run(chat_loop(engine, sampling))
    finally:
        engine.shutdown()
