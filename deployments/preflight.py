"""Checks made before anything starts (`swiftserve serve`, `swiftserve chat`): each failure is one line
naming what is wrong, instead of a Ray or hub traceback minutes later."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from swift_engine import UnsupportedModelError, describe_known_models, resolve_model_dir

from .field_errors import field_error

if TYPE_CHECKING:
    from .config import AppArgs


class PreflightError(Exception):
    """Something the operator must fix before the server can start; its message is one line."""


def read_config(path: Path) -> tuple[dict, AppArgs, dict]:
    """The config's first application spec, its validated args and its http_options."""
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PreflightError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise PreflightError(f"{path}: {yaml_error(exc)}") from None
    try:
        spec = config["applications"][0]
    except (KeyError, IndexError, TypeError):
        raise PreflightError(f"{path}: not a Serve config: it needs an `applications:` list") from None
    from .config import AppArgs  # here: `chat --url` imports this module for its error type only

    try:
        args = AppArgs.model_validate(spec.get("args", {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        raise PreflightError(f"{path}: {field_error('applications[0].args.' + field, err)}") from None
    return spec, args, config.get("http_options", {})


def yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in one line, with where it is (1-based line and column, as editors count)."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {where}{what}"


def resolve_model(model: str) -> Path:
    """The model's local directory (downloaded now if it is a hub id), or a one-line error naming it."""
    try:
        return resolve_model_dir(model)
    except UnsupportedModelError as exc:  # its message is ours: one line, naming the model
        raise PreflightError(str(exc)) from None
    except Exception as exc:  # the hub's errors are long and say "check your internet connection"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PreflightError(f"model {model!r} is not a local directory, a known name or a Hugging Face hub id "
                             f"that could be downloaded ({type(exc).__name__}: {reason}); known: "
                             f"{describe_known_models()}") from None


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PreflightError(f"{what} port {port} on {host} is in use ({exc.strerror}); "
                                 "is another swiftserve or Ray running? Pick another port") from None
