"""How much of Ray's and Serve's logging `swiftserve serve` shows. Quiet by default: warnings, one access
line per request (the ingress's; LLMServer's handle calls are not requests, app.py) and the replicas' own
progress lines. Ray's INFO lines came between the "replicas ready" bar's redraws, and Serve's note that
"new http_options will not be applied" read like the --port had not been (it had: serve.start set it
before serve.run looked). `--verbose` shows them all."""
from __future__ import annotations

import logging
from dataclasses import dataclass


# Ray 2.60 announces on every start that its (default) token authentication is on: good news, in a
# WARNING that reads like a problem. The warning that it is *off* is kept.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_auth_enabled(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


@dataclass(frozen=True)
class LogLevels:
    ray_level: int        # ray.init(logging_level=...): the driver's Ray core messages
    serve_config: dict    # serve.start(logging_config=...): controller and proxies
    app_config: dict      # serve.run(logging_config=...): the app's replicas, unless a deployment sets its own


def quiet_logs(verbose: bool) -> LogLevels:
    """The levels to start Ray and Serve with; also sets this process's Serve logger."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray.serve").setLevel(level)
    if not verbose:
        logging.getLogger(TOKEN_AUTH_LOGGER).addFilter(_drop_token_auth_enabled)
    return LogLevels(ray_level=level, serve_config={"log_level": logging.getLevelName(level)},
                     app_config={"log_level": "INFO"})
