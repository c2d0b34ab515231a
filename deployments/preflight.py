"""Checks made before anything starts (`swiftserve serve`, `swiftserve chat`): each failure is one line
naming what is wrong, instead of a Ray or hub traceback minutes later."""
from __future__ import annotations

import socket
from pathlib import Path

import yaml
from pydantic import ValidationError

from swift_engine import resolve_model_dir

from .config import AppArgs


class PreflightError(Exception):
    """Something the operator must fix before the server can start; its message is one line."""


def read_config(path: Path) -> tuple[dict, AppArgs, dict]:
    """The config's first application spec, its validated args and its http_options."""
    try:
        config = yaml.safe_load(path.read_text())
        spec = config["applications"][0]
    except FileNotFoundError:
        raise PreflightError(f"{path}: no such config file") from None
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise PreflightError(f"{path}: not a Serve config with an `applications:` list "
                             f"({type(exc).__name__})") from None
    try:
        args = AppArgs.model_validate(spec.get("args", {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise PreflightError(f"{path}: applications[0].args.{field}: {err['msg']}") from None
    return spec, args, config.get("http_options", {})


def resolve_model(model: str) -> Path:
    """The model's local directory (downloaded now if it is a hub id), or a one-line error naming it."""
    try:
        return resolve_model_dir(model)
    except Exception as exc:  # the hub's errors are long and say "check your internet connection"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PreflightError(f"model {model!r} is not a local directory, a bundled checkpoint, 'tiny' "
                             f"or a Hugging Face hub id that could be downloaded ({type(exc).__name__}: "
                             f"{reason})") from None


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PreflightError(f"{what} port {port} on {host} is in use ({exc.strerror}); "
                                 "is another swiftserve or Ray running? Pick another port") from None
