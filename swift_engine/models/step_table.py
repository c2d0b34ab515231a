"""Measured GPU step times of one model shape, for `load_format: simulated` (a load-testing tool).

A table holds a shape's HF config and two curves measured on a GPU: the device time of a
decode step by batch size (every session at a full S + W cache: the steady state of an
endless chat), and the time of a step by prefill tokens. A step of B decode rows and P
prefill tokens is modelled as decode(max(B, 1)) + prefill(P) - prefill(1): the weights are
read once a step, so a prefill adds only what it costs beyond a one-token step. Between
measured points the curves are linear; past the last one they go on along the last segment.

Tables live in step_tables/ (built by benchmarks/build_step_table.py from GPU results).
"""
from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

TABLES = Path(__file__).resolve().parent / "step_tables"


class Curve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: list[int] = Field(min_length=2)
    ms: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _check(self) -> "Curve":
        if len(self.x) != len(self.ms) or self.x != sorted(set(self.x)) or min(self.ms) < 0:
            raise ValueError("a curve needs as many ms as x, x strictly increasing, ms >= 0")
        return self

    def at(self, x: float) -> float:
        """Piecewise linear in x; outside the measured range, the nearest segment extended (never < 0)."""
        i = min(max(bisect_right(self.x, x), 1), len(self.x) - 1)
        x0, x1, y0, y1 = self.x[i - 1], self.x[i], self.ms[i - 1], self.ms[i]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class StepTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: str
    gpu: str
    cache_tokens: int = Field(ge=1, description="S + W of every decoding session when the decode curve was measured")
    hf_config: dict = Field(description="the shape: sizes the KV page pool and the logits")
    decode: Curve = Field(description="x: sessions decoding in the step; ms: device time of the step")
    prefill: Curve = Field(description="x: prefill tokens in the step; ms: the step's time")
    sources: dict[str, str] = Field(default_factory=dict, description="which result file gave which curve")
    note: str = ""

    def step_ms(self, decode_rows: int, prefill_tokens: int) -> float:
        extra = self.prefill.at(prefill_tokens) - self.prefill.at(1) if prefill_tokens else 0.0
        return self.decode.at(max(decode_rows, 1)) + max(0.0, extra)


def table_path(name: str) -> Path:
    """A bundled table's name (step_tables/<name>.json) or a JSON file's path."""
    path = Path(name).expanduser()
    return path if path.suffix == ".json" else TABLES / f"{name}.json"


def bundled_tables() -> list[str]:
    return sorted(p.stem for p in TABLES.glob("*.json"))


def load_step_table(name: str) -> StepTable:
    path = table_path(name)
    if not path.is_file():
        raise ValueError(f"step_table: no table {name!r} (bundled: {', '.join(bundled_tables()) or 'none'}, "
                         "or a path ending in .json)")
    return StepTable.model_validate_json(path.read_text())


def shape_model(table: StepTable, dtype, vocab_size: int | None = None):
    """A model of the table's shape on PyTorch's meta device: the args and dtype that size the engine's
    page pool and sampler, no weights, and (the pool is allocated where the model is) no KV bytes."""
    from .families import ModelArgs
    from .random_init import empty_model

    cfg = {**table.hf_config, **({"vocab_size": vocab_size} if vocab_size else {})}
    return empty_model(ModelArgs.from_hf_config(cfg), "meta", dtype).eval()
