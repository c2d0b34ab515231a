"""The ingress's gate: every HTTP request passes it before FastAPI reads or parses anything.

In order: API key -> tenant (401), declared body size (413), the tenant's rate
(429 + Retry-After), its concurrent streams (429), the body read with a byte
count (413). `/health` is open. Nothing here logs headers or bodies.
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ray import serve
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
STREAM_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


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
        stream = scope["method"] == "POST" and path in STREAM_PATHS
        if stream and not self.limiter.open_stream(tenant):
            return await reject(429, f"too many concurrent streams (the limit is "
                                     f"{self.limits.max_concurrent_streams} per tenant)",
                                "rate_limit_error", "too_many_concurrent_streams")
        try:
            body = await _read_body(receive, self.limits.max_request_bytes)
            if body is None:
                return await reject(*self._too_large())
            scope[TENANT_SCOPE_KEY] = tenant
            await app(scope, _replay(body, receive), send)
        except ClientDisconnect:
            return
        finally:
            if stream:
                self.limiter.close_stream(tenant)

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
                  code: str | None = None, headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(error_body(status, message, type_, code), status_code=status, headers=headers)
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
