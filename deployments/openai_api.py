"""OpenAI-compatible HTTP ingress (FastAPI through serve.ingress)."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from routing.affinity import pinned_key

from .auth import KeyRing, scoped_session_id
from .config import AppArgs
from .drain import DrainWatch
from .field_errors import field_error
from .guard import TENANT_SCOPE_KEY, Guard, GuardMiddleware
from .openai_schema import (SESSION_ID_MAX, ChatCompletionRequest, CompletionRequest, SamplingFields, SessionId,
                            error_responses)
from .openai_format import Shaper, error_body, sse_stream
from .protocol import ChatChunk, ChatRequest, ErrorInfo, Message
from .turn_stream import TurnResponse, TurnStream

REPLICA_HEADER = "x-swiftserve-replica"
SESSION_HEADER = "x-session-id"
REPREFILL_HEADER = "x-swiftserve-reprefill-ms"  # set when this turn rebuilt the cache
REPREFILL_CAUSE_HEADER = "x-swiftserve-reprefill-cause"  # with it: evicted, moved or forgotten
DURABLE_HEADER = "x-swiftserve-durable"  # non-streamed turns: "false" if acknowledged before the store had it

app = FastAPI(title="swiftserve", description="OpenAI-compatible streaming chat with StreamingLLM sessions")
app.add_middleware(GuardMiddleware)  # API keys and limits, before anything reads the request
SessionPath = Annotated[SessionId, Path(description="the session id the client chose")]
SessionHeader = Annotated[str | None, Header(alias=SESSION_HEADER, max_length=SESSION_ID_MAX,
                                             pattern=r"^[^\x00-\x1f\x7f]*$",  # empty: none, as no header
                                             description="the session id (or the body's `session_id`)")]
HEALTH_TIMEOUT_S = 2.0
DEFAULTS_TIMEOUT_S = 30.0  # a busy replica queues the call behind turns; asked once per ingress replica
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "a completion; SSE when `stream` is true"}}


class APIError(Exception):
    """An OpenAI-shaped error: `code` a string such as "model_not_found" (or None), `param` the field (or None)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, info: ErrorInfo) -> "APIError":
        return cls(info.status, info.message, None if info.type == "invalid_request_error" else info.type)


@app.exception_handler(APIError)
async def _api_error(_, exc: APIError):
    type_ = "invalid_request_error" if exc.status < 500 else "server_error"
    return JSONResponse(error_body(exc.status, exc.message, type_, exc.code, exc.param), status_code=exc.status)


def _param(loc: tuple) -> str | None:
    """OpenAI's spelling of a field path (`messages.[0].role`); None when the body is not JSON at all."""
    path = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc[1:]] if loc[:1] == ("body",) else list(map(str, loc))
    return ".".join(path) or None


@app.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    param = None if first["type"] == "json_invalid" else _param(tuple(first["loc"]))
    message = "the body is not valid JSON" if first["type"] == "json_invalid" else field_error(param or "body", first)
    return JSONResponse(error_body(400, message, "invalid_request_error", param=param), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405)
               else str(exc.detail))
    return JSONResponse(error_body(exc.status_code, message, "invalid_request_error"), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _internal_error(_, exc: Exception):
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def _own_words(chunk: ChatChunk, scoped: str, sid: str) -> ChatChunk:
    """An error chunk as the client should see it: its own session id, not the tenant-scoped one."""
    if chunk.error is None:
        return chunk
    return chunk.model_copy(update={"error": ErrorInfo(**{**chunk.error.model_dump(),
                                                          "message": chunk.error.message.replace(scoped, sid)})})


async def _in_own_words(stream: AsyncIterator[ChatChunk], scoped: str, sid: str) -> AsyncIterator[ChatChunk]:
    async for chunk in stream:
        yield _own_words(chunk, scoped, sid)


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle, args: dict | AppArgs):
        self.server = server
        self.args = AppArgs.model_validate(args)
        self.guard = Guard(KeyRing.from_args(self.args.api_keys_env, self.args.api_keys_file), self.args.limits)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.drain = DrainWatch(context.app_name, self.replica_id)
        self.created = int(time.time())  # when this model came up here, as vLLM reports it
        self.defaults: dict | None = None  # the served sampling defaults, asked of an LLMServer once

    @app.get("/health", responses={503: {"description": "not ready: no LLMServer replica answers, or draining"}})
    async def health(self) -> JSONResponse:
        """Readiness: 200 only while at least one LLMServer replica answers and the server is not draining."""
        if self.drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await asyncio.wait_for(self.server.engine_stats.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception:  # still loading, all replicas down, or too busy to answer in time
            return JSONResponse({"status": "not_ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def _defaults(self, timeout_s: float = DEFAULTS_TIMEOUT_S) -> dict:
        """The sampling a request gets for the fields it leaves out: the model's defaults live where the model
        was loaded, so an LLMServer replica is asked, once."""
        if self.defaults is None:
            try:
                self.defaults = await asyncio.wait_for(self.server.sampling_defaults.remote(), timeout_s)
            except Exception as exc:  # still loading, or no replica answers
                raise APIError(503, f"no replica could serve the request: {type(exc).__name__}",
                               "service_unavailable")
        return self.defaults

    async def _model(self) -> dict:
        engine = self.args.engine
        model = {"id": self.args.model_id, "object": "model", "created": self.created, "owned_by": "swiftserve",
                 # as vLLM: the most tokens one request can hold; the conversation itself is unbounded
                 "max_model_len": engine.max_prompt_tokens + self.args.max_completion_tokens,
                 "cache_tokens": engine.cache_tokens}
        try:
            model["sampling_defaults"] = await self._defaults(HEALTH_TIMEOUT_S)
        except APIError:  # listed anyway: the models are known before a replica is up
            pass
        return model

    @app.get("/v1/models", responses=error_responses())
    async def models(self) -> dict:
        return {"object": "list", "data": [await self._model()]}

    @app.get("/v1/models/{model_id:path}", responses=error_responses(404))
    async def model(self, model_id: str) -> dict:
        if model_id != self.args.model_id:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {self.args.model_id!r}",
                           "model_not_found", "model")
        return await self._model()

    @app.post("/v1/chat/completions", responses={**STREAMED, **error_responses(404, 409, 503)})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request, session: SessionHeader = None):
        messages = [Message(role=m.role if m.role != "developer" else "system", content=m.text())
                    for m in body.messages]
        pin = body.pin or self.args.pin
        key = pinned_key(self.args.model_id, [m.model_dump() for m in messages]) if pin == "system" else None
        return await self._respond(body, request, session, "chat.completion", messages=messages, pin=pin,
                                   pinned_key=key)

    @app.post("/v1/completions", responses={**STREAMED, **error_responses(404, 409, 503)})
    async def completions(self, body: CompletionRequest, request: Request, session: SessionHeader = None):
        return await self._respond(body, request, session, "text_completion", prompt=body.prompt,
                                   pinned_tokens=body.pinned_tokens)

    @app.get("/v1/sessions/{session_id:path}", responses=error_responses(404, 503))
    async def get_session(self, session_id: SessionPath, request: Request) -> dict:
        info = await self._session_call("get_session", session_id, request)
        if info is None:
            raise APIError(404, f"session {session_id!r} not found", "session_not_found")
        return {"object": "session", "id": session_id, **info.model_dump(exclude={"session_id"})}

    @app.delete("/v1/sessions/{session_id:path}", responses=error_responses(404, 503))
    async def delete_session(self, session_id: SessionPath, request: Request) -> dict:
        if not await self._session_call("delete_session", session_id, request):
            raise APIError(404, f"session {session_id!r} not found", "session_not_found")
        return {"object": "session.deleted", "id": session_id, "deleted": True}

    async def _session_call(self, method: str, session_id: str, request: Request):
        """Call LLMServer.`method` for the caller's own session (scoped to its tenant)."""
        scoped = scoped_session_id(request.scope[TENANT_SCOPE_KEY], session_id)
        try:
            return await getattr(self.server.options(session_id=scoped), method).remote(scoped)
        except Exception as exc:  # the store or the replica could not answer
            raise APIError(503, f"the session could not be reached: {type(exc).__name__}", "service_unavailable")

    # ---- shared path of both completion endpoints ---------------------------
    async def _respond(self, body: SamplingFields, request: Request, session: str | None, kind: str, **content):
        if body.model != self.args.model_id:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.args.model_id!r}", "model_not_found", "model")
        if self.drain.draining:
            raise APIError(503, "the server is shutting down; retry on another server", "server_shutting_down")
        sid = session or body.session_id
        scoped = scoped_session_id(request.scope[TENANT_SCOPE_KEY], sid) if sid else None
        turn = ChatRequest(session_id=scoped, sampling=body.sampling(await self._defaults()),
                           logprobs=body.wants_logprobs, turn_id=uuid.uuid4().hex, **content)
        self.drain.enter()  # in flight from here: a drain waits for this turn (until_cut's end leaves)
        try:
            upstream, first = await self._first_chunk(turn, scoped)
        except BaseException:
            self.drain.leave()
            raise
        if first.error is not None:
            self.drain.leave()
            raise APIError.of((_own_words(first, scoped, sid) if scoped != sid else first).error)
        stream = self.drain.until_cut(upstream, first.replica_id)
        if scoped != sid:
            stream, first = _in_own_words(stream, scoped, sid), _own_words(first, scoped, sid)
        headers = {REPLICA_HEADER: first.replica_id}
        if first.reprefill_s is not None:
            headers[REPREFILL_HEADER] = f"{1000 * first.reprefill_s:.1f}"
            headers[REPREFILL_CAUSE_HEADER] = first.reprefill_cause
        if sid and sid.isascii():  # a body's session_id may be any text; a header holds latin-1 (else a 500)
            headers[SESSION_HEADER] = sid
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        shape = Shaper(kind, rid, self.args.model_id, body.wants_logprobs, first)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return TurnResponse(sse_stream(shape, first, stream, include_usage), upstream, headers=headers,
                                media_type="text/event-stream")
        try:
            chunks = [first] + [c async for c in stream]
        finally:
            upstream.cancel()  # if the client left before the turn ended
        last = chunks[-1]
        if last.error is not None:
            raise APIError.of(last.error)
        return JSONResponse(shape.whole(chunks), headers={**headers, DURABLE_HEADER: str(last.durable).lower()})

    def _cutter(self, turn: ChatRequest, sid: str | None):
        """How the ingress cuts a turn at the replica too (its session's owner): Serve's own cancellation may
        reach the replica after the request it cancels."""
        if sid is None:
            return None
        return lambda: self.server.options(session_id=sid).cancel_turn.remote(turn.turn_id)

    async def _first_chunk(self, turn: ChatRequest, sid: str | None) -> tuple[TurnStream, ChatChunk]:
        """Start the turn; if the replica dies before sending anything, retry once (on the new owner)."""
        for attempt in (1, 2):
            stream = TurnStream(self.server.options(stream=True, session_id=sid).chat.remote(turn),
                                self._cutter(turn, sid))
            try:
                return stream, await stream.__anext__()
            except asyncio.CancelledError:  # the client left before the first token
                stream.cancel()
                raise
            except StopAsyncIteration:
                raise APIError(500, "the server ended the turn without a response")
            except RequestCancelledError:  # cancelled, not lost: never run a cut turn again
                raise asyncio.CancelledError
            except RayTaskError as exc:  # the replica's code raised: a bug, not a lost replica; no retry
                raise APIError(500, f"the server failed the turn: {type(exc).__name__}")
            except Exception as exc:  # replica died or was unreachable before streaming anything
                if attempt == 2:
                    raise APIError(503, f"no replica could serve the turn: {type(exc).__name__}",
                                   "service_unavailable")
