"""swift_engine: StreamingLLM inference engine (sink+window paged KV cache, continuous batching)."""
from .config import EngineConfig
from .engine.async_engine import EngineStats, StreamingEngine
from .errors import (CapacityError, EngineError, HistoryMismatchError, InvalidRequestError,
                     SessionBusyError, UnknownSessionError, UnsupportedModelError)
from .outputs import GenerationEvent, SessionSnapshot, Usage
from .sampling import SamplingParams

__all__ = [
    "EngineConfig", "StreamingEngine", "EngineStats", "SamplingParams", "GenerationEvent",
    "SessionSnapshot", "Usage", "EngineError", "InvalidRequestError", "UnknownSessionError",
    "SessionBusyError", "HistoryMismatchError", "CapacityError", "UnsupportedModelError",
]
