"""Faults injected into an engine's core, in its own process: `engine.inspect(fail_next_step)`."""


def fail_next_step(core, message: str = "injected device fault") -> None:
    """The core's next model step raises (as a device fault would); the steps after it run as usual."""
    real = core.runner.run

    def broken(*args, **kw):
        core.runner.run = real
        raise RuntimeError(message)

    core.runner.run = broken


def hold_then_step(core, seconds: float) -> None:
    """Keep the engine process busy between steps for `seconds`: what is sent meanwhile reaches the
    engine in one drain (`engine.inspect(hold_then_step, s, wait=False)`)."""
    import time
    time.sleep(seconds)
