"""pytest options for the failure-domain chaos tests' long versions (a plugin: tests/conftest.py is not
theirs to change, so it is loaded with -p):

    python -m pytest -p tests.failure_domain_options --chaos-runs 3 --node-loss \
        tests/test_sentinel_chaos.py tests/test_node_loss.py

Without them the Sentinel chaos test runs once and the node-loss test is skipped (its ~3-4 min on
2 cores do not fit CI's budget)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("failure domains")
    group.addoption("--chaos-runs", type=int, default=1, help="run the Sentinel chaos scenario N times in a row")
    group.addoption("--node-loss", action="store_true", help="run the lost-Ray-node test (multi-node Ray on "
                                                             "this machine, ~3-4 min on 2 cores)")
