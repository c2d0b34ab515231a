"""Train the small Llama-style reference model on the corpus of `benchmarks/corpus.py`.

Plain PyTorch on Hugging Face's `LlamaForCausalLM` (SDPA attention), saved as an ordinary HF
checkpoint (bf16 safetensors + config.json + generation_config.json + the corpus's tokenizer)
that `StreamingEngine` loads like any other model.

Recipe: every training sequence is `<|bos|>` followed by 511 tokens cut at a uniformly random
offset of the training token stream (documents packed, separated by blank lines), so the
model meets the same start it meets in a chat session (the chat template begins with BOS).
AdamW (0.9, 0.95), weight decay 0.1 on matrices, linear warm-up then cosine decay to 10%,
gradient clipping 1.0, bf16 autocast (CPU and CUDA; `--amp off` for fp32).

Self-contained on purpose (imports torch, numpy, safetensors, transformers only; never the
`swift_engine` package, so it runs on a bare GPU box): run it as a script,

    python benchmarks/train_reference.py --data .corpus --out /tmp/swiftserve-llama-7m --minutes 20

`--minutes` sets the step count from the measured speed of the first steps (the log records the
count; pass `--steps N` to replay the same schedule). `--device cuda --compile` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PRESETS = {  # weights in bf16: 7m ~13.7 MB, 3m ~6.8 MB
    "7m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=4, head_dim=32),
    "3m": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=3, head_dim=32),
    "test": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8),
}


def model_config(preset: str, vocab_size: int, context: int, bos: int, eos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        **PRESETS[preset], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": context, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": bos, "eos_token_id": eos,
    }


class Batches:
    """BOS + (context - 1) tokens from random offsets of a uint16 token file."""

    def __init__(self, path: Path, context: int, bos: int, seed: int):
        self.ids = np.fromfile(path, dtype=np.uint16)
        self.context, self.bos = context, bos
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> torch.Tensor:
        n = self.context - 1
        starts = self.rng.integers(0, len(self.ids) - n, size=batch)
        rows = np.stack([self.ids[s:s + n] for s in starts]).astype(np.int64)
        return torch.cat([torch.full((batch, 1), self.bos), torch.from_numpy(rows)], dim=1)

    def fixed(self, batch: int) -> torch.Tensor:
        """The first batch * (context - 1) tokens, cut in order (a fixed held-out set)."""
        n = self.context - 1
        rows = self.ids[:batch * n].astype(np.int64).reshape(batch, n)
        return torch.cat([torch.full((batch, 1), self.bos), torch.from_numpy(rows)], dim=1)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_of(model, x: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, x: torch.Tensor, amp: bool, micro: int) -> float:
    model.eval()
    losses = [loss_of(model, x[i:i + micro], amp).item() for i in range(0, len(x), micro)]
    model.train()
    return float(np.mean(losses))


def save_checkpoint(model, cfg: dict, out: Path, tokenizer_dir: Path | None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"]]}, indent=2))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)


def train(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    tok_dir = args.data / "tokenizer"
    tok_cfg = json.loads((tok_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok_cfg["added_tokens"]}
    vocab = max(specials.values()) + 1 if not tok_cfg["model"]["vocab"] else \
        max(max(tok_cfg["model"]["vocab"].values()), max(specials.values())) + 1
    bos, eos = specials["<|bos|>"], specials["<|end|>"]
    cfg = model_config(args.preset, vocab, args.context, bos, eos)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg).to(device)
    with torch.no_grad():  # GPT-2 style: residual projections scaled by 1/sqrt(2 * layers)
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(1 / math.sqrt(2 * cfg["num_hidden_layers"]))
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    amp = args.amp == "on"
    step_fn = torch.compile(model) if args.compile else model
    data = Batches(args.data / "train.bin", args.context, bos, args.seed)
    held = Batches(args.data / "heldout.bin", args.context, bos, 0).fixed(args.eval_batch).to(device)
    micro = args.micro_batch or args.batch
    accum = args.batch // micro
    total = args.steps or 10**9
    log: dict = {"config": cfg, "params": params, "args": {k: str(v) for k, v in vars(args).items()},
                 "torch": torch.__version__, "device": str(device), "train": [], "eval": []}
    print(f"params {params / 1e6:.2f}M, vocab {vocab}, batch {args.batch}x{args.context}", file=sys.stderr)
    start = time.time()
    step = 0
    while step < total:
        if step == 5:
            t5 = time.time()  # past compilation and warm-up of the allocator
        if args.minutes and args.steps is None and step == max(args.calibrate_steps, 10):
            per_step = (time.time() - t5) / (step - 5)
            remaining = args.minutes * 60 - (time.time() - start)
            total = max(step + 1, step + int(remaining / per_step * 0.97))
            log["calibrated_steps"] = total
            print(f"{per_step:.3f} s/step -> {total} steps", file=sys.stderr)
        lr = lr_at(step, total if total < 10**9 else max(args.calibrate_steps * 50, 1000), args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for _ in range(accum):
            x = data.sample(micro).to(device, non_blocking=True)
            try:
                loss = loss_of(step_fn, x, amp)
                (loss / accum).backward()
            except Exception as exc:  # a compile failure must not cost the run: fall back to eager
                if step_fn is model:
                    raise
                print(f"torch.compile failed ({type(exc).__name__}: {exc}); eager from here", file=sys.stderr)
                step_fn = model
                opt.zero_grad(set_to_none=True)
                loss = loss_of(step_fn, x, amp)
                (loss / accum).backward()
            loss_sum += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == 1:
            elapsed = time.time() - start
            log["train"].append({"step": step, "loss": round(loss_sum, 4), "lr": lr, "s": round(elapsed, 1)})
            print(f"step {step}/{total if total < 10**9 else '?'} loss {loss_sum:.3f} lr {lr:.2e} "
                  f"{step * args.batch * args.context / elapsed:.0f} tok/s", file=sys.stderr)
        if step % args.eval_every == 0 or step == total:
            ev = evaluate(model, held, amp, micro)
            log["eval"].append({"step": step, "heldout_loss": round(ev, 4), "s": round(time.time() - start, 1)})
            print(f"step {step} held-out loss {ev:.3f} (ppl {math.exp(ev):.1f})", file=sys.stderr)
        if args.max_minutes and time.time() - start > args.max_minutes * 60:
            print("stopping at --max-minutes", file=sys.stderr)
            break
    if not log["eval"] or log["eval"][-1]["step"] != step:
        ev = evaluate(model, held, amp, micro)
        log["eval"].append({"step": step, "heldout_loss": round(ev, 4), "s": round(time.time() - start, 1)})
        print(f"step {step} held-out loss {ev:.3f} (ppl {math.exp(ev):.1f})", file=sys.stderr)
    log.update(steps=step, tokens=step * args.batch * args.context, seconds=round(time.time() - start, 1))
    save_checkpoint(model, cfg, args.out, None if args.no_tokenizer else tok_dir)
    (args.log or args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="benchmarks/train_reference.py", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(".corpus"), help="output folder of the corpus builder")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7m")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, help="sequences per forward (gradient accumulation)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--steps", type=int, help="fixed number of optimizer steps")
    ap.add_argument("--minutes", type=float, help="pick the step count to fill this much wall time")
    ap.add_argument("--max-minutes", type=float, help="hard stop (the schedule is not shortened)")
    ap.add_argument("--calibrate-steps", type=int, default=30, help="with --minutes: time steps 5..N, then fix the count")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TRAIN_THREADS", "0")))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--amp", choices=["on", "off"], default="on",
                    help="bf16 autocast (also on CPU: about 3x faster than fp32 where the CPU has avx512_bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true", help="don't copy the tokenizer files into --out")
    ap.add_argument("--log", type=Path, help="where to write the training log (default OUT/train_log.json)")
    args = ap.parse_args(argv)
    if not args.steps and not args.minutes:
        ap.error("pass --steps or --minutes")
    return train(args)


if __name__ == "__main__":
    main()
