"""The sink+window cache a model can take: S + W within what the model was trained to attend over.

Done here, in the engine, so every entry point (server, chat, eval, scripts) gets it.
"""
from __future__ import annotations

import logging

from ..config import EngineConfig
from ..errors import UnsupportedModelError
from ..models.families import ModelArgs

logger = logging.getLogger(__name__)


def fit_cache_to_model(config: EngineConfig, a: ModelArgs) -> EngineConfig:
    """W shrunk (with a warning) to the model's trained length; a cache wider than the model's own
    sliding window is refused, saying which W fits."""
    S, trained = config.sink_tokens, a.max_position_embeddings
    if trained and config.cache_tokens > trained:
        if S >= trained:
            raise UnsupportedModelError(f"sink_tokens: {S} sinks leave no window within the model's trained "
                                        f"length (max_position_embeddings {trained})")
        logger.warning("window_tokens %d -> %d: S + W = %d is past the model's trained length "
                       "(max_position_embeddings %d)", config.window_tokens, trained - S, config.cache_tokens, trained)
        config = config.model_copy(update={"window_tokens": trained - S})
    window = a.sliding_window
    if window is not None and config.cache_tokens > window:
        fits = f"window_tokens <= {window - S} fits" if window > S else f"sink_tokens < {window} is needed"
        raise UnsupportedModelError(
            f"window_tokens: the model's layers {list(a.sliding_layers)} attend over a sliding window of {window} "
            f"tokens and S + W = {config.cache_tokens} exceeds it ({fits} with sink_tokens {S})")
    return config
