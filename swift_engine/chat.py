"""The terminal chat loop of `swiftserve chat`, one for both ways of running it: on the engine alone
(EngineChat, here) or on a running server (deployments/chat_client.py). Ctrl-C stops a reply and keeps
the conversation; the history is saved after every turn so `--session` can resume it."""
from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import SessionBusyError

if TYPE_CHECKING:  # the engine (torch) is imported by EngineChat only: `chat --url` never needs it
    from .config import EngineConfig
    from .sampling import SamplingParams

HISTORY_DIR = Path.home() / ".cache" / "swiftserve" / "chats"


class ChatError(Exception):
    """A turn that failed for a reason the user can act on; the message is one line."""


class ChatBackend(Protocol):
    def describe(self) -> str: ...

    def reply(self, history: list[dict]) -> Iterator[str]:
        """Stream the assistant's reply to the whole history (OpenAI style); raises ChatError."""


def history_path(session: str) -> Path:
    return HISTORY_DIR / f"{session.replace('/', '_')}.json"


def load_history(session: str, system: str | None) -> list[dict]:
    path = history_path(session)
    history = json.loads(path.read_text()) if path.is_file() else []
    if system and not history:
        history.append({"role": "system", "content": system})
    return history


def chat_loop(backend: ChatBackend, session: str, history: list[dict]) -> None:
    resumed = sum(m["role"] == "user" for m in history)
    print(f"{backend.describe()}; session {session}" + (f", resumed after {resumed} turns" if resumed else "") +
          ". Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D quits)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = _print_reply(backend, history)
        if reply is None:
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        HISTORY_DIR.mkdir(parents=True, exist_ok=True)
        history_path(session).write_text(json.dumps(history))


def _print_reply(backend: ChatBackend, history: list[dict]) -> str | None:
    """The reply as streamed (cut short by Ctrl-C), or None after an error (printed as one line)."""
    pieces: list[str] = []
    stream = backend.reply(history)
    print("bot> ", end="", flush=True)
    try:
        for piece in stream:
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    except ChatError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return None
    finally:
        stream.close()
    print()
    return "".join(pieces)


class EngineChat:
    """The engine in this process (no Ray, no server). A stopped reply drops the engine's session and
    the next turn re-feeds the kept history, since the engine's copy may hold part of the cut turn."""

    def __init__(self, config: EngineConfig, sampling: SamplingParams, session: str):
        from .engine.async_engine import StreamingEngine

        self.engine = StreamingEngine(config, progress=True)
        self.sampling, self.session, self.stale = sampling, session, False
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="chat-loop", daemon=True).start()

    def describe(self) -> str:
        return f"engine {self.engine.config.model} (cache {self.engine.config.cache_tokens} tokens)"

    def reply(self, history: list[dict]) -> Iterator[str]:
        if self.stale:
            self._drop()
        out: queue.Queue = queue.Queue()

        async def pump():
            try:
                async for ev in self.engine.generate(self.session, messages=history, sampling=self.sampling):
                    out.put(ev.text)
            except Exception as exc:  # noqa: BLE001 - shown as one line
                out.put(ChatError(f"{type(exc).__name__}: {exc}"))
            out.put(None)

        turn = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        self.stale = True
        try:
            while (item := out.get()) is not None:
                if isinstance(item, ChatError):
                    raise item
                yield item
            self.stale = False
        finally:
            turn.cancel()  # stopped (Ctrl-C) or failed: abort the engine's request

    def _drop(self) -> None:
        for _ in range(500):  # an aborted request ends at the engine's next step
            try:
                self.engine.drop(self.session)
                return
            except SessionBusyError:
                threading.Event().wait(0.01)

    def close(self) -> None:
        self.engine.shutdown()
