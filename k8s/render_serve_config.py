#!/usr/bin/env python3
"""Copy the Serve configs in configs/ into the RayServices' spec.serveConfigV2.

One source of truth: configs/gpu.yaml feeds k8s/overlays/gpu, configs/local.yaml
feeds k8s/overlays/cpu-dev. The config file's text goes verbatim (comments
included) into the `serveConfigV2: |` literal block of the overlay's
rayservice.yaml; the rest of that file, comments included, is left as it is.

    python k8s/render_serve_config.py          # rewrite stale blocks
    python k8s/render_serve_config.py --check  # exit 1 if any block is stale

Standard library only (no YAML parser needed: the block is found by its key
line and its indentation).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# rayservice manifest (relative to the repo root) -> Serve config it embeds
TARGETS: dict[str, str] = {
    "k8s/overlays/gpu/rayservice.yaml": "configs/gpu.yaml",
    "k8s/overlays/gpu-tp/rayservice.yaml": "configs/gpu-tp.yaml",
    "k8s/overlays/cpu-dev/rayservice.yaml": "configs/local.yaml",
}

_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[-+]?[ ]*(#.*)?$")
_HTTP_HOST = re.compile(r"^(?P<indent>[ ]+)host:")
# In a pod the Serve proxy must listen on the pod IP: Services and KubeRay's probes reach it there. The
# local default config binds 127.0.0.1 (safe on a laptop with API keys off), so the pods' copy says so.
POD_HOST = "0.0.0.0"


def _value(line: str) -> str:
    return line.split("#")[0].split(":", 1)[1].strip()


def for_pods(config_text: str) -> str:
    """config_text with its http_options.host line set to POD_HOST (the rest verbatim)."""
    lines, in_http = config_text.splitlines(keepends=True), False
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith((" ", "#")):
            in_http = line.startswith("http_options:")
        elif in_http and (m := _HTTP_HOST.match(line)) and _value(line) != POD_HOST:
            lines[i] = f"{m['indent']}host: {POD_HOST}  # in a pod: the pod IP (k8s/render_serve_config.py)\n"
    return "".join(lines)


def render(manifest_text: str, config_text: str) -> str:
    """Return manifest_text with its serveConfigV2 block replaced by config_text."""
    lines = manifest_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _KEY.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(
            f"expected exactly one `serveConfigV2: |` line, found {len(starts)}")
    start = starts[0]
    key_indent = len(_KEY.match(lines[start].rstrip("\n")).group("indent"))
    # The block runs over blank lines and lines indented deeper than the key.
    end = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip(" ")) <= key_indent:
            break
        end += 1
    # Trailing blank lines belong after the block, not in it.
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1

    config_text = for_pods(config_text)
    if "\t" in config_text:
        raise ValueError("tabs in the Serve config cannot go into a YAML block")
    body = config_text.rstrip("\n").splitlines()
    if not body or body[0].startswith(" "):
        raise ValueError("the Serve config must start with an unindented line")
    pad = " " * (key_indent + 2)
    block = [" " * key_indent + "serveConfigV2: |\n"]
    block += [(pad + line).rstrip() + "\n" if line.strip() else "\n" for line in body]
    return "".join(lines[:start] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if a manifest is out of date")
    args = ap.parse_args(argv)
    missing, stale = [], []
    for manifest, config in TARGETS.items():
        mpath, cpath = ROOT / manifest, ROOT / config
        if not cpath.exists():
            print(f"MISSING: {config} (needed by {manifest})", file=sys.stderr)
            missing.append(config)
            continue
        old = mpath.read_text()
        new = render(old, cpath.read_text())
        if new == old:
            print(f"up to date: {manifest} <- {config}")
        elif args.check:
            print(f"STALE: {manifest} (run: python k8s/render_serve_config.py)",
                  file=sys.stderr)
            stale.append(manifest)
        else:
            mpath.write_text(new)
            print(f"rendered: {manifest} <- {config}")
    return 1 if missing or stale else 0

if __name__ == "__main__":
    sys.exit(main())
