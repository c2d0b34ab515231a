"""Per-tenant request limits of one ingress replica: a token-bucket rate and requests in flight."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from .config import Limits


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; each request takes one."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is one (nothing taken)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class TenantLimiter:
    """Rate and concurrency limits per tenant (tenants come from the key list: a bounded set)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self.buckets: dict[str, TokenBucket] = {}
        self.in_flight: dict[str, int] = {}

    def retry_after(self, tenant: str) -> int:
        """0 if the tenant may send this request now (it is counted), else whole seconds to wait."""
        if self.limits.rate_limit_per_s is None:
            return 0
        now = self.clock()
        bucket = self.buckets.setdefault(
            tenant, TokenBucket(self.limits.rate_limit_per_s, self.limits.rate_limit_burst, now))
        wait = bucket.take(now)
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def enter(self, tenant: str) -> bool:
        """Count one more request of the tenant in flight; False (not counted) if it has the most it may."""
        if self.in_flight.get(tenant, 0) >= self.limits.max_concurrent_requests:
            return False
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        return True

    def leave(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1
