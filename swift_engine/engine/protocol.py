"""The narrow protocol between StreamingEngine (the front end) and its engine process.

Front end -> engine process, in order on one socket:
    ("call", call_id, method, args)  a method of `EngineProcess.CALLS`; answered by one "reply"
    ("abort", request_id)            cancellation is a message: the request ends at the next step
Engine process -> front end, in order on another socket:
    ("ready", ReadyInfo) | ("failed", exception)    once, after the core was built (or was not)
    ("reply", call_id, ok, value_or_exception)
    ("step", StepOutput)              once per step that produced something, and a heartbeat while idle
    ("dead", reason)                  the process stopped making progress and is exiting

Messages are pickled (protocol 5) over pyzmq PUSH/PULL sockets on ipc:// paths; the process runs
the schedule -> run -> postprocess loop and never shares a GIL with the caller's event loop.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from ..config import EngineConfig
from ..outputs import GenerationEvent, SessionSnapshot
from .stats import EngineView

HEARTBEAT_S = 0.5  # the engine process says something at least this often while it runs


@dataclass
class ModelSource:
    """How the engine process gets its model: a model object (it travels pickled, as bytes: tests,
    the perplexity harness), random weights of an HF config (built there), or neither: load
    `config.model` as its load_format says."""
    model: object | None = None
    random_hf_config: dict | None = None
    random_seed: int = 0

    def __getstate__(self) -> dict:
        # plain pickle, not multiprocessing's: that passes each tensor's storage as a file descriptor,
        # and a real checkpoint has more tensors than a process start may pass descriptors
        return {**self.__dict__, "model": pickle.dumps(self.model) if self.model is not None else None}

    def __setstate__(self, state: dict) -> None:
        model = state["model"]
        self.__dict__.update(state, model=pickle.loads(model) if model is not None else None)


@dataclass
class CoreSpec:
    config: EngineConfig
    source: ModelSource
    tokenizer: object | None  # a ChatTokenizer to use, or None: load the model's when it loads its own
    progress: bool
    inputs: str   # zmq address the front end pushes to
    outputs: str  # zmq address the front end pulls from
    front_pid: int  # the engine process exits when this process is gone
    tp_address: str | None = None  # tensor parallel: rank 0's rendezvous (the front end started 1..N-1)


@dataclass
class ReadyInfo:
    config: EngineConfig  # S + W fitted to the model
    vocab_size: int
    view: EngineView
    warnings: list[str]  # what building the core warned of (a cache fitted to the model): the front end logs them


@dataclass
class StepOutput:
    events: list[GenerationEvent] = field(default_factory=list)
    ended: dict[str, SessionSnapshot] = field(default_factory=dict)  # sessions whose request ended: now
    forgotten: list[str] = field(default_factory=list)  # sessions the engine forgot (idle bounds)
    view: EngineView | None = None  # stats and resident sessions, when they may have changed
