"""A model's own sampling defaults, from its `generation_config.json`, as vLLM's `--generation-config auto`
reads them: only the fields a checkpoint sets, in SamplingParams' names. Requests that leave a field out
get the model's value; the serving layer decides what overrides what."""
from __future__ import annotations

import json
from pathlib import Path

# generation_config.json field -> SamplingParams field (vLLM honours the same five, and min_p)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """The sampling defaults a checkpoint directory's generation_config.json sets ({} without one).

    `do_sample` is not read, as vLLM does not: a checkpoint that wants greedy says temperature 0.
    A top_k of 0 or less means no top-k, as in transformers."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    found = {ours: config[theirs] for theirs, ours in FIELDS.items() if config.get(theirs) is not None}
    if "top_k" in found:
        found["top_k"] = max(int(found["top_k"]), 0)
    return found
