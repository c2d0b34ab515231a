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
    return _fit_pinned(config, min(x for x in (trained, window) if x) if trained or window else None)


def _fit_pinned(config: EngineConfig, span: int | None) -> EngineConfig:
    """A pinned region of P tokens puts window tokens at positions up to P + W - 1: max_pinned_tokens is
    lowered (with a warning) to what the model attends over, never below S."""
    if span is None or config.max_pinned_tokens + config.window_tokens <= span:
        return config
    fits = max(config.sink_tokens, span - config.window_tokens)
    logger.warning("max_pinned_tokens %d -> %d: a pinned region plus W = %d is past the %d positions the model "
                   "attends over", config.max_pinned_tokens, fits, config.window_tokens, span)
    return config.model_copy(update={"max_pinned_tokens": fits})
