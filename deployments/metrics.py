"""Ray (Prometheus) metrics of an LLMServer replica: counters for totals, histograms for latencies, gauges
for what is resident. Ray exports them with a `ray_` prefix (counters also get `_total`), labelled
`model` and `replica`. Counters and gauges exist at zero from start-up; Ray's exporter cannot show a
histogram before its first sample, so those appear with the first turn."""
from __future__ import annotations

from ray.util import metrics

_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
TAGS = ("model", "replica")
COMMIT_FAILURE_REASONS = ("StaleEpochError", "StoreUnavailableError", "StoreError")
# why a turn re-prefilled its session's cache: evicted here (page pressure or idle_cache_ttl_s) and rebuilt from
# the ids the engine kept; moved from another replica (claimed from the store); forgotten here and rebuilt from
# the store (the engine forgot the idle session, or dropped it after a failed step or an abandoned turn)
REPREFILL_CAUSES = ("evicted", "moved", "forgotten")


def _hist(name: str, doc: str) -> metrics.Histogram:
    return metrics.Histogram(name, doc, boundaries=_MS, tag_keys=TAGS)


def _counter(name: str, doc: str, *tags: str) -> metrics.Counter:
    return metrics.Counter(name, doc, tag_keys=(*TAGS, *tags))


def _gauge(name: str, doc: str) -> metrics.Gauge:
    return metrics.Gauge(name, doc, tag_keys=TAGS)


class ServerMetrics:
    def __init__(self, model: str, replica: str):
        self.ttft = _hist("swiftserve_ttft_ms", "time to first token")
        self.itl = _hist("swiftserve_inter_token_ms", "time between streamed tokens")
        self.reprefill_ms = metrics.Histogram("swiftserve_reprefill_ms", "re-prefill duration, by cause",
                                              boundaries=_MS, tag_keys=(*TAGS, "cause"))
        self.commit_ms = _hist("swiftserve_commit_ms", "store commit latency")
        self.tokens = _counter("swiftserve_generated_tokens", "generated tokens")
        self.reprefills = _counter("swiftserve_reprefills", "caches rebuilt (re-prefilled), by cause", "cause")
        self.claims = _counter("swiftserve_session_claims", "sessions claimed from another owner")
        self.evictions = _counter("swiftserve_cache_evictions", "idle sessions evicted from the cache (LRU)")
        self.commit_failures = _counter("swiftserve_commit_failures", "turns not committed", "reason")
        self.resident = _gauge("swiftserve_sessions_resident", "sessions whose cache is resident")
        self.host = _gauge("swiftserve_sessions_host", "sessions whose cache pages are in the host tier")
        self.ids_only = _gauge("swiftserve_sessions_ids_only", "sessions holding retained ids only")
        self.host_bytes = _gauge("swiftserve_host_cache_bytes_used", "host tier bytes in use")
        self.running = _gauge("swiftserve_sessions_running", "sessions running a turn")
        self.pages_used = _gauge("swiftserve_cache_pages_used", "KV cache pages in use")
        self.pages_total = _gauge("swiftserve_cache_pages_total", "KV cache pages in the pool")
        self.pages_shared = _gauge("swiftserve_cache_pages_shared", "KV pages saved by sharing pinned prompts")
        self._evictions_seen = 0
        counters = (self.tokens, self.claims, self.evictions)
        gauges = (self.resident, self.host, self.ids_only, self.host_bytes, self.running, self.pages_used,
                  self.pages_total, self.pages_shared)
        for m in (self.ttft, self.itl, self.reprefill_ms, self.commit_ms, self.commit_failures, self.reprefills,
                  *counters, *gauges):
            m.set_default_tags({"model": model, "replica": replica})
        for counter in counters:
            counter._record(0)  # Counter.inc refuses 0; a series at zero lets rate() and alerts work at once
        for reason in COMMIT_FAILURE_REASONS:
            self.commit_failures._record(0, tags={"reason": reason})
        for cause in REPREFILL_CAUSES:
            self.reprefills._record(0, tags={"cause": cause})
        for gauge in gauges:
            gauge.set(0)

    def commit_failed(self, exc: Exception) -> None:
        reason = type(exc).__name__
        self.commit_failures.inc(tags={"reason": reason if reason in COMMIT_FAILURE_REASONS else "StoreError"})

    def reprefilled(self, seconds: float, cause: str) -> None:
        self.reprefills.inc(tags={"cause": cause})
        self.reprefill_ms.observe(1000 * seconds, tags={"cause": cause})

    def engine_state(self, stats) -> None:
        """Gauges from the engine's stats, and evictions as a counter (the engine keeps a running total)."""
        self.resident.set(stats.sessions_resident)
        self.host.set(stats.sessions_host)
        self.ids_only.set(stats.sessions_ids_only)
        self.host_bytes.set(stats.host_cache_bytes_used)
        self.running.set(stats.sessions_running)
        self.pages_used.set(stats.pages_used)
        self.pages_total.set(stats.pages_total)
        self.pages_shared.set(stats.pages_shared)
        if stats.evictions > self._evictions_seen:
            self.evictions.inc(stats.evictions - self._evictions_seen)
            self._evictions_seen = stats.evictions
