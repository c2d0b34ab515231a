"""The ingress's gate: every HTTP request passes it before FastAPI reads or parses anything.

In order: API key -> tenant (401), declared body size (413), the tenant's rate
(429 + Retry-After), its requests in flight on every route (429), the body read
with a byte count (413) and a deadline (408), then the cheap part of a chat
body's validation (JSON, message count: 400) before FastAPI's pydantic pass,
which costs twenty times more. `/health` is open. Nothing here logs headers or
bodies; a client that goes away mid-body is one log line.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pydantic_core
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from .auth import KeyRing
from .config import Limits
from .limits import TenantLimiter
from .openai_format import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TENANT_SCOPE_KEY = "swiftserve.tenant"  # the request's tenant ("" without auth), for the endpoints
OPEN_PATHS = frozenset({"/health"})
CHAT_PATH = "/v1/chat/completions"
CLIENT_GONE = (ClientDisconnect, TaskCancelledError, RequestCancelledError)  # Starlette's and Ray's words for it
logger = logging.getLogger("ray.serve")


class Guard:
    """Authentication and per-tenant limits of one ingress replica."""

    def __init__(self, keys: KeyRing | None, limits: Limits):
        self.keys, self.limits = keys, limits
        self.limiter = TenantLimiter(limits)

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        if path in OPEN_PATHS:
            return await app(scope, receive, send)
        reject = functools.partial(_reject, scope, receive, send)
        tenant = "" if self.keys is None else self.keys.tenant(_header(scope, b"authorization"))
        if tenant is None:
            return await reject(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        declared = _header(scope, b"content-length")
        if declared is not None and not declared.isdigit():
            return await reject(400, "invalid Content-Length", "invalid_request_error")
        if declared is not None and int(declared) > self.limits.max_request_bytes:
            return await reject(*self._too_large())
        wait = self.limiter.retry_after(tenant)
        if wait:
            return await reject(429, f"rate limit reached ({self.limits.rate_limit_per_s:g} requests/s, burst "
                                     f"{self.limits.rate_limit_burst}); retry after {wait} s",
                                "rate_limit_error", "rate_limit_exceeded", {"Retry-After": str(wait)})
        if not self.limiter.enter(tenant):
            return await reject(429, f"too many concurrent requests (the limit is "
                                     f"{self.limits.max_concurrent_requests} per tenant)",
                                "rate_limit_error", "too_many_concurrent_requests")
        try:
            await self._admit(app, scope, receive, send, tenant, path)
        except CLIENT_GONE as exc:
            logger.info("%s %s: the client went away (%s)", scope["method"], path, type(exc).__name__)
        finally:
            self.limiter.leave(tenant)

    async def _admit(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, tenant: str, path: str) -> None:
        """Read the body within the deadline, run the cheap checks, then hand the request to the app."""
        reject = functools.partial(_reject, scope, receive, send)
        try:
            body = await asyncio.wait_for(_read_body(receive, self.limits.max_request_bytes),
                                          self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            return await reject(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s",
                                "invalid_request_error", "request_timeout")
        if body is None:
            return await reject(*self._too_large())
        chat = scope["method"] == "POST" and path == CHAT_PATH
        problem = _chat_problem(body, self.limits.max_messages) if chat else None
        if problem is not None:
            return await reject(400, *problem)
        scope[TENANT_SCOPE_KEY] = tenant
        await app(scope, _replay(body, receive), send)

    def _too_large(self) -> tuple[int, str, str, str]:
        return (413, f"request body is larger than the limit of {self.limits.max_request_bytes} bytes",
                "invalid_request_error", "request_too_large")


class GuardMiddleware:
    """ASGI middleware running the Guard of the ingress replica that serves the request.

    The FastAPI app is built (and pickled) before any replica exists, so the
    Guard, made from the app's args, is found on the replica's ingress object.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        guard: Guard = serve.get_replica_context().servable_object.guard
        await guard(self.app, scope, receive, send)


async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str, type_: str,
                  code: str | None = None, headers: dict[str, str] | None = None, param: str | None = None) -> None:
    response = JSONResponse(error_body(status, message, type_, code, param), status_code=status, headers=headers)
    await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it exceeds `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _chat_problem(body: bytes, max_messages: int) -> tuple[str, str, str | None, None, str | None] | None:
    """(message, type, code, headers, param) of a 400 if the chat body is not JSON or has too many messages.

    Parsing 100k messages (pydantic-core's JSON parser, half the time of `json.loads`) costs a twentieth of
    FastAPI's validation of them, and the count needs no more.
    """
    try:
        parsed = pydantic_core.from_json(body)
    except ValueError:  # also invalid UTF-8, too deep
        return "the body is not valid JSON", "invalid_request_error", None, None, None
    messages = parsed.get("messages") if isinstance(parsed, dict) else None
    if isinstance(messages, list) and len(messages) > max_messages:
        return (f"{len(messages)} messages; the limit is {max_messages} per request", "invalid_request_error",
                "too_many_messages", None, "messages")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then the client's later messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
