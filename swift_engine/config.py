"""Typed engine configuration, loadable from YAML (configs/engine-*.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator


class SimulatedConfig(BaseModel):
    """load_format: simulated (engine/simulated_runner.py): which GPU's step times, which logits width."""

    model_config = ConfigDict(extra="forbid")

    step_table: str = Field("llama3-8b-h200", description="a bundled table's name (swift_engine/models/"
                            "step_tables/) or a .json path; its shape sizes the KV pages and the logits")
    vocab_size: int | None = Field(None, ge=2, description="logits width; None: the table shape's (128,256 "
                                   "for Llama-3-8B). The sampler's tensor work runs on the CPU here, ~400x its "
                                   "H200 time at 128,256 (docs/load-simulator.md): a narrower one keeps all of "
                                   "its Python at a GPU-like share of the step")


class EngineConfig(BaseModel):
    """Everything that shapes one engine instance.

    `model` is a local Hugging Face checkpoint directory, a hub id, or "tiny"
    (the embedded random-weight default that needs no downloads).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "tiny"
    sink_tokens: int = Field(4, ge=0, description="S: first tokens kept forever")
    window_tokens: int = Field(1020, ge=1, description="W: most recent tokens kept")
    max_pinned_tokens: int = Field(
        1024, ge=0, description="longest pinned region (BOS + system prompt, or a completion's pinned_tokens) "
        "a session may keep in place of its sinks; longer is a 400")
    page_size: int = Field(16, ge=1, le=1024, description="tokens per KV page")
    num_pages: int | None = Field(
        None, ge=1, description="KV pool size in pages; None sizes it from kv_cache_memory_gb")
    kv_cache_memory_gb: float = Field(0.25, gt=0, description="pool size when num_pages is None")
    max_batch_tokens: int = Field(512, ge=1, description="per-step token budget (decode + prefill chunks)")
    max_running: int = Field(64, ge=1, description="sessions decoding in one step at most")
    max_prompt_tokens: int = Field(32768, ge=1, description="new tokens one turn may add")
    device: str = "cpu"
    tensor_parallel_size: int = Field(
        1, ge=1, description="ranks (GPUs; processes on the CPU) one engine spans, each holding 1/N of every "
        "layer's heads and MLP columns; must divide the model's attention heads and MLP width")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="auto: the cache holds `dtype`; fp8: e4m3 with a float32 scale per token and KV "
        "head, about half the bytes (engine/kv_fp8.py)")
    load_format: Literal["auto", "dummy", "simulated"] = Field(
        "auto", description="dummy: random weights of the checkpoint's shape, as vLLM's --load-format "
        "dummy (benchmarks: the arithmetic of real weights without their bytes on disk); simulated: no model "
        "runs, each step sleeps the GPU time measured for its batch (`simulated`), `model` gives only the "
        "tokenizer: a load-testing tool, never a result (docs/load-simulator.md)")
    simulated: SimulatedConfig = Field(default_factory=lambda: SimulatedConfig())
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    cuda_graphs: bool = Field(True, description="triton backend: replay decode steps as CUDA graphs")
    triton_gemv: bool = Field(
        True, description="triton backend: decode projections through the Triton GEMV (False: cuBLAS)")
    host_cache_bytes: ByteSize = Field(
        0, ge=0, description="host tier: idle sessions' cache pages are copied to this much host memory "
        "(pinned on CUDA; an int or '64GiB'; per rank under tensor parallelism) instead of being dropped, "
        "and copied back on their next turn; 0: off (engine/host_tier.py)")
    max_idle_sessions: int = Field(
        10_000, ge=0, description="sessions kept as ids only (no cache pages); beyond it the least "
        "recently used are forgotten and rebuilt from the store on their next turn")
    idle_session_ttl_s: float = Field(
        3600.0, gt=0, description="sessions idle (no cache pages) for longer are forgotten")
    idle_cache_ttl_s: float | None = Field(
        None, gt=0, description="a resident session idle for longer gives its cache pages back (its next "
        "turn rebuilds them from its retained ids), so occupancy follows live conversations; None: pages "
        "stay until page pressure evicts them")

    stall_timeout_s: float = Field(
        30.0, gt=0, description="the engine process making no progress (or saying nothing) this long with "
        "work queued is declared dead: every waiting caller gets EngineDeadError, is_alive() turns false")

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.device.startswith("cuda") is False and self.device != "cpu":
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.load_format == "simulated":
            self._check_simulated()
        if self.max_pinned_tokens < self.sink_tokens:  # a pinned region replaces the S sinks: never shorter
            raise ValueError(f"max_pinned_tokens ({self.max_pinned_tokens}) must be >= sink_tokens "
                             f"({self.sink_tokens})")
        return self

    def _check_simulated(self) -> None:
        from .models.step_table import table_path

        if not table_path(self.simulated.step_table).is_file():
            raise ValueError(f"simulated.step_table: no table {self.simulated.step_table!r}")
        if self.tensor_parallel_size != 1 or self.host_cache_bytes:  # its KV pool holds no bytes to share or copy
            raise ValueError("load_format: simulated needs tensor_parallel_size 1 and host_cache_bytes 0")

    @property
    def cache_tokens(self) -> int:
        return self.sink_tokens + self.window_tokens

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**data.get("engine", data))
