"""Host tier (engine/host_tier.py): idle sessions' pages in pinned host memory instead of re-prefills.

  copy       host<->device copy rate of the tier's own pinned memory, measured in this run
  resume     a full S+W session: offload, reload (host -> pool) and re-prefill of the same session,
             reload rate against the measured host->device rate (target >= 0.8)
  overlap    other sessions' decode step time while a full session is reloaded (and offloaded),
             against their steady step time (target within 10%)
  churn      1,000 conversations on one replica (8B, full GPU pool), returns drawn from a Zipf law:
             TTFT p50/p99 of returning turns, re-prefills and their GPU time, tiers on vs off;
             sessions kept warm (GPU + host) with the bytes they use

Random weights of the model shapes (as --load-format dummy): the arithmetic of real ones.

    python benchmarks/host_tier.py              # H200: 7B and 8B shapes, ~6 min, host tier <= --host-gb
    python benchmarks/host_tier.py --smoke      # tiny shape, seconds (CPU: results under results/cpu)
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import deque

import common as C
import numpy as np
import torch
from tqdm import tqdm

from swift_engine.config import EngineConfig
from swift_engine.engine.cache import ceil_div, running_pages
from swift_engine.engine.core import EngineCore
from swift_engine.engine.host_tier import paged
from swift_engine.engine.session import Session
from swift_engine.engine.stats import view_of
from swift_engine.models.random_init import random_model
from swift_engine.models.tiny import TINY_CONFIG

S = 4
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def clock() -> float:
    sync()
    return time.perf_counter()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def make_core(model, L: int, pages: int, host_bytes: int, mbt: int, max_running: int) -> EngineCore:
    dtype = "bfloat16" if model.lm_head.weight.dtype == torch.bfloat16 else "float32"
    cfg = EngineConfig(model="random", device=DEV, dtype=dtype, sink_tokens=S, window_tokens=L - S, page_size=16,
                       num_pages=pages, max_batch_tokens=mbt, max_running=max_running, max_prompt_tokens=1 << 22,
                       host_cache_bytes=host_bytes)
    return EngineCore(cfg, model, None)


def page_bytes(model) -> int:
    return C.kv_bytes(model.args, 16, model.lm_head.weight.element_size())


def host_for(model, L: int, sessions: int) -> int:
    """host_cache_bytes holding `sessions` full sessions."""
    return sessions * ceil_div(L + 16, 16) * page_bytes(model)


def prefill(core: EngineCore, sid: str, L: int, seed: int) -> None:
    """A full session, past its first eviction (L + 32 tokens seen)."""
    req = C.submit_generate(core, sid, C.random_ids(L + 32, core.vocab_size, seed), 1)
    C.step_until(core, lambda: req.phase == "done")


def offload(core: EngineCore, sid: str) -> float:
    t = clock()
    core.scheduler.evict_session(core.sessions[sid])
    core.host.wait()
    return (time.perf_counter() - t) * 1e3


# ---- copy rate and resume --------------------------------------------------------------
def copy_rates(core: EngineCore, gib: float) -> dict:
    """Pinned host <-> device rate over the tier's own memory (before any session uses it)."""
    n = min(int(gib * 2**30), core.host.host.numel())
    src = core.host.host.view(-1)[:n]
    dst = torch.empty(n, dtype=torch.uint8, device=DEV)
    rate = {}
    for name, fn in (("h2d_gbs", lambda: dst.copy_(src, non_blocking=True)),
                     ("d2h_gbs", lambda: src.copy_(dst, non_blocking=True))):
        fn()
        times = []
        for _ in range(5):
            t = clock()
            fn()
            times.append(clock() - t)
        rate[name] = n / statistics.median(times) / 1e9
    del dst
    return rate


def resume(model, L: int, reps: int) -> dict:
    """Offload / reload / re-prefill of one full session, and the TTFT of a turn after each."""
    core = make_core(model, L, 2 * running_pages(S, L - S, 16, 4096), host_for(model, L, 2), mbt=4096,
                     max_running=1)
    rates = copy_rates(core, 2.0)
    prefill(core, "s", L, 1)
    nbytes = core.sessions["s"].table.pages * core.host.page_bytes
    out_ms, in_ms, ttft = [], [], {"resident": [], "host": [], "ids": []}
    for i in range(reps + 1):  # the first round warms up
        ttft["resident"].append(turn_ttft(core, "s", i))
        out_ms.append(offload(core, "s"))
        t = clock()
        core.host.reload("s", core.sessions["s"].table)  # by hand: the copy alone
        sync()
        in_ms.append((time.perf_counter() - t) * 1e3)
        offload(core, "s")  # back to the host tier: the turn below reloads it through the engine
        ttft["host"].append(turn_ttft(core, "s", 100 + i))
        offload(core, "s")
        core.host.discard("s")  # ... and out of it: ids only, the turn below re-prefills them
        core.sessions["s"].needs_reprefill = True
        ttft["ids"].append(turn_ttft(core, "s", 200 + i))
    med = lambda xs: statistics.median(xs[1:])
    r = dict(session_bytes=nbytes, **rates, offload_ms=med(out_ms), reload_ms=med(in_ms),
             reload_gbs=nbytes / med(in_ms) / 1e6, offload_gbs=nbytes / med(out_ms) / 1e6,
             ttft_ms={k: med(v) for k, v in ttft.items()})
    r["reprefill_ms"] = r["ttft_ms"]["ids"] - r["ttft_ms"]["resident"]  # the re-prefill's share of the TTFT
    r["reload_of_h2d"] = r["reload_gbs"] / r["h2d_gbs"]
    r["h2d_floor_ms"] = nbytes / r["h2d_gbs"] / 1e6
    del core
    C.free()
    return r


def turn_ttft(core: EngineCore, sid: str, seed: int, new: int = 32) -> float:
    t = clock()
    req = C.submit_generate(core, sid, C.random_ids(new, core.vocab_size, seed), 2)
    C.step_until(core, lambda: req.output_ids)
    ms = (time.perf_counter() - t) * 1e3
    C.step_until(core, lambda: req.phase == "done")
    return ms


# ---- overlap with decode steps ----------------------------------------------------------
def timed_step(core: EngineCore) -> float:
    t = time.perf_counter()
    core.step()  # the sampler's copy to the host ends every step
    return (time.perf_counter() - t) * 1e3


def overlap(model, L: int, batch: int, reps: int, steady_steps: int) -> dict:
    reserve = running_pages(S, L - S, 16, 512)
    core = make_core(model, L, (batch + 3) * reserve, host_for(model, L, 2), mbt=512, max_running=batch + 1)
    prefill(core, "back", L, 1)
    offload(core, "back")
    others = [C.submit_generate(core, f"o{i}", C.random_ids(L + 32, core.vocab_size, 10 + i), 1_000_000)
              for i in range(batch)]
    C.step_until(core, lambda: all(r.phase == "decode" for r in others))
    for _ in range(5):
        core.step()
    steady = [timed_step(core) for _ in range(steady_steps)]
    during_in, during_out, join, reload_ms = [], [], [], []
    for i in range(reps):
        t = time.perf_counter()
        back = C.submit_generate(core, "back", C.random_ids(32, core.vocab_size, 50 + i), 1)
        for _ in range(10_000):  # steps while its pages arrive (the first one also queues the copies)
            if back.fed:
                break
            ms = timed_step(core)
            if back.fed == 0:
                during_in.append(ms)
            else:
                join.append(ms)
        reload_ms.append((time.perf_counter() - t) * 1e3)
        C.step_until(core, lambda: back.phase == "done")
        core.scheduler.evict_session(core.sessions["back"])  # the offload overlaps the next steps
        during_out.append(timed_step(core))
        while core.host.leaving:
            during_out.append(timed_step(core))
    for r in others:
        r.aborted = True
    core.step()
    med = statistics.median(steady)
    r = dict(batch=batch, steady_ms=med, steady_p90_ms=pct(steady, 90),
             during_reload_ms=statistics.median(during_in) if during_in else None,
             during_reload_max_ms=max(during_in, default=None), during_reload_steps=len(during_in),
             during_offload_ms=statistics.median(during_out), join_step_ms=statistics.median(join) if join else None,
             turn_to_first_fed_ms=statistics.median(reload_ms), steady=steady, during_reload=during_in,
             during_offload=during_out)
    if during_in:
        r["reload_over_steady"] = r["during_reload_ms"] / med
    r["offload_over_steady"] = r["during_offload_ms"] / med
    del core, others
    C.free()
    return r


# ---- churn -----------------------------------------------------------------------------
def clone(core: EngineCore, sid: str, src: str) -> None:
    """A session `sid` whose ids and pages copy `src`'s: seeds a conversation's past without its compute
    (not what is measured). Makes room as a new session would (evicting the least recently used)."""
    s0 = core.sessions[src]
    n = s0.table.pages
    while not core.scheduler._make_room(n, core.with_pages()):
        if not core.host.busy():
            raise RuntimeError("the pool cannot hold one more session")
        core.host.wait()
    s = Session(sid, S, core.config.window_tokens)
    s.sink_ids, s.pending, s.tokens_seen, s.turns = list(s0.sink_ids), s0.pending, s0.tokens_seen, 1
    s.tail_ids.extend(s0.tail_ids)
    t, t0 = s.table, s0.table
    pages = [core.cache.free.popleft() for _ in range(n)]
    t.sink_pages, t.window_pages = pages[:len(t0.sink_pages)], deque(pages[len(t0.sink_pages):])
    t.sink_len, t.window_start, t.window_len = t0.sink_len, t0.window_start, t0.window_len
    src_idx = torch.tensor(t0.sink_pages + list(t0.window_pages), device=DEV)
    dst_idx = torch.tensor(pages, device=DEV)
    for x in (core.cache.k, core.cache.v):
        pv = paged(x, core.cache.P)
        pv.index_copy_(1, dst_idx, pv.index_select(1, src_idx))
    core.sessions[sid] = core.resident[sid] = s


def tier_of(core: EngineCore, sid: str) -> str:
    s = core.sessions[sid]
    return "resident" if s.table.pages else "host" if core.host.holds(sid) else "ids"


def churn(model, L: int, pages: int, host_bytes: int, convs: int, turns: int, zipf_s: float, seed: int,
          label: str) -> dict:
    t = time.perf_counter()
    core = make_core(model, L, pages, host_bytes, mbt=4096, max_running=4)
    build_s = time.perf_counter() - t  # pinning the host tier is most of it
    prefill(core, "template", L, 7)
    core.sessions["template"].running = True  # never the eviction victim while it is copied from
    for i in tqdm(range(convs), desc=f"churn {label}: seed conversations", mininterval=2):
        clone(core, f"c{i}", "template")
    core.sessions["template"].running = False
    core.drop("template")
    core.host.wait()
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, convs + 1) ** zipf_s
    picks = rng.permutation(convs)[rng.choice(convs, size=turns + 10, p=p / p.sum())]  # rank -> conversation
    rows, reprefills0 = [], None
    for i, c in enumerate(tqdm(picks, desc=f"churn {label}: returning turns", mininterval=2)):
        if i == 10:  # the first 10 turns warm up (kernels, graphs)
            reprefills0, rows = core.reprefills, []
        sid = f"c{c}"
        tier = tier_of(core, sid)
        rows.append((tier, turn_ttft(core, sid, 1000 + i)))
    st = view_of(core).stats
    ttft = [ms for _, ms in rows]
    by = {k: [ms for t, ms in rows if t == k] for k in ("resident", "host", "ids")}
    r = dict(label=label, conversations=convs, turns=len(rows), zipf_s=zipf_s, host_cache_bytes_total=st.host_cache_bytes_total,
             host_cache_bytes_used=st.host_cache_bytes_used, pool_bytes=core.cache.num_pages * core.host.page_bytes,
             pool_bytes_used=st.pages_used * core.host.page_bytes,
             sessions_resident=st.sessions_resident, sessions_host=st.sessions_host,
             sessions_ids_only=st.sessions_ids_only, sessions_warm=st.sessions_resident + st.sessions_host,
             ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), reprefills=core.reprefills - reprefills0,
             reloads=st.reloads, offloads=st.offloads, host_drops=st.host_drops,
             turns_by_tier={k: len(v) for k, v in by.items()},
             ttft_p50_by_tier_ms={k: pct(v, 50) for k, v in by.items()},
             ttft_p99_by_tier_ms={k: pct(v, 99) for k, v in by.items()},
             ttft_ids_s=sum(by["ids"]) / 1e3, engine_build_s=build_s)
    del core
    C.free()
    return r


# ---- plot ------------------------------------------------------------------------------
def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    names = list(results["shapes"])
    x = np.arange(len(names))
    res = [results["shapes"][n]["resume"] for n in names]
    bars = (("h2d_floor_ms", "host->device copy floor"), ("reload_ms", "reload (copy)"),
            ("host", "TTFT of a turn from the host tier"), ("ids", "TTFT of a turn from ids only (re-prefill)"))
    for j, (key, lab) in enumerate(bars):
        vals = [r["ttft_ms"][key] if key in r["ttft_ms"] else r[key] for r in res]
        ax.bar(x + (j - 1.5) * 0.2, vals, 0.2, label=lab)
    ax.set_xticks(x, [f"{n}\n{r['session_bytes'] / 1e9:.2f} GB" for n, r in zip(names, res)])
    ax.set_ylabel("ms")
    ax.set_title(f"resume a full session (S+W = {results['cache_tokens']})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for n in names:
        o = results["shapes"][n]["overlap"]
        ax.plot(o["steady"], "o-", ms=3, label=f"{n}: steady ({o['batch']} sessions)")
        ax.plot(range(len(o["steady"]), len(o["steady"]) + len(o["during_reload"])), o["during_reload"], "s",
                label=f"{n}: during a reload")
        start = len(o["steady"]) + len(o["during_reload"])
        ax.plot(range(start, start + len(o["during_offload"])), o["during_offload"], "^",
                label=f"{n}: during an offload")
    ax.set_xlabel("step")
    ax.set_ylabel("decode step ms")
    ax.set_title("other sessions' decode steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[2]
    ch = results.get("churn", {})
    labels = list(ch)
    for j, q in enumerate(("ttft_p50_ms", "ttft_p99_ms")):
        ax.bar(np.arange(len(labels)) + (j - 0.5) * 0.35, [ch[k][q] for k in labels], 0.35, label=q[5:8])
    ax.set_xticks(np.arange(len(labels)),
                  [f"{k}\nwarm {ch[k]['sessions_warm']}, re-prefills {ch[k]['reprefills']}" for k in labels])
    ax.set_ylabel("TTFT of returning turns, ms")
    ax.set_title(f"churn: {results.get('churn_conversations')} conversations, Zipf returns")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"])
    p.add_argument("--cache", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="overlap: sessions decoding during the copies")
    p.add_argument("--churn-shape", default="llama3-8b")
    p.add_argument("--conversations", type=int, help="churn conversations (default 1000; --smoke 40)")
    p.add_argument("--turns", type=int, help="returning turns per churn run (default 1000; --smoke 60)")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--host-gb", type=float, default=64.0, help="churn: host tier size (the device has 128 GiB)")
    p.add_argument("--gpu-slack-gb", type=float, default=6.0, help="churn: GPU memory left beside the pool")
    p.add_argument("--smoke", action="store_true", help="tiny shape, small everything")
    a = p.parse_args()
    if a.smoke:
        C.SHAPES["tiny"] = TINY_CONFIG
        a.shapes, a.churn_shape, a.cache, a.reps, a.batch = ["tiny"], "tiny", 64, 2, 2
        a.conversations, a.turns, a.host_gb = a.conversations or 40, a.turns or 60, 0.0003
    a.conversations, a.turns = a.conversations or 1000, a.turns or 1000
    dtype = torch.bfloat16 if CUDA else torch.float32
    results = dict(S=S, cache_tokens=a.cache, shapes={})
    for name in a.shapes:
        C.log(f"== {name}")
        model = random_model(C.SHAPES[name], DEV, dtype, 0)
        r = dict(resume=resume(model, a.cache, a.reps))
        C.log("  resume", {k: round(v, 3) if isinstance(v, float) else v for k, v in r["resume"].items()})
        r["overlap"] = overlap(model, a.cache, a.batch, a.reps, 30)
        C.log("  overlap", {k: round(v, 3) if isinstance(v, float) else v for k, v in r["overlap"].items()
                            if not isinstance(v, list)})
        results["shapes"][name] = r
        C.save("host_tier", results)  # after every part: a run cut short keeps what it measured
        del model
        C.free()
    model = random_model(C.SHAPES[a.churn_shape], DEV, dtype, 0)
    if CUDA:
        pages = int((torch.cuda.mem_get_info()[0] - a.gpu_slack_gb * 2**30) // page_bytes(model))
    else:  # the reservation of the running turn and 8 idle sessions
        pages = running_pages(S, a.cache - S, 16, 4096) + 8 * ceil_div(a.cache + 16, 16)
    results["churn_conversations"], results["churn"] = a.conversations, {}
    for label, host_gb in (("tiers off", 0.0), ("tiers on", a.host_gb)):  # off first: one pinning
        C.log(f"== churn, {label}")
        r = churn(model, a.cache, pages, int(host_gb * 1e9), a.conversations, a.turns, a.zipf, 0, label)
        C.log("  ", {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
        results["churn"][label] = r
        C.save("host_tier", results)
    plot(results, C.results_dir() / "host_tier.png")


if __name__ == "__main__":
    main()
