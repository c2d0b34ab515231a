"""Chaos on the Redis failure domain (tests/sentinel_chaos.py): 16 sessions through the openai client on a
3-replica app whose store is a Sentinel-managed Redis; the primary is SIGKILLed twice, then the replicas are
SIGSTOPped. Strict durability with min_replicas_acked=1: nothing acknowledged is lost, nothing is
acknowledged while no replica can have it, and every session goes on.

Three runs in a row: `python -m pytest -p tests.failure_domain_options --chaos-runs 3 tests/test_sentinel_chaos.py`,
or with the figures in JSON: `python -m tests.sentinel_chaos --runs 3 --out <file>` (docs/failure-domains.md)."""

from __future__ import annotations

import json

import pytest

from tests.sentinel_chaos import chaos_run, sentinel_app
from tests.sentinel_cluster import sentinel_cluster

pytestmark = [pytest.mark.ray, pytest.mark.redis]


async def test_primary_kills_and_replica_stalls_lose_no_acknowledged_turn(ray_local, request):
    for _ in range(request.config.getoption("--chaos-runs", default=1)):
        with sentinel_cluster(replicas=2) as cluster, sentinel_app(cluster) as url:
            report = await chaos_run(url, cluster, sessions=16, kills=2, stall_s=15.0, settle_s=1.5)
        print("\n" + json.dumps(report, indent=1))
        check(report)


def check(report: dict) -> None:
    assert report["acknowledged_turns_lost"] == 0 and report["history_mismatches"] == 0
    assert report["sessions_continued"] == 16
    kills, stall = report["faults"][:2], report["faults"][2]
    assert all(k["old"] != k["new"] for k in kills)  # Sentinel promoted a replica each time
    assert report["turns_acknowledged"] > 16 * 3
    # while no replica could answer WAIT, no turn was acknowledged (they failed, or, on a slow machine, their
    # commit retries outlasted the stall); turns went on after it
    assert stall["acknowledged_while_stalled"] == 0
    assert stall["first_ok_turn_started_after_s"] >= stall["stall_s"]
