"""Autoscaling on cache occupancy and busy batch slots, not only ongoing requests.

A StreamingLLM replica is "full" long before its request queue says so: every
idle conversation still holds cache pages. Ray's default policy only sees
ongoing requests, so it would keep a replica whose cache is full and shed
replicas whose caches hold idle sessions (each removal costs re-prefills).
Occupancy counts live pages (routing.capacity, the router's definition too):
running sessions' pages and idle ones' weighted by age, down to none once they
age out (engine `idle_cache_ttl_s`), so the replica count follows live
conversations and comes back down when they go idle.

Replicas report two custom metrics via `record_autoscaling_stats`
(`autoscaling_stats` derives them from the routing stats dict), and
`CacheAwarePolicy` asks for enough replicas to keep every signal at its
target. Ray wraps the policy with min/max bounds, up/downscale delays and
scaling factors, so none of that is repeated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from routing.capacity import capacity

CACHE_OCCUPANCY = "cache_occupancy"  # live pages / total pages, per replica
RUNNING_FRACTION = "running_fraction"  # running / max_running, per replica


def autoscaling_stats(routing_stats: Mapping[str, Any]) -> dict[str, float]:
    """The custom autoscaling metrics of a replica, from its routing stats."""
    max_running = int(routing_stats.get("max_running", 0))
    return {
        CACHE_OCCUPANCY: capacity(routing_stats).occupancy,
        RUNNING_FRACTION: (
            int(routing_stats.get("running", 0)) / max_running
            if max_running > 0
            else 0.0
        ),
    }


def desired_replicas(
    occupancy: Mapping[Any, float],
    running: Mapping[Any, float],
    total_ongoing_requests: float,
    target_occupancy: float,
    target_running: float,
    target_ongoing_requests: float,
) -> float:
    """Replicas needed so each signal's per-replica average sits at its target.

    Sums over replicas: a replica that has not reported yet adds nothing
    (rather than blocking the decision), and a removed replica's load is
    counted on the survivors. The largest need wins; Ray rounds it up.
    """
    return max(
        sum(occupancy.values()) / target_occupancy,
        sum(running.values()) / target_running,
        total_ongoing_requests / target_ongoing_requests,
    )


class CacheAwarePolicy:
    """Custom policy for `autoscaling_config.policy` (Ray builds it once with
    `policy_kwargs` and calls it every control-loop tick)."""

    def __init__(
        self,
        target_cache_occupancy: float = 0.75,
        target_running_fraction: float = 0.75,
    ):
        if not (0 < target_cache_occupancy <= 1 and 0 < target_running_fraction <= 1):
            raise ValueError("targets must be in (0, 1]")
        self.target_cache_occupancy = target_cache_occupancy
        self.target_running_fraction = target_running_fraction

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        """ctx: ray.serve.config.AutoscalingContext. Returns (replicas, state)."""
        if ctx.current_num_replicas == 0:
            # Scale-from-zero is Ray's cold-start path; nothing to measure here.
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        return (
            desired_replicas(
                occupancy=metrics.get(CACHE_OCCUPANCY, {}),
                running=metrics.get(RUNNING_FRACTION, {}),
                total_ongoing_requests=ctx.total_num_requests,
                target_occupancy=self.target_cache_occupancy,
                target_running=self.target_running_fraction,
                target_ongoing_requests=ctx.config.get_target_ongoing_requests(),
            ),
            {},
        )
