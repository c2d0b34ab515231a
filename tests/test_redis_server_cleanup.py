"""No redis-server outlives the tests that started it: neither one a test forgot to stop (reaped at exit) nor
one whose test process was killed outright (it dies with it)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = "from tests.redis_server import RedisServer; r = RedisServer(); r.start(); print(r._proc.pid, flush=True)"

pytestmark = pytest.mark.redis


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its new parent reaps it)


def gone_within(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def started_by(script: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    pid = int(proc.stdout.readline())
    assert alive(pid)
    return proc, pid


def test_a_server_left_running_is_reaped_when_the_tests_exit():
    proc, pid = started_by(START + "; input()")  # then it ends without stopping the server
    proc.communicate("\n", timeout=30)
    assert proc.returncode == 0 and gone_within(pid)


def test_a_server_dies_with_a_test_process_killed_outright():
    proc, pid = started_by(START + "; import time; time.sleep(120)")
    proc.kill()  # SIGKILL: no finally, no atexit
    proc.wait()
    assert gone_within(pid)
