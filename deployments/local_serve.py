"""`swiftserve serve`: `serve run` of a config on a new local Ray, with care around it.

Before Ray starts: the config is validated and its model resolved, and the ports are checked (Ray's
proxy binds with SO_REUSEPORT, so a second server on a busy port would silently split its traffic).
Then progress until every LLMServer replica can serve, and on SIGINT/SIGTERM a drain (see drain.py).
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .preflight import PreflightError, check_port_free, read_config, resolve_model
from .quiet_logs import quiet_logs
from .bind import LOOPBACK, is_loopback, url_host


class ServeOptions(BaseModel):
    """What `swiftserve serve` takes beside the Serve config (its command-line flags)."""

    model_config = ConfigDict(extra="forbid")

    config: Path
    host: str | None = Field(None, description="overrides the config's http_options.host")
    port: int | None = Field(None, ge=1, le=65535, description="overrides the config's http_options.port")
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_port: int = Field(8080, ge=1, le=65535, description="Ray's Prometheus endpoint (/metrics)")
    grace_s: float = Field(30.0, ge=0, description="how long running turns may finish after SIGINT/SIGTERM")
    verbose: bool = Field(False, description="Ray's and Serve's INFO logs too (default: warnings, one access "
                                             "line per request and the server's own progress)")


def serve_forever(opts: ServeOptions) -> None:
    start = time.monotonic()
    spec, args, http = read_config(opts.config)
    host, port = opts.host or http.get("host", "127.0.0.1"), opts.port or http.get("port", 8000)
    for what, on, p in (("HTTP", host, port), ("dashboard", LOOPBACK, opts.dashboard_port),
                        ("metrics", "0.0.0.0", opts.metrics_port)):  # where each will listen (metrics: Ray's)
        check_port_free(on, p, what)
    resolve_model(args.engine.model)  # a GGUF model is converted here, once, with its own progress line
    app_name = spec.get("name", "swiftserve")
    print(f"loading {args.engine.model} on a new local Ray (Ctrl-C stops)", file=sys.stderr, flush=True)

    from ray import serve

    from .app import app_from_config
    from .drain import NAMESPACE, DrainSignal, signal_name

    try:
        app, _ = app_from_config(opts.config, _timeout_arg(args, http))
    except (ValueError, TypeError) as exc:  # a bad `deployments:` option
        raise PreflightError(f"{opts.config}: {exc}".splitlines()[0]) from None
    stop = _StopSignal()  # from here on a signal drains (or, while loading, stops) instead of being lost
    quiet = quiet_logs(opts.verbose)
    ctx = _start_ray(opts, quiet.ray_level)
    drain = DrainSignal.options(name=signal_name(app_name), namespace=NAMESPACE).remote()
    serve.start(http_options={**http, "host": host, "port": port}, logging_config=quiet.serve_config)
    serve._run(app, _blocking=False, name=app_name, route_prefix=spec.get("route_prefix", "/"),
               logging_config=quiet.app_config)
    stop.install()  # again: ray.init installs handlers of its own
    if not _wait_ready(app_name, stop):
        message = _app_message(app_name)
        _shut_down(app_name)
        raise PreflightError(f"application {app_name!r} failed to deploy: {message}")
    if not stop.count:
        _print_ready(time.monotonic() - start, host, port, args, ctx.dashboard_url, opts.metrics_port)
    while not stop.count:
        time.sleep(0.2)
    _drain(drain, app_name, opts.grace_s, stop)
    _shut_down(app_name)
    print("swiftserve stopped", file=sys.stderr, flush=True)


def _print_ready(seconds: float, host: str, port: int, args, dashboard_url: str, metrics_port: int) -> None:
    """The ready line, with the address really bound; a warning first if it is open to others without keys."""
    keyed = args.api_keys_env is not None or args.api_keys_file is not None
    if not is_loopback(host) and not keyed:
        print(f"swiftserve WARNING: listening on {host}, not only this machine, with API keys off: anyone who "
              "can reach this port can use the model and read or delete every session's record; set "
              "api_keys_file (or api_keys_env), or bind 127.0.0.1", file=sys.stderr, flush=True)
    where = f"http://{url_host(host)}:{port}/v1"
    if host in ("0.0.0.0", "::"):
        where += f" (every interface; this machine: http://127.0.0.1:{port}/v1)"
    # Ray 2.60 binds its Prometheus port on every interface of a Linux node, whatever the node address
    print(f"swiftserve ready in {seconds:.1f} s: {where} (model {args.model_id!r}); dashboard "
          f"http://{dashboard_url}; metrics http://{LOOPBACK}:{metrics_port}/metrics (every interface: Ray's); "
          "Ctrl-C drains and stops", file=sys.stderr, flush=True)


def _start_ray(opts: ServeOptions, level: int):
    """A new local Ray (its dashboard on loopback); a failed start is one line, not Ray's traceback."""
    import ray

    try:
        return ray.init(address="local", include_dashboard=True, dashboard_host=LOOPBACK,
                        dashboard_port=opts.dashboard_port, _metrics_export_port=opts.metrics_port,
                        logging_level=level, log_to_driver=True)
    except Exception as exc:  # an overloaded host, a full /tmp
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PreflightError(f"the local Ray did not start: {reason}") from None


def _timeout_arg(args, http: dict) -> dict:
    """The proxy's request timeout, for the replicas' refusal of prompts too long to finish within it."""
    if args.request_timeout_s is not None or "request_timeout_s" not in http:
        return {}
    return {"request_timeout_s": http["request_timeout_s"]}


def _shut_down(app_name: str) -> None:
    """The app (its replicas' own shutdown runs), then Ray with Serve's controller in it. Not
    serve.shutdown(): the controller ends itself under its graceful_shutdown call, which left the raylet
    printing "Task ServeController.graceful_shutdown failed" on every clean stop."""
    import ray
    from ray import serve

    serve.delete(app_name, _blocking=True)
    ray.shutdown()


class _StopSignal:
    """Counts SIGINT/SIGTERM: the first drains, a second stops at once."""

    def __init__(self):
        self.count = 0
        self.install()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_):
        self.count += 1


def _replica_counts(app_name: str) -> dict[str, dict[str, int]] | None:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None
    return {name: {str(k): v for k, v in d.replica_states.items()} for name, d in app.deployments.items()}


def _app_message(app_name: str) -> str:
    from ray import serve

    app = serve.status().applications.get(app_name)
    lines = [ln for ln in (app.message if app else "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _wait_ready(app_name: str, stop: _StopSignal) -> bool:
    """Progress while replicas load; True once every LLMServer replica runs, False if the app failed."""
    from ray import serve
    from tqdm import tqdm

    with tqdm(desc="replicas ready", unit="replica", file=sys.stderr, leave=False) as bar:
        while not stop.count:
            app = serve.status().applications.get(app_name)
            status = str(app.status) if app else "NOT_STARTED"
            if "DEPLOY_FAILED" in status:
                return False
            counts = _replica_counts(app_name) or {}
            bar.total = sum(sum(c.values()) for c in counts.values()) or None
            bar.n = sum(c.get("RUNNING", 0) for c in counts.values())
            bar.refresh()
            server = counts.get("LLMServer", {})
            if "RUNNING" in status and server and server.get("RUNNING", 0) == sum(server.values()):
                return True
            time.sleep(0.5)
    return True  # interrupted while loading: fall through to the drain, which has nothing to wait for


def _drain(drain, app_name: str, grace_s: float, stop: _StopSignal) -> None:
    """Stop new turns, let running ones finish until the deadline, then cut the rest (drain.py)."""
    import ray

    ingress = (_replica_counts(app_name) or {}).get("OpenAIIngress", {}).get("RUNNING", 0)
    print(f"swiftserve draining: running turns have {grace_s:g} s to finish (Ctrl-C again stops now)",
          file=sys.stderr, flush=True)
    ray.get(drain.start.remote(grace_s))
    deadline = time.monotonic() + grace_s + 5  # the cut turns' error events need a moment
    while stop.count < 2 and time.monotonic() < deadline:
        if ray.get(drain.idle_replicas.remote()) >= ingress:
            return
        time.sleep(0.1)
