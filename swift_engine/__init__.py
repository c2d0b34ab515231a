"""swift_engine: StreamingLLM inference engine (sink+window paged KV cache, continuous batching).

The public names are imported on first use (PEP 562): `swiftserve chat --url` and the CLI's
pre-flight checks need only ChatError, chat_loop and EngineConfig, and must not wait seconds for
torch and transformers, which the engine's modules import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {  # public name -> the module defining it
    "ChatError": "chat", "EngineChat": "chat", "chat_loop": "chat", "load_history": "chat",
    "EngineConfig": "config", "StreamingEngine": "engine.async_engine", "pinned_hash": "engine.pinned",
    "chain_digest": "engine.session", "EngineStats": "engine.stats", "run_worker": "engine.tp_worker",
    "CapacityError": "errors", "EngineError": "errors", "EngineDeadError": "errors", "HistoryMismatchError": "errors",
    "InvalidRequestError": "errors", "SessionBusyError": "errors", "UnknownSessionError": "errors",
    "UnsupportedModelError": "errors", "resolve_model_dir": "models.resolve", "known_models": "models.resolve",
    "describe_known_models": "models.resolve",
    "generation_defaults": "models.generation", "GenerationEvent": "outputs", "SessionSnapshot": "outputs",
    "Usage": "outputs", "SamplingParams": "sampling",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .chat import ChatError, EngineChat, chat_loop, load_history
    from .config import EngineConfig
    from .engine.async_engine import StreamingEngine
    from .engine.pinned import pinned_hash
    from .engine.session import chain_digest
    from .engine.stats import EngineStats
    from .engine.tp_worker import run_worker
    from .errors import (CapacityError, EngineDeadError, EngineError, HistoryMismatchError, InvalidRequestError,
                         SessionBusyError, UnknownSessionError, UnsupportedModelError)
    from .models.generation import generation_defaults
    from .models.resolve import describe_known_models, known_models, resolve_model_dir
    from .outputs import GenerationEvent, SessionSnapshot, Usage
    from .sampling import SamplingParams
