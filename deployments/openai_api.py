"""OpenAI-compatible HTTP ingress (FastAPI through serve.ingress)."""

import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import AppArgs
from .openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from .openai_format import Shaper, error_body, sse_stream
from .protocol import ChatChunk, ChatRequest, Message

REPLICA_HEADER = "x-swiftserve-replica"
SESSION_HEADER = "x-session-id"
REPREFILL_HEADER = "x-swiftserve-reprefill-ms"  # set when this turn rebuilt the cache

app = FastAPI(title="swiftserve", description="OpenAI-compatible streaming chat with StreamingLLM sessions")


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


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle, args: dict | AppArgs):
        self.server = server
        self.args = AppArgs.model_validate(args)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.args.model_id, "object": "model", "created": 0,
                                            "owned_by": "swiftserve"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        messages = [Message(role=m.role if m.role != "developer" else "system", content=m.text())
                    for m in body.messages]
        return await self._respond(body, request, "chat.completion", messages=messages)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._respond(body, request, "text_completion", prompt=body.prompt)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> dict:
        info = await self.server.options(session_id=session_id).get_session.remote(session_id)
        if info is None:
            raise APIError(404, f"session {session_id!r} not found", code="session_not_found")
        return {"object": "session", "id": session_id, **info.model_dump(exclude={"session_id"})}

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> dict:
        if not await self.server.options(session_id=session_id).delete_session.remote(session_id):
            raise APIError(404, f"session {session_id!r} not found", code="session_not_found")
        return {"object": "session.deleted", "id": session_id, "deleted": True}

    # ---- shared path of both completion endpoints ---------------------------
    async def _respond(self, body: SamplingFields, request: Request, kind: str, **content):
        if body.model != self.args.model_id:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.args.model_id!r}", code="model_not_found", param="model")
        sid = request.headers.get(SESSION_HEADER) or body.session_id
        turn = ChatRequest(session_id=sid, sampling=body.sampling(min(256, self.args.max_completion_tokens)),
                           **content)
        stream, first = await self._first_chunk(turn, sid)
        if first.error is not None:
            raise APIError(first.error.status, first.error.message, first.error.type, first.error.type)
        headers = {REPLICA_HEADER: first.replica_id}
        if first.reprefill_s is not None:
            headers[REPREFILL_HEADER] = f"{1000 * first.reprefill_s:.1f}"
        if sid:
            headers[SESSION_HEADER] = sid
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        shape = Shaper(kind, rid, self.args.model_id, body.logprobs)
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
            except Exception as exc:  # replica died or was unreachable before streaming anything
                if attempt == 2:
                    raise APIError(503, f"no replica could serve the turn: {type(exc).__name__}",
                                   "service_unavailable")
