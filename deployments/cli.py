"""`swiftserve` command: chat (engine alone or a running server), serve (local app), eval (quality)."""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="swiftserve", description="StreamingLLM chat serving")
    sub = ap.add_subparsers(dest="cmd", required=True)
    chat = sub.add_parser("chat", help="interactive chat: on the engine alone (--model) or a server (--url)")
    chat.add_argument("--model", default="swiftserve-llama-7m",
                      help="HF checkpoint dir, hub id, a bundled checkpoint's name, or 'tiny' (random weights)")
    chat.add_argument("--url", help="base URL of a running swiftserve, e.g. http://127.0.0.1:8000")
    chat.add_argument("--device", default="cpu")
    chat.add_argument("--sink-tokens", type=int, default=4)
    chat.add_argument("--window-tokens", type=int, default=1020)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    serve_p = sub.add_parser("serve", help="run the Serve app of a config file on a local Ray")
    serve_p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    eval_p = sub.add_parser("eval", help="quality evaluation; 'swiftserve eval ppl --help' for its options",
                            add_help=False)
    eval_p.add_argument("what", choices=["ppl"])
    eval_p.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "eval":
        from swift_engine.eval.ppl import main as eval_ppl

        eval_ppl(args.rest)
    elif args.cmd == "serve":
        serve_forever(args.config)
    elif args.url:
        chat_with_server(args.url, args.max_tokens, args.temperature)
    else:
        from swift_engine import EngineConfig, SamplingParams
        from swift_engine.chat import run_chat

        run_chat(EngineConfig(model=args.model, device=args.device, sink_tokens=args.sink_tokens,
                              window_tokens=args.window_tokens),
                 SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))


def serve_forever(config: Path) -> None:
    import ray
    from ray import serve

    from .app import app_from_config

    app, http = app_from_config(config)
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)})
    serve.run(app, name="swiftserve", route_prefix="/")
    print(f"swiftserve is serving on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}/v1 "
          "(Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def chat_with_server(url: str, max_tokens: int, temperature: float) -> None:
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none")
    model = client.models.list().data[0].id
    session = f"cli-{uuid.uuid4().hex[:12]}"
    history: list[dict] = []
    print(f"session {session} on {model}; empty line quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if not line.strip():
            return
        history.append({"role": "user", "content": line})
        stream = client.chat.completions.create(model=model, messages=history, stream=True, max_tokens=max_tokens,
                                                temperature=temperature, extra_headers={"x-session-id": session})
        reply = []
        print("bot> ", end="", flush=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply.append(chunk.choices[0].delta.content)
                print(reply[-1], end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    main()
