"""Build the Serve application: `serve run configs/local.yaml` imports `deployments.app:build_app`."""
from __future__ import annotations

from pathlib import Path

import yaml
from ray import serve
from ray.serve.config import RequestRouterConfig

from routing.router import SessionAffinityRouter

from .config import AppArgs
from .openai_api import OpenAIIngress
from .server import LLMServer

# how often a stopping replica looks for requests still running (Serve's default, 2 s, was most of an
# idle `swiftserve serve` stop: the drain has already waited for running turns)
SHUTDOWN_POLL_S = 0.2

# Defaults; a Serve config's `deployments:` section overrides any of them.
LLMServerDeployment = serve.deployment(
    LLMServer, name="LLMServer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=5, graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
    logging_config={"enable_access_log": False},  # the ingress logs each request once; these are its calls
    request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter,
                                              request_routing_stats_period_s=1.0))


def build_app(args: dict) -> serve.Application:
    """The Serve application builder (`import_path`); Serve applies the config's deployment options."""
    return compose_app(args, {})


def compose_app(args: dict, overrides: dict[str, dict]) -> serve.Application:
    """`overrides`: per-deployment options, as a Serve config's `deployments:` list sets them."""
    dumped = AppArgs.model_validate(args).model_dump()
    server = LLMServerDeployment.options(**overrides.get("LLMServer", {}))
    ingress = OpenAIIngress.options(**{"graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
                                       **overrides.get("OpenAIIngress", {})})
    return ingress.bind(server.bind(dumped), dumped)


def app_from_config(path: str | Path, args_update: dict | None = None) -> tuple[serve.Application, dict]:
    """The first application of a Serve config file, built in-process (for `swiftserve serve` and tests)."""
    config = yaml.safe_load(Path(path).read_text())
    spec = config["applications"][0]
    overrides = {d.pop("name"): d for d in spec.get("deployments", [])}
    args = {**spec.get("args", {}), **(args_update or {})}
    return compose_app(args, overrides), config.get("http_options", {})
