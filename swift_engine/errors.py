"""Typed errors raised by the engine. Each carries a message meant for the caller."""


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed (empty prompt, bad ids, bad sampling values)."""


class UnknownSessionError(EngineError, KeyError):
    """The session id is not known to this engine."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else "unknown session"


class SessionBusyError(EngineError):
    """The session already has a request running; sessions take one turn at a time."""


class HistoryMismatchError(EngineError):
    """The messages sent do not extend what the session has already consumed."""


class CapacityError(EngineError):
    """The request can never fit the KV pool, or the engine is shutting down."""


class UnsupportedModelError(EngineError, ValueError):
    """The checkpoint's architecture is not one the engine implements."""


class EngineDeadError(EngineError):
    """The engine process is gone or stopped making progress: this engine serves nothing more (a replica's
    health check fails and it is replaced; the sessions continue from the store elsewhere)."""
