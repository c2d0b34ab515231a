"""load_format: simulated: a model-runner stand-in for load tests without a GPU (as llm-d's
inference simulator). A load-testing tool: its figures are never a model's or a GPU's result.

Each step sleeps the GPU time measured for its shape on a real GPU (models/step_table.py) for
its decode rows and prefill tokens. time.sleep releases the GIL, as a real engine thread does
while it waits for the device, so the rest of the process runs meanwhile. It returns logits of
the shape's vocabulary width, so everything after the model is real: page accounting,
scheduler, sampler, detokenizer, stop strings, and the serving path above the engine.
"""
from __future__ import annotations

import time

import torch

from ..config import EngineConfig
from ..models.loader import read_config, resolve_model_dir
from ..models.step_table import load_step_table
from .cache import AppendPlan

ROWS = 32          # distinct logit rows: greedy decoding cycles through 32 tokens, not one
ZIPF = 1.1         # token probabilities fall off as rank^-1.1, as in natural text
DEAD_LOGIT = -1e4  # ids past the tokenizer's vocabulary: probability 0, yet a finite logprob


class SimulatedRunner:
    def __init__(self, config: EngineConfig, vocab_size: int):
        """vocab_size: the logits' width; only ids of `config.model`'s vocabulary (the tokenizer's) win."""
        self.table = load_step_table(config.simulated.step_table)
        self.device = torch.device(config.device)
        live = read_config(resolve_model_dir(config.model))["vocab_size"]
        if live > vocab_size:  # prompts would hold ids the sampler's vocabulary lacks
            raise ValueError(f"simulated.vocab_size: {vocab_size} is below the {live} ids of {config.model!r}'s "
                             "tokenizer (pick a model with a smaller vocabulary, e.g. swiftserve-llama-7m)")
        self.rows = _logit_rows(vocab_size, live, self.device)
        self.stats = {"steps": 0, "slept_s": 0.0}

    def run(self, chunks: list[list[int]], plans: list[AppendPlan],
            logit_rows: list[list[int]]) -> list[torch.Tensor]:
        """ModelRunner.run's contract: float32 logits [len(logit_rows[i]), V] per sequence."""
        decode = sum(1 for c in chunks if len(c) == 1)
        prefill = sum(len(c) for c in chunks if len(c) > 1)
        sleep_s = self.table.step_ms(decode, prefill) / 1e3
        time.sleep(sleep_s)  # the device's share of the step; the GIL is free meanwhile
        step = self.stats["steps"]
        self.stats["steps"], self.stats["slept_s"] = step + 1, self.stats["slept_s"] + sleep_s
        # views of preallocated rows, no copy: the sampler concatenates them and never writes its input
        return [self.rows[k:k + 1].expand(len(r), -1) for k, r in
                ((_row_of(step, i), r) for i, r in enumerate(logit_rows))]


def _row_of(step: int, seq: int) -> int:
    return (step * 7 + seq * 13) % ROWS


def _logit_rows(vocab: int, live: int, device: torch.device) -> torch.Tensor:
    """ROWS rows of a Zipf distribution over the live ids, each ranking them in its own fixed order."""
    gen = torch.Generator().manual_seed(0)
    zipf = -ZIPF * torch.log(torch.arange(1, live + 1, dtype=torch.float32))
    rows = torch.full((ROWS, vocab), DEAD_LOGIT)
    for r in range(ROWS):
        rows[r, torch.randperm(live, generator=gen)] = zipf
    return rows.to(device)
