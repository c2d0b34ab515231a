"""Fixtures for store tests: a real redis-server per test and one local Ray per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from tests.redis_server import RedisServer, free_port
from tests.redis_server import redis_server as _redis_server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port (per test: outage tests stop and start it)."""
    with _redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray for the whole session; an already initialised one is reused and left running."""
    if ray.is_initialized():
        yield
        return
    # include_dashboard=False still starts Ray's dashboard process, on 8265 when free: a free port instead,
    # so another Ray on this machine (or the next `ray start`) is not disturbed, nor disturbs us
    ray.init(num_cpus=2, include_dashboard=False, dashboard_port=free_port(), namespace="swiftserve-tests")
    try:
        yield
    finally:
        ray.shutdown()
