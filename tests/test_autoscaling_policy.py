"""CacheAwarePolicy decisions (deployments.autoscaling), against Ray's own types."""

from __future__ import annotations

import math

import pytest
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import (
    CACHE_OCCUPANCY,
    RUNNING_FRACTION,
    CacheAwarePolicy,
    autoscaling_stats,
)

CONFIG = AutoscalingConfig(
    min_replicas=1,
    max_replicas=8,
    target_ongoing_requests=2,
    policy={
        "policy_function": "deployments.autoscaling:CacheAwarePolicy",
        "policy_kwargs": {
            "target_cache_occupancy": 0.75,
            "target_running_fraction": 0.75,
        },
    },
)


def ctx(
    occupancy: dict[str, float] | None,
    running: dict[str, float] | None = None,
    requests: float = 0.0,
    replicas: int | None = None,
) -> AutoscalingContext:
    n = replicas if replicas is not None else len(occupancy or {})
    metrics = None
    if occupancy is not None:
        metrics = {CACHE_OCCUPANCY: occupancy, RUNNING_FRACTION: running or {}}
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="LLMServer",
        app_name="swiftserve",
        current_num_replicas=n,
        target_num_replicas=n,
        running_replicas=[],
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=CONFIG,
    )


def policy() -> CacheAwarePolicy:
    """Built the way Ray builds it: from the config's policy_function + kwargs."""
    cls = CONFIG.policy.get_policy()
    assert cls is CacheAwarePolicy
    return cls(**CONFIG.policy.policy_kwargs)


def replicas(c: AutoscalingContext) -> int:
    desired, state = policy()(c)
    assert state == {}
    return math.ceil(desired)  # what Ray does with a float decision


def test_full_caches_scale_up_where_the_request_policy_scales_down():
    c = ctx({"a": 0.95, "b": 0.95}, {"a": 0.25, "b": 0.25}, requests=1)
    default, _ = replica_queue_length_autoscaling_policy(c)
    assert math.ceil(default) == 1  # idle by requests: Ray would drop a cache
    assert replicas(c) == 3  # 1.9 replicas' worth of pages / 0.75


def test_busy_batch_slots_scale_up():
    assert replicas(ctx({"a": 0.1, "b": 0.1}, {"a": 1.0, "b": 1.0}, requests=4)) == 3


def test_requests_still_count():
    assert replicas(ctx({"a": 0.1, "b": 0.1}, {"a": 0.2, "b": 0.2}, requests=12)) == 6


def test_scale_down_only_when_survivors_can_hold_the_caches():
    assert replicas(ctx({"a": 0.5, "b": 0.5, "c": 0.5})) == 2  # 1.5 / 0.75
    assert replicas(ctx({"a": 0.6, "b": 0.6, "c": 0.6})) == 3  # 2 would overfill


def test_idle_deployment_scales_down():
    assert replicas(ctx({"a": 0.0, "b": 0.05, "c": 0.0})) == 1


def test_missing_reports_fall_back_to_requests():
    # A replica that has not reported yet adds nothing rather than blocking.
    assert replicas(ctx({"a": 0.9}, replicas=2, requests=2)) == 2
    assert replicas(ctx(None, replicas=2, requests=10)) == 5


def test_zero_replicas_defer_to_ray_cold_start():
    c = ctx({}, replicas=0, requests=3)
    assert policy()(c) == (0, {})


def test_bad_targets_rejected():
    with pytest.raises(ValueError):
        CacheAwarePolicy(target_cache_occupancy=0)
    with pytest.raises(ValueError):
        CacheAwarePolicy(target_running_fraction=1.5)


def test_metrics_derive_from_routing_stats():
    # live pages, not used ones: idle sessions' pages fade out of the load as they age
    stats = {"free_pages": 5, "live_pages": 75, "total_pages": 100, "running": 3, "max_running": 4}
    assert autoscaling_stats(stats) == {CACHE_OCCUPANCY: 0.75, RUNNING_FRACTION: 0.75}
    assert autoscaling_stats({}) == {CACHE_OCCUPANCY: 0.0, RUNNING_FRACTION: 0.0}
