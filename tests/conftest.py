import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

pytest_plugins = ["tests.fixtures_store"]


def pytest_addoption(parser):
    parser.addoption("--machine-examples", type=int, default=None,
                     help="examples of the engine state machine (tests/test_engine_state_machine.py); "
                          "default: its CI count, derandomized. More (and random) to search longer locally")
    parser.addoption("--disconnect-turns", type=int, default=None,
                     help="turns of the Ray disconnect fault test (tests/test_disconnect_faults.py); default: "
                          "its CI count (~150). The issue's long run: 600")
