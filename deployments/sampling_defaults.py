"""Which sampling a request gets for the fields it leaves out, as vLLM's `--generation-config auto`:
the request's own fields, over the config's `sampling_defaults`, over the model's generation_config.json,
over OpenAI's defaults. A 135M model sampled at OpenAI's temperature 1.0 answers nonsense where the
same model greedy answers well, so the model (or the operator) must be able to say what suits it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's API defaults (max_tokens has none there; ours is capped by max_completion_tokens)
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                   "max_tokens": 256}


class SamplingDefaults(BaseModel):
    """The config's sampling defaults (`args.sampling_defaults`): each set field overrides the model's."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="0: no top-k")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    max_tokens: int | None = Field(None, ge=1, description="completion tokens when a request gives no max_tokens")


def merged_defaults(model: dict, configured: SamplingDefaults, max_completion_tokens: int) -> dict:
    """The defaults requests get: OpenAI's, then the model's, then the config's, those set winning."""
    known = {k: v for k, v in model.items() if k in OPENAI_DEFAULTS}
    merged = {**OPENAI_DEFAULTS, **known, **configured.model_dump(exclude_none=True)}
    merged["max_tokens"] = min(merged["max_tokens"], max_completion_tokens)
    return merged
