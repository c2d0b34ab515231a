"""Long prompts on a replica: its measured prefill rate, a refusal up front for a prompt that cannot be
prefilled within the request timeout, and log lines while a long prefill runs.

A 100k-character prompt took minutes on a CPU with no word until the first token, or until the proxy
cut it at its request timeout. The engine reports no per-request prefill progress, so the rate is
measured here, from each long turn's new prompt tokens over its time to the first token (which also
holds the turn's wait in the queue: an estimate on the slow side, so a refusal is never optimistic
about a busy replica)."""
from __future__ import annotations

import asyncio
import logging
import time

from swift_engine import InvalidRequestError

MEASURED_FROM = 256   # new prompt tokens: shorter turns' time to first token is mostly fixed costs
LOGGED_FROM_S = 10.0  # prefills expected to take longer are announced, and reported every PERIOD_S
PERIOD_S = 15.0
WEIGHT = 0.3          # of the newest measurement in the moving average

log = logging.getLogger("ray.serve")


class PrefillWatch:
    def __init__(self, request_timeout_s: float | None):
        self.timeout_s = request_timeout_s
        self.rate: float | None = None  # prompt tokens/s, once a long turn was measured

    def estimate_s(self, tokens: int) -> float | None:
        return tokens / self.rate if self.rate else None

    def check(self, tokens: int) -> None:
        """Refuse (InvalidRequestError: a 400) a prompt whose prefill would outlast the request timeout."""
        seconds = self.estimate_s(tokens)
        if self.timeout_s is None or seconds is None or seconds <= self.timeout_s:
            return
        raise InvalidRequestError(
            f"the prompt adds {tokens:,} tokens: at this replica's measured prefill rate ({self.rate:.0f} "
            f"tokens/s) that takes about {seconds:.0f} s, past the request timeout ({self.timeout_s:g} s); "
            "send a shorter prompt, or raise http_options.request_timeout_s")

    def start(self, sid: str, tokens: int) -> "Prefill":
        return Prefill(self, sid, tokens)

    def measured(self, tokens: int, seconds: float) -> None:
        if tokens >= MEASURED_FROM and seconds > 0:
            rate = tokens / seconds
            self.rate = rate if self.rate is None else (1 - WEIGHT) * self.rate + WEIGHT * rate


class Prefill:
    """One turn's prefill: logged while it runs if it is long, measured when its first token comes."""

    def __init__(self, watch: PrefillWatch, sid: str, tokens: int):
        self.watch, self.sid, self.tokens = watch, sid, tokens
        self.start = time.monotonic()
        estimate = watch.estimate_s(tokens)
        self.reporter = None
        if tokens >= MEASURED_FROM and (estimate is None or estimate >= LOGGED_FROM_S):
            self.reporter = asyncio.get_running_loop().create_task(self._report(estimate))

    async def _report(self, estimate: float | None) -> None:
        about = f", about {estimate:.0f} s at {self.watch.rate:.0f} tokens/s" if estimate else ""
        log.info("prefilling %s new prompt tokens of session %s%s", f"{self.tokens:,}", self.sid, about)
        while True:
            await asyncio.sleep(PERIOD_S)
            elapsed = time.monotonic() - self.start
            left = f", about {max(estimate - elapsed, 0):.0f} s left" if estimate else ""
            log.info("still prefilling session %s: %.0f s so far%s", self.sid, elapsed, left)

    def first_token(self) -> None:
        """The prefill is over: stop reporting, and learn the rate from it."""
        seconds = time.monotonic() - self.start
        self.watch.measured(self.tokens, seconds)
        if self.reporter is not None:
            log.info("prefilled %s tokens of session %s in %.1f s", f"{self.tokens:,}", self.sid, seconds)
        self.stop()

    def stop(self) -> None:
        if self.reporter is not None:
            self.reporter.cancel()
            self.reporter = None
