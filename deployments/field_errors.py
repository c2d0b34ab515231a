"""A pydantic validation error as the one line a user reads: the field's path, then what is wrong with it,
without pydantic's "Value error, " prefix or its wording for extra fields."""
from __future__ import annotations

from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported_field"


def unsupported() -> PydanticCustomError:
    """Raised by a validator for a known field this server does not implement."""
    return PydanticCustomError(UNSUPPORTED, "is not supported by this server")


def field_error(field: str, err: dict) -> str:
    """`field` (its dotted path) and what is wrong with it, from one of pydantic's `errors()`."""
    if err["type"] == UNSUPPORTED:
        return f"{field} is not supported by this server"
    if err["type"] == "extra_forbidden":
        return f"{field} is not a supported field"
    if err["type"] == "value_error":  # our validators' own words, without the "Value error, " prefix
        return f"{field}: {err['ctx']['error']}"
    return f"{field}: {err['msg']}"
