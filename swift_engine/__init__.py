"""swift_engine: StreamingLLM inference engine (sink+window paged KV cache, continuous batching)."""
from .chat import ChatError, EngineChat, chat_loop, load_history
from .config import EngineConfig
from .engine.async_engine import StreamingEngine
from .engine.pinned import pinned_hash
from .engine.session import chain_digest
from .engine.stats import EngineStats
from .engine.tp_worker import run_worker
from .errors import (CapacityError, EngineError, HistoryMismatchError, InvalidRequestError,
                     SessionBusyError, UnknownSessionError, UnsupportedModelError)
from .models.loader import resolve_model_dir
from .outputs import GenerationEvent, SessionSnapshot, Usage
from .sampling import SamplingParams

__all__ = [
    "EngineConfig", "StreamingEngine", "EngineStats", "chain_digest", "pinned_hash", "SamplingParams", "GenerationEvent",
    "SessionSnapshot", "Usage", "EngineError", "InvalidRequestError", "UnknownSessionError",
    "SessionBusyError", "HistoryMismatchError", "CapacityError", "UnsupportedModelError",
    "resolve_model_dir", "ChatError", "EngineChat", "chat_loop", "load_history", "run_worker",
]
