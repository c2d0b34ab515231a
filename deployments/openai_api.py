"""OpenAI-compatible HTTP ingress (FastAPI through serve.ingress)."""

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import KeyRing, scoped_session_id
from .config import AppArgs
from .guard import TENANT_SCOPE_KEY, Guard, GuardMiddleware
from .openai_schema import (SESSION_ID_MAX, ChatCompletionRequest, CompletionRequest, SamplingFields, SessionId,
                            error_responses)
from .openai_format import Shaper, error_body, sse_stream
from .protocol import ChatChunk, ChatRequest, ErrorInfo, Message

REPLICA_HEADER = "x-swiftserve-replica"
SESSION_HEADER = "x-session-id"
REPREFILL_HEADER = "x-swiftserve-reprefill-ms"  # set when this turn rebuilt the cache

app = FastAPI(title="swiftserve", description="OpenAI-compatible streaming chat with StreamingLLM sessions")
app.add_middleware(GuardMiddleware)  # API keys and limits, before anything reads the request
SessionPath = Annotated[SessionId, Path(description="the session id the client chose")]
SessionHeader = Annotated[str | None, Header(alias=SESSION_HEADER, max_length=SESSION_ID_MAX,
                                             pattern=r"^[^\x00-\x1f\x7f]*$",  # empty: none, as no header
                                             description="the session id (or the body's `session_id`)")]
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "a completion; SSE when `stream` is true"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


@app.exception_handler(APIError)
async def _api_error(_, exc: APIError):
    return JSONResponse(error_body(exc.status, exc.message, exc.type, exc.code, exc.param), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return JSONResponse(error_body(400, f"{param or 'body'}: {first['msg']}", "invalid_request_error", param=param),
                        status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_, exc: StarletteHTTPException):
    return JSONResponse(error_body(exc.status_code, str(exc.detail), "invalid_request_error"),
                        status_code=exc.status_code)


@app.exception_handler(Exception)
async def _internal_error(_, exc: Exception):
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}", "internal_error"), status_code=500)


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

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", responses=error_responses())
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.args.model_id, "object": "model", "created": 0,
                                            "owned_by": "swiftserve"}]}

    @app.post("/v1/chat/completions", responses={**STREAMED, **error_responses(404, 409, 503)})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request, session: SessionHeader = None):
        if len(body.messages) > self.args.limits.max_messages:
            raise APIError(400, f"{len(body.messages)} messages; the limit is {self.args.limits.max_messages} "
                                "per request", code="too_many_messages", param="messages")
        messages = [Message(role=m.role if m.role != "developer" else "system", content=m.text())
                    for m in body.messages]
        return await self._respond(body, request, session, "chat.completion", messages=messages)

    @app.post("/v1/completions", responses={**STREAMED, **error_responses(404, 409, 503)})
    async def completions(self, body: CompletionRequest, request: Request, session: SessionHeader = None):
        return await self._respond(body, request, session, "text_completion", prompt=body.prompt)

    @app.get("/v1/sessions/{session_id:path}", responses=error_responses(404, 503))
    async def get_session(self, session_id: SessionPath, request: Request) -> dict:
        info = await self._session_call("get_session", session_id, request)
        if info is None:
            raise APIError(404, f"session {session_id!r} not found", code="session_not_found")
        return {"object": "session", "id": session_id, **info.model_dump(exclude={"session_id"})}

    @app.delete("/v1/sessions/{session_id:path}", responses=error_responses(404, 503))
    async def delete_session(self, session_id: SessionPath, request: Request) -> dict:
        if not await self._session_call("delete_session", session_id, request):
            raise APIError(404, f"session {session_id!r} not found", code="session_not_found")
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
                                f"{self.args.model_id!r}", code="model_not_found", param="model")
        sid = session or body.session_id
        scoped = scoped_session_id(request.scope[TENANT_SCOPE_KEY], sid) if sid else None
        turn = ChatRequest(session_id=scoped, sampling=body.sampling(min(256, self.args.max_completion_tokens)),
                           logprobs=body.wants_logprobs, **content)
        stream, first = await self._first_chunk(turn, scoped)
        if scoped != sid:
            stream, first = _in_own_words(stream, scoped, sid), _own_words(first, scoped, sid)
        if first.error is not None:
            raise APIError(first.error.status, first.error.message, first.error.type, first.error.type)
        headers = {REPLICA_HEADER: first.replica_id}
        if first.reprefill_s is not None:
            headers[REPREFILL_HEADER] = f"{1000 * first.reprefill_s:.1f}"
        if sid:
            headers[SESSION_HEADER] = sid
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        shape = Shaper(kind, rid, self.args.model_id, body.wants_logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse_stream(shape, first, stream, include_usage), headers=headers,
                                     media_type="text/event-stream")
        chunks = [first] + [c async for c in stream]
        last = chunks[-1]
        if last.error is not None:
            raise APIError(last.error.status, last.error.message, last.error.type, last.error.type)
        return JSONResponse(shape.whole(chunks), headers=headers)

    async def _first_chunk(self, turn: ChatRequest, sid: str | None) -> tuple[AsyncIterator[ChatChunk], ChatChunk]:
        """Start the turn; if the replica dies before sending anything, retry once (on the new owner)."""
        for attempt in (1, 2):
            stream = self.server.options(stream=True, session_id=sid).chat.remote(turn)
            try:
                return stream, await stream.__anext__()
            except StopAsyncIteration:
                raise APIError(500, "the server ended the turn without a response", "internal_error")
            except RayTaskError as exc:  # the replica's code raised: a bug, not a lost replica; no retry
                raise APIError(500, f"the server failed the turn: {type(exc).__name__}", "internal_error")
            except Exception as exc:  # replica died or was unreachable before streaming anything
                if attempt == 2:
                    raise APIError(503, f"no replica could serve the turn: {type(exc).__name__}",
                                   "service_unavailable")
