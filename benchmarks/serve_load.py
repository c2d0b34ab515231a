"""Steady-state load on an OpenAI-compatible server: multi-turn conversations with session ids.

`--conversations` users each hold one conversation at a time. Their first conversations
arrive as a Poisson process (`--rate` per second); each sends `--turns` turns, resending its
whole history every time (as OpenAI clients do) under its own `x-session-id`, with an
exponential think time (`--think-s`) between turns and before the user's next conversation.
After `--warmup-s` (not measured) come `--duration-s` of measured traffic; turns still
running at its end get `--grace-s` to finish, then are cancelled.

Reported per sampling setting (temperature/top_p as given, and greedy beside it unless
`--no-greedy`): TTFT p50/p99 (also by turn index), TPOT and inter-chunk gap p50/p99, tok/s
(the window's mean, and p50/p99 over its 1 s bins), requests/s, errors; with `--local`, the
same workload on the engine alone in the same run and the served/engine ratios. JSON + PNG.

    # against any server (vLLM, Ray Serve LLM, swiftserve ...)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model swiftserve-llama-7m
    # start the local app itself, then run the same load on the engine alone (same model, same run)
    python benchmarks/serve_load.py --local configs/local.yaml --conversations 16
    # GPU-free: the simulator's Llama-3-8B H200 step times (a load-testing tool, docs/load-simulator.md)
    python benchmarks/serve_load.py --local benchmarks/serve_sim.yaml --conversations 32

TTFT: request sent -> first streamed token. TPOT: the turn's decode time per token,
(end - first token) / (tokens - 1). The inter-chunk gap is what the client sees between
streamed chunks (the server may merge several tokens into one chunk).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the cache keeps sink tokens and a sliding window of recent ones so a conversation can go on "
         "forever while memory stays bounded and every turn costs the same").split()


@dataclass
class TurnResult:
    conversation: str
    turn: int                        # index within its conversation: TTFT is split by it
    start: float
    end: float = 0.0
    ttft: float | None = None        # seconds to the first streamed token
    gaps: list[float] = field(default_factory=list)  # seconds between streamed chunks
    tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass
class Workload:
    conversations: int   # users, each holding one conversation at a time
    turns: int           # turns of one conversation; then the user starts a new one
    rate: float          # first conversations per second (Poisson); inf: all at once
    think_s: float       # mean think time between turns and between a user's conversations
    user_words: int
    seed: int
    warmup_s: float
    duration_s: float
    grace_s: float


RunTurn = Callable[[str, list[dict]], Awaitable[TurnResult]]


@dataclass
class Run:
    results: list[TurnResult]
    windows: list[tuple[float, float]]  # measured (start, end) spans: one, or one per interleaved round

    def measured(self, r: TurnResult) -> bool:
        return any(t0 <= r.start < t1 for t0, t1 in self.windows)

    @property
    def duration(self) -> float:
        return sum(t1 - t0 for t0, t1 in self.windows)

    def __add__(self, other: "Run") -> "Run":
        return Run(self.results + other.results, self.windows + other.windows)


def user_message(user: int, turn: int, words: int) -> dict:
    return {"role": "user", "content": f"turn {turn}: " +
            " ".join(WORDS[(user * 7 + turn * 3 + k) % len(WORDS)] for k in range(words))}


async def drive(work: Workload, run_turn: RunTurn, label: str) -> Run:
    """The workload for warmup_s + duration_s; every user's randomness is seeded by (seed, user), so two
    paths run the same users, arrivals, messages and think times."""
    rng = random.Random(work.seed)
    arrivals = [0.0]
    for _ in range(work.conversations - 1):
        arrivals.append(arrivals[-1] + (rng.expovariate(work.rate) if math.isfinite(work.rate) else 0.0))
    start = time.perf_counter()
    t0, t1 = start + work.warmup_s, start + work.warmup_s + work.duration_s
    results: list[TurnResult] = []
    run_id = f"load-{int(time.time() * 1000) % 10**9}"

    async def user(u: int) -> None:
        think = random.Random(work.seed * 100_003 + u)
        await asyncio.sleep(arrivals[u])
        for conv in range(1_000_000):
            history: list[dict] = []
            for turn in range(work.turns):
                if time.perf_counter() >= t1:
                    return
                history.append(user_message(u, turn, work.user_words))
                res = await run_turn(f"{run_id}-{u}-{conv}", history)
                res.conversation, res.turn = f"{u}-{conv}", turn
                results.append(res)
                history.append({"role": "assistant", "content": res.text})
                await asyncio.sleep(think.expovariate(1 / work.think_s) if work.think_s > 0 else 0.0)
                if res.error:
                    break  # the history can no longer continue the session

    tasks = [asyncio.create_task(user(u)) for u in range(work.conversations)]
    await _progress(label, start, t0, t1, results)
    _, pending = await asyncio.wait(tasks, timeout=work.grace_s)
    for task in pending:  # a turn still running after the grace: cancelled, not counted
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return Run(results, [(t0, t1)])


async def _progress(label: str, start: float, t0: float, t1: float, results: list[TurnResult]) -> None:
    """A bar over the run's seconds (warm-up, then measured) until the window ends."""
    bar = tqdm(total=round(t1 - start), desc=label, unit="s", mininterval=1.0)
    while (now := time.perf_counter()) < t1:
        await asyncio.sleep(min(1.0, t1 - now))
        bar.n = round(time.perf_counter() - start)
        bar.set_postfix(phase="warm-up" if time.perf_counter() < t0 else "measured", turns=len(results),
                        errors=sum(r.error is not None for r in results), refresh=True)
    bar.close()


async def burst(conversations: int, run_turn: RunTurn, user_words: int) -> None:
    """Two turns of every user at once, not measured: batch shapes up to the run's largest, so kernels
    compiled on first use (Triton, the sampler) are compiled before, not inside, the measurement."""
    run_id = f"burst-{int(time.time() * 1000) % 10**9}"

    async def conversation(u: int) -> None:
        history = []
        for turn in range(2):
            history.append(user_message(u, turn, user_words))
            res = await run_turn(f"{run_id}-{u}", history)
            if res.error:
                return
            history.append({"role": "assistant", "content": res.text})
    await asyncio.gather(*(conversation(u) for u in range(conversations)))


# ---- one turn, through HTTP or on the engine alone ------------------------------------------
def http_client(url: str):
    import openai

    return openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=600)


def http_turns(client, model: str, sampling: dict) -> RunTurn:
    extra = {k: sampling[k] for k in ("top_k", "ignore_eos") if k in sampling}
    standard = {k: v for k, v in sampling.items() if k not in extra}

    async def run(sid: str, history: list[dict]) -> TurnResult:
        res = TurnResult("", 0, time.perf_counter())
        last, text = None, []
        try:
            stream = await client.chat.completions.create(
                model=model, messages=history, stream=True, stream_options={"include_usage": True},
                extra_headers={"x-session-id": sid}, extra_body=extra, **standard)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices:
                    if last is None:
                        res.ttft = now - res.start
                    else:
                        res.gaps.append(now - last)
                    last = now
                    text.append(chunk.choices[0].delta.content or "")
                if chunk.usage:
                    res.tokens = chunk.usage.completion_tokens
        except Exception as exc:  # counted, reported, and the conversation stops
            res.error = f"{type(exc).__name__}: {exc}"[:200]
        res.end, res.text = time.perf_counter(), "".join(text)
        return res
    return run


def engine_turns(engine, sampling: dict) -> RunTurn:
    from swift_engine import SamplingParams

    params = SamplingParams(**sampling)

    async def run(sid: str, history: list[dict]) -> TurnResult:
        res = TurnResult("", 0, time.perf_counter())
        last, text = None, []
        try:
            async for ev in engine.generate(sid, messages=history, sampling=params):
                now = time.perf_counter()
                if ev.token_id is not None:
                    if last is None:
                        res.ttft = now - res.start
                    else:
                        res.gaps.append(now - last)
                    last = now
                text.append(ev.text)
                if ev.usage is not None:
                    res.tokens = ev.usage.completion_tokens
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:200]
        res.end, res.text = time.perf_counter(), "".join(text)
        return res
    return run


# ---- figures ---------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def token_bins(run: Run) -> list[float]:
    """Tokens per 1 s bin of the window: a turn's first token at its TTFT, the rest spread evenly over its
    decode time (the client sees merged chunks, not each token's time)."""
    bins: list[float] = []
    for t0, t1 in run.windows:
        bins += _bins(run.results, t0, t1)
    return bins


def _bins(results: list[TurnResult], t0: float, t1: float) -> list[float]:
    n = max(1, round(t1 - t0))
    bins = [0.0] * n

    def add(t: float, amount: float) -> None:
        if t0 <= t < t1:
            bins[min(n - 1, int(t - t0))] += amount
    for r in results:
        if r.error is None and r.ttft is not None and r.tokens:
            first = r.start + r.ttft
            add(first, 1.0)
            rest = r.tokens - 1
            for k in range(1, rest + 1):
                add(first + (r.end - first) * k / rest, 1.0)
    return bins


def summarize(run: Run) -> dict:
    """Latencies of the turns started in the window and finished; throughput of the window's tokens."""
    window = [r for r in run.results if run.measured(r)]
    ok = [r for r in window if r.error is None and r.ttft is not None]
    ttft = [1000 * r.ttft for r in ok]
    gaps = [1000 * g for r in ok for g in r.gaps]
    tpot = [1000 * (r.end - r.start - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    bins = token_bins(run)
    by_turn: dict[int, list[float]] = {}
    for r in ok:
        by_turn.setdefault(r.turn, []).append(1000 * r.ttft)
    ms = {"ttft": ttft, "tpot": tpot, "itl": gaps}
    return {"turns": len(window), "errors": sum(r.error is not None for r in window),
            "completion_tokens": sum(r.tokens for r in ok), "duration_s": run.duration,
            "tokens_per_s": sum(bins) / len(bins), "tokens_per_s_p50": pct(bins, 50),
            "tokens_per_s_p99": pct(bins, 99), "requests_per_s": len(ok) / run.duration,
            **{f"{k}_ms_p{q}": pct(v, q) for k, v in ms.items() for q in (50, 99)},
            "ttft_ms_by_turn": {t: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)}
                                for t, v in sorted(by_turn.items())},
            "chunks_per_token": (sum(len(r.gaps) + 1 for r in ok) / sum(r.tokens for r in ok))
            if any(r.tokens for r in ok) else None,
            "error_samples": sorted({r.error for r in window if r.error})[:5]}


RATIOS = ("tokens_per_s", "tokens_per_s_p50", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
          "itl_ms_p50", "itl_ms_p99")


def ratios(served: dict, engine: dict) -> dict:
    return {k: served[k] / engine[k] for k in RATIOS if served.get(k) and engine.get(k)}


def plot(runs: dict[str, dict[str, Run]], path: Path, title: str) -> None:
    """One row per sampling setting: TTFT CDF, TPOT CDF, tok/s over the window, TTFT p50 by turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 4, figsize=(19, 4 * len(runs)), squeeze=False)
    for row, (setting, paths) in zip(axes, runs.items()):
        for label, run in paths.items():
            s = summarize(run)
            ok = [r for r in run.results if run.measured(r) and r.error is None and r.ttft is not None]
            for ax, values, key in ((row[0], [1000 * r.ttft for r in ok], "ttft"),
                                    (row[1], [1000 * (r.end - r.start - r.ttft) / (r.tokens - 1)
                                              for r in ok if r.tokens > 1], "tpot")):
                values = sorted(values)
                if values:
                    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                            label=f"{label} (p50 {s[key + '_ms_p50']:.1f} ms)")
            row[2].plot(token_bins(run), label=f"{label}: {s['tokens_per_s']:.0f} tok/s")
            turns = sorted(s["ttft_ms_by_turn"])
            offset = -0.2 if label == "served" else 0.2
            row[3].bar([t + offset for t in turns], [s["ttft_ms_by_turn"][t]["p50"] for t in turns], width=0.4,
                       label=label)
        for ax, xlabel, name in ((row[0], "ms", "time to first token (CDF)"),
                                 (row[1], "ms", "time per output token (CDF)"),
                                 (row[2], "s into the measured window", "tok/s (1 s bins)"),
                                 (row[3], "turn index in its conversation", "TTFT p50 (ms) by turn")):
            ax.set_xlabel(xlabel)
            ax.set_title(f"{setting}: {name}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


# ---- the local app and the engine alone ------------------------------------------------
def local_args(config: Path, model: str | None, engine_set: list[str]) -> tuple[dict, dict]:
    """The app's args, and the update to them: `model`, and `engine_set`'s KEY=VALUE (dotted keys under
    args.engine, YAML values: `simulated.vocab_size=4096`)."""
    import yaml

    spec = yaml.safe_load(config.read_text())["applications"][0]
    engine = json.loads(json.dumps(spec["args"]["engine"]))
    for item in engine_set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = engine
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    update = {"engine": {**engine, **({"model": model} if model else {})}} if model or engine_set else {}
    if model:
        update["model_id"] = model
    return {**spec["args"], **update}, update


def replica_threads(config: Path) -> int:
    """Torch threads in an LLMServer replica: Ray sets OMP_NUM_THREADS to its num_cpus (floor, >= 1)."""
    import yaml

    spec = yaml.safe_load(config.read_text())["applications"][0]
    server = next(d for d in spec["deployments"] if d["name"] == "LLMServer")
    return max(1, math.floor(server.get("ray_actor_options", {}).get("num_cpus", 1)))


TurnsFor = Callable[[dict], RunTurn]  # a path: sampling -> how it runs a turn


async def measure(work: Workload, settings: dict[str, dict], paths: dict[str, TurnsFor], warm: bool = True,
                  rounds: int = 1) -> dict[str, dict[str, Run]]:
    """{setting: {path: Run}}. Each setting in turn; within it, `rounds` rounds of every path one after the
    other, each round duration_s / rounds long with its own warm-up (interleaved: a busy host's swings fall
    on every path alike). With `warm`, a burst on each path first."""
    if warm:
        for turns_for in paths.values():
            await burst(work.conversations, turns_for(next(iter(settings.values()))), work.user_words)
    part = replace(work, duration_s=work.duration_s / rounds)
    runs: dict[str, dict[str, Run]] = {name: {} for name in settings}
    for name, sampling in settings.items():
        for r in range(rounds):
            for label, turns_for in paths.items():
                run = await drive(part, turns_for(sampling), f"{label}: {name}" + (f" ({r + 1}/{rounds})" if
                                                                                     rounds > 1 else ""))
                runs[name][label] = runs[name][label] + run if label in runs[name] else run
    return runs


async def measure_http(url: str, model_id: str, work: Workload, settings: dict[str, dict], warm: bool,
                       engine=None, rounds: int = 1) -> dict[str, dict[str, Run]]:
    """The served path (and, given `engine`, the engine alone interleaved with it) through one client."""
    client = http_client(url)
    paths: dict[str, TurnsFor] = {"served": lambda sampling: http_turns(client, model_id, sampling)}
    if engine is not None:
        paths["engine alone"] = lambda sampling: engine_turns(engine, sampling)
    try:
        return await measure(work, settings, paths, warm, rounds)
    finally:
        await client.close()


@contextmanager
def local_app(config: Path, update: dict, replicas: int | None):
    """The config's app on a local Ray, on a free port: yields its URL; Serve and Ray are shut down after."""
    import tempfile

    import ray
    import yaml
    from ray import serve

    from deployments.app import app_from_config

    if replicas is not None:  # the same config with another LLMServer replica count
        spec = yaml.safe_load(config.read_text())
        for d in spec["applications"][0]["deployments"]:
            if d["name"] == "LLMServer":
                d["num_replicas"] = replicas
        config = Path(tempfile.mkdtemp()) / config.name
        config.write_text(yaml.safe_dump(spec))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="serve-load")
    try:
        app, _ = app_from_config(config, update)
        with socket.socket() as sock:  # a free port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="swiftserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def engine_alone(args: dict, threads: int):
    """The app's engine, its front end in this process, with as many torch threads as the replica's (Ray sets
    them from its num_cpus): the same engine, not a wider one. The engine core runs in a process forked from a
    fork server started now, which takes this environment: OMP_NUM_THREADS, not torch.set_num_threads here,
    gives it its threads, as Ray's OMP_NUM_THREADS gives the replica's engine process its own."""
    import torch

    from deployments.config import AppArgs
    from swift_engine import StreamingEngine

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    engine = StreamingEngine(AppArgs.model_validate(args).engine, progress=False)
    try:
        yield engine
    finally:
        engine.shutdown()


def run_local(a: argparse.Namespace, work: Workload, settings: dict[str, dict]) -> tuple[dict, str, int]:
    """Served and engine alone: interleaved (`--interleave` rounds, both alive at once: where two engines fit,
    e.g. the simulator) or one after the other (the app shut down first)."""
    app_args, update = local_args(a.local, a.model, a.engine_set)
    model_id, threads = app_args["model_id"], replica_threads(a.local)
    with local_app(a.local, update, a.replicas) as url:
        if a.interleave:
            with engine_alone(app_args, threads) as engine:
                return asyncio.run(measure_http(url, model_id, work, settings, True, engine, a.interleave)), \
                    model_id, threads
        runs = asyncio.run(measure_http(url, model_id, work, settings, warm=True))
    with engine_alone(app_args, threads) as engine:
        alone = asyncio.run(measure(work, settings, {"engine alone": lambda sampling: engine_turns(engine, sampling)}))
    return {name: {**runs[name], **alone[name]} for name in settings}, model_id, threads


# ---- the command ---------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of an OpenAI-compatible server")
    target.add_argument("--local", type=Path, metavar="CONFIG", help="start this Serve config's app (e.g. "
                        "configs/local.yaml) and also run the engine alone on the same model")
    ap.add_argument("--model", help="model id (--url) or the model to serve instead of the config's (--local)")
    ap.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE", help="--local: an engine "
                    "field instead of the config's (dotted, YAML value), e.g. simulated.vocab_size=4096; repeatable")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS", help="--local: keep the engine alone "
                    "up beside the app and alternate them, ROUNDS rounds of duration/ROUNDS each (where two "
                    "engines fit, e.g. the simulator: a busy host's swings then fall on both alike); 0: the app "
                    "first, shut down, then the engine alone")
    ap.add_argument("--replicas", type=int, help="--local: LLMServer replicas instead of the config's (1 compares "
                    "the serving path alone with the engine alone; more split the machine between engines)")
    ap.add_argument("--conversations", type=int, default=16, help="users, each holding one conversation at a time")
    ap.add_argument("--turns", type=int, default=8, help="turns of a conversation; then its user starts another")
    ap.add_argument("--rate", type=float, default=2.0, help="first conversations per second (Poisson; inf: at once)")
    ap.add_argument("--think-s", type=float, default=0.5, help="mean think time between turns (exponential)")
    ap.add_argument("--warmup-s", type=float, default=20.0, help="load before the measured window, not measured")
    ap.add_argument("--duration-s", type=float, default=60.0, help="measured traffic per sampling setting and path")
    ap.add_argument("--grace-s", type=float, default=30.0, help="after the window: time for running turns to end")
    ap.add_argument("--user-words", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure greedy decoding beside the sampling above")
    ap.add_argument("--seed", type=int, default=0, help="workload seed, and the sampling seed")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let turns end at end-of-turn (other servers "
                    "may not know ignore_eos)")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<device>/serve_load.json)")
    return ap.parse_args()


def sampling_settings(a: argparse.Namespace) -> dict[str, dict]:
    base = {"max_tokens": a.max_tokens, "seed": a.seed, **({} if a.no_ignore_eos else {"ignore_eos": True})}
    sampled = {**base, "temperature": a.temperature, "top_p": a.top_p, **({"top_k": a.top_k} if a.top_k else {})}
    name = "greedy" if a.temperature == 0 else f"temperature {a.temperature:g} top_p {a.top_p:g}" + \
        (f" top_k {a.top_k}" if a.top_k else "")
    settings = {name: sampled}
    if a.greedy and a.temperature != 0:
        settings["greedy"] = {**base, "temperature": 0.0}
    return settings


def report(summaries: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Print every path's figures and, beside the engine alone, the served/engine ratios."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    out = {}
    for setting, paths in summaries.items():
        print(f"== {setting}")
        for label, s in paths.items():
            print(f"{label:>13}: {s['tokens_per_s']:8.1f} tok/s (p50 {ms(s['tokens_per_s_p50'])})  "
                  f"TTFT p50/p99 {ms(s['ttft_ms_p50'])}/{ms(s['ttft_ms_p99'])} ms  TPOT p50/p99 "
                  f"{ms(s['tpot_ms_p50'])}/{ms(s['tpot_ms_p99'])} ms  turns {s['turns']}  errors {s['errors']}")
            print(f"{'':>15}TTFT p50 by turn: " + ", ".join(
                f"{t}: {ms(v['p50'])}" for t, v in s["ttft_ms_by_turn"].items()))
            for e in s["error_samples"]:
                print(f"{'':>15}{e}")
        if "engine alone" in paths:
            out[setting] = ratios(paths["served"], paths["engine alone"])
            print("served / engine alone: " + "  ".join(f"{k} {v:.2f}" for k, v in out[setting].items()))
    return out


def main() -> None:
    a = parse_args()
    work = Workload(a.conversations, a.turns, a.rate, a.think_s, a.user_words, a.seed, a.warmup_s, a.duration_s,
                    a.grace_s)
    settings = sampling_settings(a)
    load_before = os.getloadavg()  # other work on this host skews every figure: recorded beside them
    host: dict = {"cpus": os.cpu_count(), "load_avg_1m_before": load_before[0]}
    if a.url:
        if not a.model:
            raise SystemExit("--url needs --model")
        model_id = a.model
        runs = asyncio.run(measure_http(a.url, a.model, work, settings, warm=False))
    else:
        runs, model_id, host["engine_alone_torch_threads"] = run_local(a, work, settings)
    summaries = {name: {label: summarize(run) for label, run in paths.items()} for name, paths in runs.items()}
    served_over_engine = report(summaries)
    host["load_avg_1m_after"] = os.getloadavg()[0]
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "model": model_id,
           "workload": asdict(work), "sampling": settings, "runs": summaries,
           "served_over_engine": served_over_engine, "host": host}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1, default=float))
        json_path = a.out
    else:
        from benchmarks.common import save

        json_path = save("serve_load", out)
    plot(runs, json_path.with_suffix(".png"), f"serve_load: {model_id}, {a.conversations} users x {a.turns}-turn "
         f"conversations, think {a.think_s:g} s, {a.max_tokens} tokens a turn, {a.duration_s:g} s measured")
    if any(s["errors"] for paths in summaries.values() for s in paths.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
