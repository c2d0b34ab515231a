"""`swiftserve eval ppl`: perplexity of a long text under dense, window, recompute and StreamingLLM attention.

The text is tokenised with the model's tokenizer (BOS first, as a chat session starts) and
streamed through four kinds of attention (the StreamingLLM paper's Figure 3 and Tables 1-2):

- ``dense``: full attention over everything seen, positions 0..n-1 (the model's own dense
  forward, fed in chunks with a growing cache). Stops at ``--dense-tokens`` (default: the
  model's ``max_position_embeddings``, its training length); ask for more to watch it fail
  past the training length. Cost grows with the square of the length.
- ``window``: the engine with ``S = 0`` sinks and a window of ``C`` tokens (the oldest token is
  evicted per token; positions are cache positions).
- ``recompute``: sliding window with re-computation: each token is predicted by a fresh dense
  forward over the ``C`` tokens before it (the paper's strong, slow baseline). ``--recompute-stride k``
  scores only every k-th position past the first window, to bound the cost; every other
  run is then also reported on exactly those positions (column "PPL@recompute").
- ``streaming``: the engine with ``S`` sinks and a window of ``C - S`` tokens (StreamingLLM).
- ``pinned``: the text's first ``N`` tokens pinned (``pinned_tokens=N``, as a served session pins its
  system prompt), then a window of ``C - N`` tokens: reported beside 4 sinks at the same ``C``.

``C`` is the cache size in tokens (``--cache``), so every mode at one ``C`` holds the same number
of key/value pairs, as in the paper's comparison. ``window`` and ``streaming`` go through
``StreamingEngine.score`` exactly as a served session does, ``--chunk`` tokens per call
(``--chunk 1``: token by token).

Prints a table, writes ``<out>/<name>.json`` (per run: perplexity, bucketed curve, speed) and
``<out>/<name>.png`` (perplexity vs tokens seen, one panel per cache size; below it, the ratio to
recompute on the same positions).

    swiftserve eval ppl --model swiftserve-llama-7m --text .corpus/heldout.txt \\
        --max-tokens 100000 --cache 256 512 --sinks 4 --sink-sweep 0 1 2 4 8 --out benchmarks/results/quality
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

MODES = ("dense", "window", "recompute", "streaming", "pinned")


@dataclass(frozen=True)
class Run:
    mode: str
    cache: int = 0   # C: tokens of context kept (dense: how many tokens to score at most)
    sinks: int = 0   # S (streaming), N (pinned)
    kv_cache_dtype: str = "auto"  # engine runs (window, streaming, pinned): the cache (fp8: e4m3)

    @property
    def label(self) -> str:
        kv = "" if self.kv_cache_dtype == "auto" else f", {self.kv_cache_dtype} KV"
        if self.mode in ("streaming", "pinned"):
            return f"{self.mode} {self.sinks}+{self.cache - self.sinks}{kv}"
        if self.mode == "window":
            return f"window 0+{self.cache}{kv}"
        if self.mode == "recompute":
            return f"recompute {self.cache}"
        return f"dense <= {self.cache}"

    @classmethod
    def parse(cls, spec: str) -> Run:
        """'dense:2048', 'window:256', 'recompute:256', 'streaming:4+252' (S+W, cache = S + W),
        'pinned:64+192' (N+W)."""
        mode, _, arg = spec.partition(":")
        if mode not in MODES or not arg:
            raise ValueError(f"run spec {spec!r}: expected one of {MODES} with ':<tokens>' (streaming: ':S+W')")
        if mode in ("streaming", "pinned"):
            s, _, w = arg.partition("+")
            if not w:
                raise ValueError(f"run spec {spec!r}: {mode} takes S+W, e.g. {mode}:4+252")
            return cls(mode, int(s) + int(w), int(s)) if int(s) else cls("window", int(w), 0)
        return cls(mode, int(arg))


@dataclass
class RunResult:
    run: Run
    logprobs: torch.Tensor          # [N-1] float64, log p(ids[t] | context) for t = 1..N-1; NaN = not scored
    seconds: float
    chunk: int | None = None
    notes: list[str] = field(default_factory=list)
    stride: int = 1                 # recompute: every stride-th position past the first window is scored

    @property
    def scored(self) -> torch.Tensor:
        return ~torch.isnan(self.logprobs)

    def ppl(self, mask: torch.Tensor | None = None) -> float:
        m = self.scored if mask is None else self.scored & mask
        return math.exp(-self.logprobs[m].mean().item()) if m.any() else float("nan")


# ---- dense attention over our CausalLM ------------------------------------
class DenseAttention:
    """Causal attention at absolute positions for `model.forward` (flattened [B * T] tokens).

    batch > 1: B independent sequences of T tokens, positions 0..T-1 (no cache).
    batch == 1 with `grow=True`: keeps every layer's rotated keys and values, so a long
    sequence can be fed in chunks (chunk tokens at positions offset..offset+T-1).
    """

    def __init__(self, model, max_positions: int, batch: int = 1, grow: bool = False):
        from ..errors import UnsupportedModelError
        from ..layers.rotary import model_rotary

        a = model.args
        if a.attn_softcap is not None:
            raise UnsupportedModelError("eval dense mode: attention soft-capping (Gemma 2) is not implemented here")
        dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.rope, self.scale = model_rotary(a, max_positions, dev, dt), a.attn_scale
        self.batch, self.grow, self.offset = batch, grow, 0
        self.k: list[torch.Tensor | None] = [None] * a.num_layers
        self.v: list[torch.Tensor | None] = [None] * a.num_layers

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        t = q.shape[0] // b
        pos = torch.arange(self.offset, self.offset + t, device=q.device)
        q = self.rope.rotate(q, pos.repeat(b)).view(b, t, *q.shape[1:]).transpose(1, 2)   # [B, Hq, T, D]
        k = self.rope.rotate(k, pos.repeat(b)).view(b, t, *k.shape[1:]).transpose(1, 2)   # [B, Hkv, T, D]
        v = v.view(b, t, *v.shape[1:]).transpose(1, 2)
        if self.grow:
            if self.k[layer] is not None:
                k = torch.cat([self.k[layer], k], dim=2)
                v = torch.cat([self.v[layer], v], dim=2)
            self.k[layer], self.v[layer] = k, v
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        n = k.shape[2]
        mask = torch.arange(n, device=q.device)[None, :] <= (n - t + torch.arange(t, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=self.scale)
        if self.grow and layer == len(self.k) - 1:
            self.offset += t
        return out.to(q.dtype).transpose(1, 2).reshape(b * t, q.shape[1], q.shape[-1])


def _target_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(model.logits(hidden), dim=-1)
    return lp.gather(-1, targets[:, None].to(lp.device))[:, 0].double().cpu()


@torch.no_grad()
def score_dense(model, ids: list[int], max_tokens: int, chunk: int = 512, progress: bool = False) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t < min(len(ids), max_tokens) with dense attention; NaN beyond."""
    n = min(len(ids), max_tokens)
    out = torch.full((len(ids) - 1,), float("nan"), dtype=torch.float64)
    attn = DenseAttention(model, max(n, 1), grow=True)
    dev = model.lm_head.weight.device
    x = torch.tensor(ids[:n], device=dev)
    bar = tqdm(total=n, desc="dense", unit="tok", disable=not progress, leave=False)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hidden = model(x[s:e], attn)
        rows = torch.arange(s, min(e, n - 1))  # row r predicts token r + 1
        if len(rows):
            out[rows] = _target_logprobs(model, hidden[: len(rows)], x[rows + 1])
        bar.update(e - s)
    bar.close()
    return out


@torch.no_grad()
def score_recompute(model, ids: list[int], context: int, stride: int = 1, batch: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """Sliding window with re-computation: log p(ids[t] | ids[t-C:t]) by a dense forward per position.

    Positions t <= C share one dense forward over ids[:C] (their context is ids[:t], exactly
    what a fresh dense forward of it gives). Past that, every `stride`-th position is scored.
    """
    dev = model.lm_head.weight.device
    out = torch.full((len(ids) - 1,), float("nan"), dtype=torch.float64)
    out[: min(context, len(ids) - 1)] = score_dense(model, ids, context + 1)[: min(context, len(ids) - 1)]
    targets = [t for t in range(context + 1, len(ids)) if t % stride == 0]
    x = torch.tensor(ids, device=dev)
    bar = tqdm(total=len(targets), desc=f"recompute {context}", unit="tok", disable=not progress, leave=False)
    for i in range(0, len(targets), batch):
        ts = torch.tensor(targets[i:i + batch], device=dev)
        windows = ts[:, None] - context + torch.arange(context, device=dev)[None, :]   # [B, C]
        hidden = model(x[windows].reshape(-1), DenseAttention(model, context, batch=len(ts)))
        last = hidden.view(len(ts), context, -1)[:, -1]
        out[(ts - 1).cpu()] = _target_logprobs(model, last, x[ts])
        bar.update(len(ts))
    bar.close()
    return out


def score_streaming(model, ids: list[int], sinks: int, window: int, chunk: int, device: str | None = None,
                    progress: bool = False, label: str = "", kv_cache_dtype: str = "auto",
                    pinned: int = 0) -> torch.Tensor:
    """log p(ids[t] | StreamingLLM cache) through `StreamingEngine.score`, `chunk` tokens per call;
    with `pinned`, the first call pins the stream's first `pinned` tokens."""
    from ..config import EngineConfig
    from ..engine.async_engine import StreamingEngine

    device = device or str(model.lm_head.weight.device)
    page = 16
    pages = math.ceil(max(sinks, pinned) / page) + math.ceil((window + page - 1) / page) + math.ceil(chunk / page) + 4
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[model.lm_head.weight.dtype]
    cfg = EngineConfig(model="in-memory", sink_tokens=sinks, window_tokens=window, page_size=page, num_pages=pages,
                       max_batch_tokens=max(chunk, 16), max_prompt_tokens=max(chunk, pinned, 16), device=device,
                       dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_pinned_tokens=max(pinned, sinks))
    engine = StreamingEngine(cfg, model=model, tokenizer=None)
    out: list[float] = []
    bar = tqdm(total=len(ids), desc=label or f"streaming {sinks}+{window}", unit="tok", disable=not progress,
               leave=False)
    try:
        first = max(chunk, pinned)  # the pinned tokens come in the first call
        for s in [0, *range(first, len(ids), chunk)]:
            lps = engine.score_sync("ppl", ids[s:s + (first if s == 0 else chunk)], pinned if s == 0 else 0)
            out.extend(lps)
            bar.update(len(lps))
    finally:
        bar.close()
        engine.shutdown()
    assert out[0] is None and len(out) == len(ids)
    return torch.tensor(out[1:], dtype=torch.float64)


class _ProbeAttention(DenseAttention):
    """Dense attention that also records the attention weight every head puts on position 0."""

    def __init__(self, model, length: int, first_query: int):
        super().__init__(model, length)
        self.first_query, self.on_first = first_query, []

    def __call__(self, layer, q, k, v):
        t, pos = q.shape[0], torch.arange(q.shape[0], device=q.device)
        qr, kr = self.rope.rotate(q, pos).transpose(0, 1).float(), self.rope.rotate(k, pos).transpose(0, 1).float()
        group = qr.shape[0] // kr.shape[0]
        kr, vv = kr.repeat_interleave(group, 0), v.transpose(0, 1).float().repeat_interleave(group, 0)
        scores = (qr @ kr.transpose(1, 2)) * qr.shape[-1] ** -0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        p = scores.softmax(-1)
        self.on_first.append(p[:, self.first_query:, 0].mean(-1).cpu())   # [H]
        return (p @ vv).transpose(0, 1).to(q.dtype)


@torch.no_grad()
def first_token_attention(model, ids: list[int], length: int, segments: int = 16) -> dict:
    """How much attention each layer/head puts on the first token (the would-be sink).

    `segments` windows of `length` tokens are cut from the stream, each with ids[0] (BOS) in
    front; for the queries in the second half of each window, the mean attention weight on
    position 0 is averaged over the windows. Uniform attention would give about
    `uniform` (the mean of 1/(q+1) over those queries); attention sinks give far more.
    """
    dev = model.lm_head.weight.device
    body = length - 1
    n = max(1, min(segments, (len(ids) - 1) // body))
    per = []
    for i in range(n):
        x = torch.tensor([ids[0]] + ids[1 + i * body:1 + (i + 1) * body], device=dev)
        attn = _ProbeAttention(model, len(x), len(x) // 2)
        model(x, attn)
        per.append(torch.stack(attn.on_first))   # [L, H]
    mean = torch.stack(per).mean(0)
    qs = torch.arange(length // 2, length, dtype=torch.float64)
    return {"length": length, "segments": n, "uniform": round(float((1 / (qs + 1)).mean()), 5),
            "per_layer_mean": [round(x, 5) for x in mean.mean(1).tolist()],
            "per_layer_max_head": [round(x, 5) for x in mean.max(1).values.tolist()],
            "per_head": [[round(x, 5) for x in row] for row in mean.tolist()]}


# ---- the harness ------------------------------------------------------------
def evaluate(model, ids: list[int], runs: list[Run], chunk: int = 256, recompute_stride: int = 1,
             recompute_batch: int = 16, device: str | None = None, progress: bool = True) -> list[RunResult]:
    results = []
    for run in tqdm(runs, desc="runs", unit="run", disable=not progress):
        start = time.perf_counter()
        notes = []
        if run.mode == "dense":
            lp = score_dense(model, ids, run.cache, chunk=max(chunk, 64), progress=progress)
        elif run.mode == "recompute":
            lp = score_recompute(model, ids, run.cache, recompute_stride, recompute_batch, progress)
            if recompute_stride > 1:
                notes.append(f"positions past the first {run.cache} subsampled: every {recompute_stride}th")
        elif run.mode == "pinned":
            lp = score_streaming(model, ids, 0, run.cache - run.sinks, chunk, device, progress, run.label,
                                 run.kv_cache_dtype, pinned=run.sinks)
        else:
            lp = score_streaming(model, ids, run.sinks, run.cache - run.sinks, chunk, device, progress, run.label,
                                 run.kv_cache_dtype)
        results.append(RunResult(run, lp, time.perf_counter() - start,
                                 chunk if run.mode in ("window", "streaming", "pinned") else None, notes,
                                 recompute_stride if run.mode == "recompute" else 1))
    return results


def curve(result: RunResult, bucket: int) -> dict:
    """Perplexity per bucket of `bucket` target positions (x = tokens seen at the bucket's last scored position).

    A subsampled run (recompute with stride k) gets buckets ceil(k / 4) times longer, so each
    point still averages a few hundred positions.
    """
    bucket *= math.ceil(result.stride / 4)
    xs, ys, counts = [], [], []
    lp = result.logprobs
    for s in range(0, len(lp), bucket):
        part = lp[s:s + bucket]
        m = ~torch.isnan(part)
        if m.any():
            xs.append(s + int(m.nonzero()[-1]) + 1)   # tokens seen at the bucket's last scored position
            ys.append(round(math.exp(-part[m].mean().item()), 4))
            counts.append(int(m.sum()))
    return {"tokens_seen": xs, "ppl": ys, "scored": counts, "bucket": bucket}


def summarize(results: list[RunResult], bucket: int) -> list[dict]:
    rec = [r for r in results if r.run.mode == "recompute"]
    rows = []
    for r in results:
        matched = {f"ppl_at_{q.run.label.replace(' ', '_')}": round(r.ppl(q.scored), 4) for q in rec}
        n = int(r.scored.sum())
        rows.append({
            "label": r.run.label, **asdict(r.run), "window": r.run.cache - r.run.sinks, "chunk": r.chunk,
            "scored_tokens": n, "ppl": round(r.ppl(), 4), **matched,
            "ppl_after_first_cache": round(r.ppl(torch.arange(len(r.logprobs)) >= r.run.cache), 4)
            if r.run.mode != "dense" else None,
            "seconds": round(r.seconds, 2), "tokens_per_s": round(n / max(r.seconds, 1e-9), 1),
            "recompute_stride": r.stride if r.run.mode == "recompute" else None,
            "notes": r.notes, "curve": curve(r, bucket),
            "vs_recompute": _ratio_curve(r, q, bucket) if (q := next(
                (q for q in rec if q.run.cache == r.run.cache and r.run.mode in ("window", "streaming")), None))
            else None,
        })
    return rows


def _ratio_curve(r: RunResult, q: RunResult, bucket: int) -> dict:
    """Per bucket, this run's perplexity over the positions recompute run `q` scored, divided by q's."""
    bucket *= math.ceil(q.stride / 4)
    xs, ratios = [], []
    for s in range(0, len(q.logprobs), bucket):
        m = q.scored[s:s + bucket] & r.scored[s:s + bucket]
        if m.any():
            xs.append(s + int(m.nonzero()[-1]) + 1)
            diff = q.logprobs[s:s + bucket][m].mean() - r.logprobs[s:s + bucket][m].mean()   # log(ppl_r / ppl_q)
            ratios.append(round(math.exp(diff.item()), 5))
    return {"recompute": q.run.label, "tokens_seen": xs, "ppl_ratio": ratios, "bucket": bucket}


def table(rows: list[dict]) -> str:
    rec_keys = sorted({k for row in rows for k in row if k.startswith("ppl_at_")})
    head = ["run", "cache", "scored", "PPL"] + [f"PPL@{k[7:]}" for k in rec_keys] + ["tok/s"]
    lines = [head]
    for r in rows:
        lines.append([r["label"], str(r["cache"]), str(r["scored_tokens"]), f"{r['ppl']:.3f}"]
                     + [f"{r[k]:.3f}" for k in rec_keys] + [f"{r['tokens_per_s']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def plot(rows: list[dict], path: Path, title: str, main_sinks: int = 4, training_length: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = sorted({r["cache"] for r in rows if r["mode"] != "dense"}) or [0]
    ratios = any(r.get("vs_recompute") for r in rows)
    fig, axes = plt.subplots(1 + ratios, len(caches), figsize=(6.5 * len(caches), 4.5 + 2.8 * ratios),
                             squeeze=False, gridspec_kw={"height_ratios": [1.6, 1][: 1 + ratios]})
    colors = {"dense": "tab:red", "window": "tab:orange", "recompute": "tab:blue", "streaming": "tab:green",
              "pinned": "tab:purple"}
    for ax, c in zip(axes[0], caches):
        for r in rows:
            if r["mode"] != "dense" and r["cache"] != c:
                continue
            cv = r["curve"]
            style = dict(color=colors[r["mode"]], lw=1.5)
            if r["mode"] == "streaming" and r["sinks"] != main_sinks:  # the sink sweep: thinner, dotted
                style.update(lw=0.9, ls=":", alpha=0.8, color=plt.cm.viridis(min(r["sinks"], 8) / 9))
            if r.get("kv_cache_dtype", "auto") != "auto":  # fp8 KV: dashed, beside its model-dtype run
                style.update(ls="--", color="black", lw=1.0)
            if len(cv["ppl"]) < 4:
                style["marker"] = "o"
            label = f"{r['label']} ({r['ppl']:.2f})"
            if cv["bucket"] != rows[0]["curve"]["bucket"] and r["mode"] == "recompute":
                label += f", 1 in {r['recompute_stride']} positions, per {cv['bucket']}"
            ax.plot(cv["tokens_seen"], cv["ppl"], label=label, **style)
        if training_length and training_length <= max(x for r in rows for x in r["curve"]["tokens_seen"]):
            ax.axvline(training_length, color="grey", ls="--", lw=0.8, label=f"training length {training_length}")
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(f"perplexity per {min(r['curve']['bucket'] for r in rows)} tokens (log)")
        ax.set_title(f"cache {c} tokens" if c else "dense")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax, c in zip(axes[1] if ratios else [], caches):
        for r in rows:
            vr = r.get("vs_recompute")
            if not vr or r["cache"] != c:
                continue
            sweep = r["mode"] == "streaming" and r["sinks"] != main_sinks
            style = dict(lw=0.9, ls=":", color=plt.cm.viridis(min(r["sinks"], 8) / 9)) if sweep else \
                dict(lw=1.5, color=colors[r["mode"]])
            ax.plot(vr["tokens_seen"], vr["ppl_ratio"], label=r["label"], marker="o" if len(vr["ppl_ratio"]) < 4 else None,
                    **style)
        ax.axhline(1.0, color=colors["recompute"], lw=1.0)
        ax.axhline(1.1, color="grey", ls="--", lw=0.8, label="+10%")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("PPL / recompute PPL\n(same positions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_runs(modes: list[str], caches: list[int], sinks: int, sweep: list[int], dense_tokens: int,
               specs: list[str], kv_dtypes: tuple[str, ...] = ("auto",), pinned: list[int] = ()) -> list[Run]:
    runs = [Run.parse(s) for s in specs]
    if "dense" in modes:
        runs.append(Run("dense", dense_tokens))
    for c in caches:
        for m in ("window", "recompute", "streaming"):
            if m in modes:
                runs.append(Run(m, c, sinks) if m == "streaming" and sinks else Run("window" if m == "streaming" else m, c))
        for s in sweep:
            runs.append(Run("streaming", c, s) if s else Run("window", c))
        runs += [Run("pinned", c, n) for n in pinned]
    # engine runs once per cache dtype; the others (not the engine) once, by the dedup below
    runs = [replace(r, kv_cache_dtype=kv) if r.mode in ("window", "streaming", "pinned") else r
            for r in runs for kv in kv_dtypes]
    seen, out = set(), []
    for r in runs:
        if r.mode in ("streaming", "pinned") and r.sinks >= r.cache:
            raise ValueError(f"{r.label}: sinks must be fewer than the cache size")
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="swiftserve eval ppl", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="HF checkpoint dir, .gguf file, hub id, a packaged or bundled model's name, or 'tiny'")
    ap.add_argument("--text", type=Path, required=True, help="UTF-8 text file to stream")
    ap.add_argument("--max-tokens", type=int, default=100_000, help="tokens of the text to use (BOS included)")
    ap.add_argument("--no-bos", action="store_true", help="don't put the tokenizer's BOS first")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--cache", type=int, nargs="+", default=[256], help="cache sizes C = S + W (tokens)")
    ap.add_argument("--sinks", type=int, default=4, help="S for the streaming mode")
    ap.add_argument("--pinned", type=int, nargs="*", default=[],
                    help="also run with the text's first N tokens pinned (then C - N window) at every cache size")
    ap.add_argument("--sink-sweep", type=int, nargs="*", default=[],
                    help="also run streaming with these sink counts at every cache size (0 = window)")
    ap.add_argument("--dense-tokens", type=int, help="dense mode stops here (default: max_position_embeddings)")
    ap.add_argument("--run", dest="specs", nargs="*", default=[],
                    help="extra runs: dense:N window:C recompute:C streaming:S+W")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per engine.score call (1: token by token)")
    ap.add_argument("--recompute-stride", type=int, default=1, help="score every k-th position past the first window")
    ap.add_argument("--recompute-batch", type=int, default=16, help="windows per dense forward")
    ap.add_argument("--bucket", type=int, default=1000, help="tokens per point of the curve")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "fp8"],
                    help="engine runs (window, streaming) once per cache dtype: 'auto fp8' compares FP8 KV")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    ap.add_argument("--name", default="ppl", help="file stem of the JSON and PNG")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--probe-sinks", action="store_true",
                    help="also report the attention each layer/head puts on the first token (BOS)")
    ap.add_argument("--probe-length", type=int,
                    help="tokens per probe window (default: the training length; its attention is materialised)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from ..config import EngineConfig
    from ..models.loader import load_model, read_config, resolve_model_dir
    from ..tokenizer import ChatTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    dtype = EngineConfig(device=args.device, dtype=args.dtype).torch_dtype
    model = load_model(model_dir, args.device, dtype, progress=not args.quiet)
    tok = ChatTokenizer(model_dir)
    ids = tok.encode(args.text.read_text(encoding="utf-8"))
    if not args.no_bos and tok.hf.bos_token_id is not None:
        ids = [tok.hf.bos_token_id] + ids
    ids = ids[: args.max_tokens]
    train_len = int(read_config(model_dir).get("max_position_embeddings") or 2048)
    runs = build_runs(args.modes, args.cache, args.sinks, args.sink_sweep, args.dense_tokens or train_len, args.specs,
                      tuple(args.kv_cache_dtype), args.pinned)
    print(f"{model_dir.name}: {len(ids)} tokens of {args.text.name}; runs: {', '.join(r.label for r in runs)}",
          file=sys.stderr)
    results = evaluate(model, ids, runs, args.chunk, args.recompute_stride, args.recompute_batch, args.device,
                       progress=not args.quiet)
    rows = summarize(results, args.bucket)
    print(table(rows))
    report = {
        "model": str(args.model), "model_dir_name": model_dir.name, "text": args.text.name, "tokens": len(ids),
        "bos": not args.no_bos, "training_length": train_len, "chunk": args.chunk,
        "recompute_stride": args.recompute_stride, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "runs": rows,
    }
    if args.probe_sinks:
        probe = first_token_attention(model, ids, min(args.probe_length or train_len, len(ids)))
        report["first_token_attention"] = probe
        print(f"attention on the first token (queries {probe['length'] // 2}..{probe['length'] - 1}; uniform "
              f"{probe['uniform']}): per layer mean {probe['per_layer_mean']}, max head {probe['per_layer_max_head']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    if not args.no_plot:
        plot(rows, args.out / f"{args.name}.png",
             f"{model_dir.name} on {args.text.name}: {len(ids)} tokens, BOS first, chunk {args.chunk}", args.sinks,
             train_len)
    print(f"wrote {args.out / (args.name + '.json')}" + ("" if args.no_plot else f" and {args.name}.png"),
          file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
