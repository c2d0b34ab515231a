"""A progress bar for one long step that reports nothing itself (a conversion inside transformers):
it advances with the clock against an estimate, so the user sees the step is alive and about how
much is left, and it completes when the step does."""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


def thread_lock_only() -> None:
    """For a process that ends with os._exit: tqdm's default lock holds a multiprocessing semaphore that
    only interpreter teardown unlinks, so the resource tracker would warn of a leak when the parent exits.
    Its bars are drawn by one process; a thread lock is all they need."""
    tqdm.set_lock(threading.RLock())


@contextmanager
def timed_bar(desc: str, estimate_s: float, enabled: bool = True) -> Iterator[None]:
    """Show `desc` with a bar of `estimate_s` seconds while the block runs (stderr)."""
    if not enabled:
        yield
        return
    done = threading.Event()
    bar = tqdm(total=round(estimate_s), desc=desc, unit="s", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s")
    start = time.monotonic()

    def tick():
        while not done.wait(0.5):
            elapsed = time.monotonic() - start
            bar.total = max(bar.total, round(elapsed) + 1)  # past the estimate: the bar stays short of full
            bar.n = elapsed
            bar.refresh()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
        bar.total = bar.n = time.monotonic() - start
    finally:
        done.set()
        ticker.join()
        bar.close()
