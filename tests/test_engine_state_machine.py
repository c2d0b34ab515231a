"""The engine state machine (tests/engine_machine.py) in CI: a fixed, bounded number of examples, the same
ones every run (derandomized, no example database). Longer locally: pytest --machine-examples=2000."""
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.engine_machine import EngineMachine, one_thread  # noqa: F401 (fixture)

CI_EXAMPLES = 200
STEPS = 40


def test_no_client_stalls_kills_or_corrupts_the_engine(pytestconfig, one_thread):
    examples = pytestconfig.getoption("--machine-examples") or CI_EXAMPLES
    run_state_machine_as_test(EngineMachine, settings=settings(
        max_examples=examples, stateful_step_count=STEPS, derandomize=examples == CI_EXAMPLES, database=None,
        deadline=None, suppress_health_check=list(HealthCheck), print_blob=True))
