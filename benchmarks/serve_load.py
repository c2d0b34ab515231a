"""End-to-end load on an OpenAI-compatible server: multi-turn conversations with session ids.

Conversations arrive as a Poisson process; each sends `--turns` turns, resending
its whole history every time (as OpenAI clients do) under its own `x-session-id`,
with an exponential think time between turns. Reports TTFT and inter-token
latency (p50/p99), served tokens/s, requests/s and errors; writes JSON + PNG.

    # against any server (vLLM, Ray Serve LLM, swiftserve ...)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model swiftserve-llama-7m
    # start the local app itself, then run the same load on the engine alone (same model, same run)
    python benchmarks/serve_load.py --local configs/local.yaml --conversations 16 --turns 3

Inter-token latency is the gap between successive streamed chunks as the client
sees them (the server may batch several tokens into one chunk); TPOT is the
turn's decode time per token, (end - first token) / (tokens - 1).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the cache keeps sink tokens and a sliding window of recent ones so a conversation can go on "
         "forever while memory stays bounded and every turn costs the same").split()


@dataclass
class TurnResult:
    conversation: int
    turn: int
    start: float
    end: float = 0.0
    ttft: float | None = None        # seconds to the first streamed token
    gaps: list[float] = field(default_factory=list)  # seconds between streamed chunks
    tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass
class Workload:
    conversations: int
    turns: int
    rate: float          # new conversations per second (Poisson); inf: all at once
    think_s: float       # mean think time between a conversation's turns
    user_words: int
    seed: int


RunTurn = Callable[[str, list[dict]], Awaitable[TurnResult]]


async def drive(work: Workload, run_turn: RunTurn, label: str) -> tuple[list[TurnResult], float]:
    """Run the workload; returns every turn's result and the wall time."""
    rng = random.Random(work.seed)
    arrivals, t = [], 0.0
    for _ in range(work.conversations):
        arrivals.append(t)
        t += rng.expovariate(work.rate) if work.rate != float("inf") else 0.0
    thinks = [[rng.expovariate(1 / work.think_s) if work.think_s > 0 else 0.0 for _ in range(work.turns)]
              for _ in range(work.conversations)]
    results: list[TurnResult] = []
    bar = tqdm(total=work.conversations * work.turns, desc=label, unit="turn")
    run_id = f"load-{int(time.time() * 1000) % 10**9}"

    async def conversation(i: int) -> None:
        await asyncio.sleep(arrivals[i])
        history = []
        for turn in range(work.turns):
            words = [WORDS[(i * 7 + turn * 3 + k) % len(WORDS)] for k in range(work.user_words)]
            history.append({"role": "user", "content": f"turn {turn}: " + " ".join(words)})
            res = await run_turn(f"{run_id}-{i}", history)
            res.conversation, res.turn = i, turn
            results.append(res)
            bar.update()
            if res.error:
                return  # the history can no longer continue the session
            history.append({"role": "assistant", "content": res.text})
            await asyncio.sleep(thinks[i][turn])

    start = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(work.conversations)))
    bar.close()
    return results, time.perf_counter() - start


def http_turns(url: str, model: str, sampling: dict) -> RunTurn:
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=600)
    extra = {k: sampling[k] for k in ("top_k", "ignore_eos") if k in sampling}
    standard = {k: v for k, v in sampling.items() if k not in extra}

    async def run(sid: str, history: list[dict]) -> TurnResult:
        res = TurnResult(0, 0, time.perf_counter())
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
        res = TurnResult(0, 0, time.perf_counter())
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


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def summarize(results: list[TurnResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [1000 * r.ttft for r in ok if r.ttft is not None]
    gaps = [1000 * g for r in ok for g in r.gaps]
    tpot = [1000 * (r.end - r.start - r.ttft) / (r.tokens - 1) for r in ok if r.ttft is not None and r.tokens > 1]
    tokens = sum(r.tokens for r in ok)
    return {"turns": len(results), "errors": len(results) - len(ok), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(gaps, 50),
            "itl_ms_p99": pct(gaps, 99), "tpot_ms_p50": pct(tpot, 50),
            "chunks_per_token": (sum(len(r.gaps) + 1 for r in ok if r.ttft is not None) / tokens) if tokens else None,
            "error_samples": sorted({r.error for r in results if r.error})[:5]}


def plot(runs: dict[str, tuple[list[TurnResult], dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, (results, summary) in runs.items():
        ok = [r for r in results if r.error is None]
        t0 = min((r.start for r in results), default=0.0)
        for ax, values in ((axes[0], [1000 * r.ttft for r in ok if r.ttft is not None]),
                           (axes[1], [1000 * g for r in ok for g in r.gaps])):
            values = sorted(values)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                        label=f"{label} (p50 {pct(values, 50):.1f} ms)")
        done = sorted((r.end - t0, r.tokens) for r in ok)
        total, xs, ys = 0, [], []
        for t, n in done:
            total += n
            xs.append(t)
            ys.append(total)
        axes[2].plot(xs, ys, label=f"{label}: {summary['tokens_per_s']:.0f} tok/s")
    for ax, xlabel, name in ((axes[0], "ms", "time to first token (CDF)"),
                             (axes[1], "ms", "gap between streamed chunks (CDF)"),
                             (axes[2], "s since start", "completion tokens finished")):
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ---- the local app and the engine alone ------------------------------------------------
def local_args(config: Path, model: str | None) -> tuple[dict, dict]:
    import yaml

    spec = yaml.safe_load(config.read_text())["applications"][0]
    update = {}
    if model:
        update = {"model_id": model, "engine": {**spec["args"]["engine"], "model": model}}
    return {**spec["args"], **update}, update


def warm_up(work: Workload) -> Workload:
    """Two turns of every conversation at once, not measured: batch shapes up to the run's own, so kernels
    compiled on first use (Triton, the sampler) are compiled before, not inside, the measurement."""
    return Workload(work.conversations, 2, float("inf"), 0.0, work.user_words, work.seed + 1)


def run_served_locally(config: Path, update: dict, work: Workload, sampling: dict, model_id: str,
                       replicas: int | None):
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
        url = f"http://127.0.0.1:{port}"
        warm = warm_up(work)
        asyncio.run(drive(warm, http_turns(url, model_id, sampling), "warm-up"))
        return asyncio.run(drive(work, http_turns(url, model_id, sampling), "served"))
    finally:
        serve.shutdown()
        ray.shutdown()


def run_engine_alone(args: dict, work: Workload, sampling: dict):
    from deployments.config import AppArgs
    from swift_engine import StreamingEngine

    engine = StreamingEngine(AppArgs.model_validate(args).engine, progress=False)
    try:
        warm = warm_up(work)
        asyncio.run(drive(warm, engine_turns(engine, sampling), "warm-up"))
        return asyncio.run(drive(work, engine_turns(engine, sampling), "engine alone"))
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of an OpenAI-compatible server")
    target.add_argument("--local", type=Path, metavar="CONFIG", help="start this Serve config's app (e.g. "
                        "configs/local.yaml) and also run the engine alone on the same model")
    ap.add_argument("--model", help="model id (--url) or the model to serve instead of the config's (--local)")
    ap.add_argument("--replicas", type=int, help="--local: LLMServer replicas instead of the config's (1 compares "
                    "the serving path alone with the engine alone; more split the machine between engines)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--rate", type=float, default=float("inf"), help="new conversations per second (Poisson)")
    ap.add_argument("--think-s", type=float, default=0.0, help="mean think time between turns (exponential)")
    ap.add_argument("--user-words", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="workload seed, and the sampling seed")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let turns end at end-of-turn (other servers "
                    "may not know ignore_eos)")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<device>/serve_load.json)")
    a = ap.parse_args()

    work = Workload(a.conversations, a.turns, a.rate, a.think_s, a.user_words, a.seed)
    sampling = {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed}
    if a.top_k:
        sampling["top_k"] = a.top_k
    if not a.no_ignore_eos:
        sampling["ignore_eos"] = True
    runs: dict[str, tuple[list[TurnResult], dict]] = {}
    load_before = os.getloadavg()  # other work on this host skews every figure: recorded beside them
    if a.url:
        if not a.model:
            ap.error("--url needs --model")
        results, wall = asyncio.run(drive(work, http_turns(a.url, a.model, sampling), "served"))
        runs["served"] = (results, summarize(results, wall))
        model_id = a.model
    else:
        app_args, update = local_args(a.local, a.model)
        model_id = app_args["model_id"]
        results, wall = run_served_locally(a.local, update, work, sampling, model_id, a.replicas)
        runs["served"] = (results, summarize(results, wall))
        results, wall = run_engine_alone(app_args, work, sampling)
        runs["engine alone"] = (results, summarize(results, wall))

    summaries = {label: s for label, (_, s) in runs.items()}
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    for label, s in summaries.items():
        print(f"{label:>13}: {s['tokens_per_s']:8.1f} tok/s  {s['requests_per_s']:6.2f} req/s  TTFT p50/p99 "
              f"{ms(s['ttft_ms_p50'])}/{ms(s['ttft_ms_p99'])} ms  ITL p50/p99 {ms(s['itl_ms_p50'])}/"
              f"{ms(s['itl_ms_p99'])} ms  errors {s['errors']}/{s['turns']}")
        for e in s["error_samples"]:
            print(f"{'':>15}{e}")
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "model": model_id, "workload": asdict(work), "sampling": sampling, "runs": summaries,
           "host": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before[0],
                    "load_avg_1m_after": os.getloadavg()[0]}}
    if "engine alone" in summaries:
        out["served_over_engine"] = summaries["served"]["tokens_per_s"] / summaries["engine alone"]["tokens_per_s"]
        print(f"served / engine alone: {out['served_over_engine']:.3f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1, default=float))
        json_path = a.out
    else:
        from benchmarks.common import save

        json_path = save("serve_load", out)
    plot(runs, json_path.with_suffix(".png"), f"serve_load: {model_id}, {a.conversations} conversations x "
         f"{a.turns} turns, {a.max_tokens} tokens, T={a.temperature} top_p={a.top_p}")
    if any(s["errors"] for s in summaries.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
