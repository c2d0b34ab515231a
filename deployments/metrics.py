"""Ray (Prometheus) metrics of a replica. Created once per process."""
from __future__ import annotations

from functools import cache

from ray.util import metrics

_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


@cache
def server_metrics() -> dict:
    return {
        "ttft": metrics.Histogram("swiftserve_ttft_ms", "time to first token", boundaries=_MS),
        "itl": metrics.Histogram("swiftserve_inter_token_ms", "inter-token latency", boundaries=_MS),
        "tokens": metrics.Counter("swiftserve_generated_tokens", "generated tokens"),
        "tokens_per_s": metrics.Gauge("swiftserve_tokens_per_s", "engine generated tokens per second"),
        "resident": metrics.Gauge("swiftserve_sessions_resident", "sessions whose cache is resident"),
        "pages_used": metrics.Gauge("swiftserve_cache_pages_used", "KV pages in use"),
        "evictions": metrics.Gauge("swiftserve_cache_evictions", "idle sessions evicted (LRU), total"),
        "reprefills": metrics.Counter("swiftserve_reprefills", "caches rebuilt from the store"),
        "reprefill_ms": metrics.Histogram("swiftserve_reprefill_ms", "re-prefill duration", boundaries=_MS),
        "claims": metrics.Counter("swiftserve_session_claims", "sessions claimed from another owner"),
        "commit_ms": metrics.Histogram("swiftserve_commit_ms", "store commit latency", boundaries=_MS),
        "commit_failures": metrics.Counter("swiftserve_commit_failures", "turns not committed",
                                           tag_keys=("reason",)),
    }
