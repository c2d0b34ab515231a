"""`swiftserve` command: serve (a Serve config on a local Ray), chat (a server, or the engine alone), eval."""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from importlib.resources import files
from pathlib import Path

DEFAULT_CONFIG = Path(str(files("configs") / "local.yaml"))  # package data: works from a wheel too
DEFAULT_MODEL = "smollm2-135m-instruct"  # as configs/local.yaml


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none (those say in words what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="swiftserve", description="StreamingLLM chat serving on Ray Serve")
    ap.set_defaults(print_help=ap.print_help)
    sub = ap.add_subparsers(dest="cmd", metavar="{serve,chat,eval}")  # none given: the help (main)

    serve_p = sub.add_parser("serve", formatter_class=HELP, help="run a Serve config's app on a new local Ray",
                             description="Like `serve run CONFIG`, with checks before Ray starts, progress "
                                         "until every LLMServer replica is ready, and a drain on "
                                         "SIGINT/SIGTERM.")
    serve_p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file")
    serve_p.add_argument("--host", help="HTTP host (default: the config's http_options.host)")
    serve_p.add_argument("--port", type=int, help="HTTP port (default: the config's http_options.port)")
    serve_p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port")
    serve_p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port of Ray")
    serve_p.add_argument("--grace-s", type=float, default=30.0,
                         help="seconds running turns may finish after SIGINT/SIGTERM; the rest get an error event")
    serve_p.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own INFO logs")

    chat = sub.add_parser("chat", formatter_class=HELP, help="interactive chat: a server (--url) or the engine alone",
                          description="Ctrl-C stops a reply and keeps the conversation; Ctrl-D quits. The "
                                      "history is saved under ~/.cache/swiftserve/chats/ after every turn.")
    chat.add_argument("--url", help="a running swiftserve, e.g. http://127.0.0.1:8000 (with or without /v1); "
                                    "without it the engine runs in this process")
    chat.add_argument("--api-key", help="API key for --url (default: $OPENAI_API_KEY)")
    chat.add_argument("--session", help="session id to resume (default: a new one)")
    chat.add_argument("--system", help="system prompt of a new conversation")
    chat.add_argument("--model", help="with --url: a served model (default: the first); alone: a checkpoint dir, "
                                      ".gguf file, hub id, packaged or bundled name or 'tiny' "
                                      f"(default: {DEFAULT_MODEL})")
    chat.add_argument("--max-tokens", type=int, help="most tokens per reply (default: the server's, or the "
                                                     "model's default)")
    chat.add_argument("--temperature", type=float, help="sampling temperature, 0: greedy (default: the server's, "
                                                        "or the model's generation_config.json)")
    chat.add_argument("--device", default="cpu", help="engine alone: torch device")
    chat.add_argument("--sink-tokens", type=int, default=4, help="engine alone: S")
    chat.add_argument("--window-tokens", type=int, default=1020, help="engine alone: W")

    eval_p = sub.add_parser("eval", help="quality evaluation")
    eval_p.set_defaults(print_help=eval_p.print_help)
    eval_sub = eval_p.add_subparsers(dest="what", metavar="{ppl}")
    eval_sub.add_parser("ppl", add_help=False, help="streaming perplexity (dense, window, recompute, "
                                                    "StreamingLLM); its options: 'swiftserve eval ppl --help'")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args, rest = ap.parse_known_args(argv)  # the rest belongs to `eval ppl`, which parses its own options
    if rest and args.cmd != "eval":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd is None or (args.cmd == "eval" and args.what is None):  # what to type next, not an error
        args.print_help()
        return
    from .preflight import PreflightError
    from swift_engine import ChatError

    try:
        if args.cmd == "serve":
            from .local_serve import ServeOptions, serve_forever

            serve_forever(ServeOptions(config=args.config, host=args.host, port=args.port,
                                       dashboard_port=args.dashboard_port, metrics_port=args.metrics_port,
                                       grace_s=args.grace_s, verbose=args.verbose))
        elif args.cmd == "chat":
            chat(args)
        else:
            from swift_engine.eval.ppl import main as eval_ppl

            eval_ppl(rest)
    except (PreflightError, ChatError) as exc:
        sys.exit(f"swiftserve {args.cmd}: {exc}")


def chat(args: argparse.Namespace) -> None:
    from swift_engine import chat_loop, load_history

    session = args.session or f"cli-{uuid.uuid4().hex[:12]}"
    history = load_history(session, args.system)
    if args.url:
        from .chat_client import ServerChat

        api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        chat_loop(ServerChat(args.url, api_key, session, args.model, args.max_tokens, args.temperature),
                  session, history)
        return
    model = args.model or DEFAULT_MODEL
    sampling = engine_sampling(model, args.max_tokens, args.temperature)  # checks the name before torch loads
    print(f"loading {model}", file=sys.stderr, flush=True)
    from swift_engine import EngineChat, EngineConfig, SamplingParams

    backend = EngineChat(EngineConfig(model=model, device=args.device, sink_tokens=args.sink_tokens,
                                      window_tokens=args.window_tokens), SamplingParams(**sampling), session)
    try:
        chat_loop(backend, session, history)
    finally:
        backend.close()


def engine_sampling(model: str, max_tokens: int | None, temperature: float | None) -> dict:
    """The engine-alone chat's sampling: the flags given, over the model's defaults, over OpenAI's (as a
    server would answer); the model is resolved (converted on first use) on the way."""
    from pydantic import ValidationError
    from swift_engine import ChatError, generation_defaults

    from .field_errors import field_error
    from .preflight import resolve_model
    from .sampling_defaults import SamplingDefaults, merged_defaults

    try:
        asked = SamplingDefaults(max_tokens=max_tokens, temperature=temperature)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ChatError(field_error("--" + str(err["loc"][0]).replace("_", "-"), err)) from None
    return merged_defaults(generation_defaults(resolve_model(model)), asked, max_completion_tokens=2**31)


if __name__ == "__main__":
    main()
