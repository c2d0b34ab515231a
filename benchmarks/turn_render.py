"""Engine-thread time to accept a chat turn, against the length of the conversation's history.

An OpenAI client resends the whole history every turn; checking that it extends what the session
consumed hashes every earlier message, then the new ones go through the chat template and the
tokenizer. On the engine thread that stalls every session's next step. StreamingEngine renders on
the caller's thread (engine/turn_render.py) and the engine thread only checks the session's state;
both paths are timed here in one run (tiny model and its tokenizer, CPU):

  engine renders   EngineCore.submit(req, messages): what the engine thread did before
  prerendered      EngineCore.submit(req, messages, render_turn(...)): what it does now
  caller           render_turn(...): the same work, in the front end

    python benchmarks/turn_render.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import common as C
from tqdm import tqdm

from swift_engine import StreamingEngine
from swift_engine.config import EngineConfig
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.engine.session import Session, chain_digest
from swift_engine.engine.turn_render import TurnState, render_turn
from swift_engine.sampling import SamplingParams

WORDS = "the cache keeps sink tokens and a sliding window of recent ones so a conversation goes on".split()


def history(n: int) -> list[dict]:
    """n messages, user and assistant in turn, then the new user message."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: " + " ".join(WORDS[: 6 + i % 10])}
            for i in range(n)]
    return msgs + [{"role": "user", "content": "and now?"}]


def session_after(core: EngineCore, sid: str, msgs: list[dict]) -> None:
    """A session that consumed msgs[:-1] (the state a long chat reaches; its cache is not needed here)."""
    s = Session(sid, core.config.sink_tokens, core.config.window_tokens)
    s.messages_consumed, s.messages_digest, s.tokens_seen, s.turns = len(msgs) - 1, chain_digest("", msgs[:-1]), 64, 1
    core.sessions[sid] = s


def prerender(core: EngineCore, sid: str, msgs: list[dict]):
    """What the front end does before sending a turn (StreamingEngine._prerender)."""
    return render_turn(core.tokenizer, TurnState.of(core.sessions.get(sid)), sid, msgs, "none")


def timed(fn, reps: int) -> float:
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(core: EngineCore, n: int, reps: int) -> dict:
    msgs = history(n)
    for i in range(2 * reps):
        session_after(core, f"h{n}-{i}", msgs)
    sampling = SamplingParams(max_tokens=4)

    def submit(i: int, rendered=None, tag="e") -> None:
        sid = f"h{n}-{i if tag == 'e' else reps + i}"
        core.submit(Request(f"{sid}-r", sid, "generate", [], emit=lambda ev: None, sampling=sampling), msgs, rendered)

    engine_us = timed(lambda i: submit(i), reps)
    pre = [prerender(core, f"h{n}-{reps + i}", msgs) for i in range(reps)]
    caller_us = timed(lambda i: prerender(core, f"h{n}-{reps + i}", msgs), reps)
    pre_us = timed(lambda i: submit(i, pre[i], tag="p"), reps)
    core.scheduler.waiting.clear()
    return dict(history_messages=n, engine_renders_us=engine_us, prerendered_us=pre_us, caller_us=caller_us,
                engine_thread_ratio=engine_us / pre_us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, nargs="+", default=[2, 20, 200, 2000])
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    cfg = EngineConfig(model="tiny", sink_tokens=4, window_tokens=48, page_size=8, max_running=4096)
    built = StreamingEngine(cfg, progress=False)  # the model and tokenizer as the engine loads them
    built.shutdown()
    core = EngineCore(cfg, built.inspect(lambda c: c.model), built.tokenizer)  # driven from this thread alone
    rows = []
    for n in tqdm(a.messages, desc="history lengths"):
        rows.append(measure(core, n, a.reps))
        r = rows[-1]
        print(f"{n:>5} messages: engine thread {r['engine_renders_us']:8.0f} us when it renders, "
              f"{r['prerendered_us']:6.0f} us prerendered ({r['engine_thread_ratio']:.0f}x less); "
              f"caller {r['caller_us']:8.0f} us")
    C.save("turn_render", {"rows": rows})
    plot(rows)


def plot(rows: list[dict]) -> None:
    lines = [(label, [r[key] for r in rows], {}) for key, label in (
        ("engine_renders_us", "engine thread, rendering (before)"),
        ("prerendered_us", "engine thread, prerendered (now)"),
        ("caller_us", "caller's thread, rendering (now)"))]
    C.line_plot("turn_render", [r["history_messages"] for r in rows], lines,
                "messages in the history the client resends", "us per turn accepted (median)",
                "accepting a chat turn (tiny model's tokenizer, CPU)", ylog=True)


if __name__ == "__main__":
    main()
