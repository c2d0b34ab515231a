"""`SessionAffinityRouter`: Ray Serve's RequestRouter API over routing.affinity.

Enable it per deployment with
`RequestRouterConfig(request_router_class=SessionAffinityRouter,
request_routing_stats_period_s=...)`; the deployment must define
`record_routing_stats()` returning the dict described in routing.affinity.
Ray's controller polls that method and hands the dict to every router as
`RunningReplica.routing_stats`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from ray.util import metrics

from routing.affinity import Candidate, Kind, decide

logger = logging.getLogger(__name__)

DEFAULT_RECENT_TTL_S = 30.0


class RecentPlacements:
    """Where this router sent each session lately: bounded LRU, entries expire.

    Covers the gap until the replica's stats report the session (one stats
    period plus controller lag); after that, stats are the truth.
    """

    def __init__(self, ttl_s: float, max_entries: int = 65536):
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, session_id: str, now: float) -> str | None:
        entry = self._entries.get(session_id)
        if entry is None or now - entry[1] > self._ttl_s:
            return None
        return entry[0]

    def put(self, session_id: str, replica_id: str, now: float) -> None:
        self._entries[session_id] = (replica_id, now)
        self._entries.move_to_end(session_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class SessionAffinityRouter(RequestRouter):
    """Keeps each session on the replica that holds its cache.

    Backoff has two sources, both ending in "retry the same replica later":
    the holder's stats say every batch slot is busy (we return no candidate),
    or Ray's own probe finds it at `max_ongoing_requests` (it rejects). With
    `should_backoff` set, Ray sleeps with exponential backoff between rounds
    (`initial_backoff_s`, `backoff_multiplier`, `max_backoff_s` of the
    RequestRouterConfig) and calls `choose_replicas` again with fresh stats.

    `request_router_kwargs`: `recent_ttl_s` (default 30) is how long this
    router trusts its memory of where it sent a session while no stats show
    a holder yet; keep it well above `request_routing_stats_period_s`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decisions = _decision_counter(
            app=self._deployment_id.app_name, deployment=self._deployment_id.name
        )

    def initialize_state(self, recent_ttl_s: float = DEFAULT_RECENT_TTL_S) -> None:
        """Called by Ray with `request_router_kwargs`."""
        self._recent = RecentPlacements(recent_ttl_s)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        session_id = pending_request.metadata.session_id if pending_request else None
        now = time.monotonic()
        decision = decide(
            session_id,
            [Candidate(rid, r.routing_stats or {}) for rid, r in by_id.items()],
            recent=self._recent.get(session_id, now) if session_id else None,
            pinned=_pinned_key(pending_request),
        )
        self._count(decision.kind)
        if session_id and decision.kind in (Kind.OWNER, Kind.RING):
            self._recent.put(session_id, decision.replica_ids[0], now)
        if pending_request is not None:
            # Without it Ray re-asks immediately, spinning on a busy owner.
            pending_request.routing_context.should_backoff = True

        if decision.kind is Kind.BACKOFF:
            return []
        if decision.kind is Kind.FALLBACK:
            # One rank: Ray picks the shortest queue among them (ties: our order).
            return [[by_id[rid] for rid in decision.replica_ids]]
        # A single rank of a single replica: never spill to another replica.
        return [[by_id[rid]] for rid in decision.replica_ids]

    def _count(self, kind: Kind) -> None:
        if self._decisions is not None:
            self._decisions.inc(tags={"decision": kind.value})


def _pinned_key(pending_request: PendingRequest | None) -> str | None:
    """The request's `pinned_key` (deployments.protocol.ChatRequest), when its first argument has one."""
    args = pending_request.args if pending_request is not None else ()
    return getattr(args[0], "pinned_key", None) if args else None


def _decision_counter(app: str, deployment: str) -> metrics.Counter | None:
    """Decision counter, or None where Ray metrics are unavailable (bare process).

    Telemetry must never break routing, hence the broad guard.
    """
    try:
        counter = metrics.Counter(
            "swiftserve_routing_decisions",
            description="Session-affinity routing decisions by kind.",
            tag_keys=("decision", "application", "deployment"),
        ).set_default_tags({"application": app, "deployment": deployment})
        for kind in Kind:  # every series from start-up, at zero (Counter.inc refuses 0)
            counter._record(0, tags={"decision": kind.value})
        return counter
    except Exception:
        logger.warning("routing decision metrics disabled", exc_info=True)
        return None
