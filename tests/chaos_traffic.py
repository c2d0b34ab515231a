"""Chat traffic for chaos runs: conversations through the real openai client that log every attempt.

Each conversation resends its whole history every turn and retries a failed turn with the same history
(an error means "not acknowledged"; resending the same turn is always safe). What the runs count comes
from the log: failed attempts and when, history mismatches (the store lost an acknowledged turn), and
per conversation the turns acknowledged, to compare with the store's record.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import openai

from tests.serve_utils import stream_turn


@dataclass
class Attempt:
    sid: str
    start: float  # time.monotonic()
    end: float
    ok: bool
    error: str = ""  # "<kind>: <message>", kind the API's error type (store_unavailable, ...) or the exception's
    replica: str = ""  # the LLMServer replica that answered (x-swiftserve-replica)
    reprefill_ms: float | None = None  # the session's cache was rebuilt from the store for this turn


@dataclass
class Traffic:
    """Conversations running turns back to back until ``stop``; every attempt lands in ``attempts``."""

    client: openai.AsyncOpenAI
    sessions: int
    prefix: str = "chaos"
    attempts: list[Attempt] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.convs = [Conversation(self, f"{self.prefix}-{i}") for i in range(self.sessions)]

    async def run(self) -> None:
        await asyncio.gather(*[c.loop() for c in self.convs])

    async def final_round(self, deadline_s: float = 120.0) -> None:
        """One more turn each after the faults: every conversation continues."""
        await asyncio.gather(*[c.turn(deadline_s) for c in self.convs])

    def failures(self, since: float, until: float) -> list[Attempt]:
        return [a for a in self.attempts if not a.ok and since <= a.end <= until]

    def acknowledged(self, since: float, until: float) -> list[Attempt]:
        return [a for a in self.attempts if a.ok and since <= a.end <= until]

    def mismatches(self) -> list[Attempt]:
        return [a for a in self.attempts if a.error.startswith("history_mismatch")]


class Conversation:
    def __init__(self, traffic: Traffic, sid: str) -> None:
        self.traffic, self.sid = traffic, sid
        self.history: list[dict] = []
        self.turns = 0

    async def loop(self) -> None:
        while not self.traffic.stop.is_set():
            await self.turn(deadline_s=60.0)

    async def turn(self, deadline_s: float) -> None:
        self.history.append({"role": "user", "content": f"turn {self.turns} of {self.sid}"})
        start = time.monotonic()
        while True:
            if await self._attempt():
                return
            if time.monotonic() - start > deadline_s:
                errors = [a.error for a in self.traffic.attempts if a.sid == self.sid and not a.ok][-3:]
                raise AssertionError(f"{self.sid}: turn {self.turns} failed for {deadline_s}s: {errors}")
            await asyncio.sleep(0.2)

    async def _attempt(self) -> bool:
        start = time.monotonic()
        try:
            headers, text, usage = await stream_turn(self.traffic.client, self.sid, self.history, max_tokens=4)
        except (openai.APIError, httpx.HTTPError) as exc:
            body = getattr(exc, "body", None)
            kind = (body.get("type") if isinstance(body, dict) else None) or type(exc).__name__
            message = body.get("message") if isinstance(body, dict) else str(exc)
            self._log(start, False, f"{kind}: {message}")
            return False
        if usage is None:
            self._log(start, False, "stream ended without a final chunk")
            return False
        self.history.append({"role": "assistant", "content": text})
        self.turns += 1
        reprefill = headers.get("x-swiftserve-reprefill-ms")
        self.traffic.attempts.append(Attempt(self.sid, start, time.monotonic(), True,
                                             replica=headers.get("x-swiftserve-replica", ""),
                                             reprefill_ms=float(reprefill) if reprefill else None))
        return True

    def _log(self, start: float, ok: bool, error: str = "") -> None:
        self.traffic.attempts.append(Attempt(self.sid, start, time.monotonic(), ok, error[:300]))
