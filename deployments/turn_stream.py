"""The ingress's end of a turn streamed from an LLMServer: whatever ends the HTTP response first (the client
leaving, the proxy cancelling, an error), the LLMServer's turn is cancelled unless it already finished.

Serve cancels a child request only on some paths, and Starlette abandons a streamed body when the client
disconnects without closing it; so the ingress cancels explicitly, in a `finally`. A cancelled turn is
aborted in the engine and not committed (`LLMServer.chat`).
"""
from __future__ import annotations

from collections.abc import Callable

from ray.serve.handle import DeploymentResponseGenerator
from starlette.responses import StreamingResponse

from .protocol import ChatChunk


class TurnStream:
    """The LLMServer's chunks of one turn; `done` once its final (or error) chunk arrived."""

    def __init__(self, downstream: DeploymentResponseGenerator, cut: Callable[[], object] | None = None):
        """`cut`: also tells the LLMServer the turn is cut (LLMServer.cancel_turn), for a request Serve
        delivers after cancelling it."""
        self.downstream, self.cut, self.done = downstream, cut, False

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> ChatChunk:
        try:
            chunk = await self.downstream.__anext__()
        except StopAsyncIteration:
            self.done = True
            raise
        self.done = self.done or chunk.finish_reason is not None or chunk.error is not None
        return chunk

    def cancel(self) -> None:
        """Cancel the LLMServer's turn unless it finished (then there is nothing left to stop)."""
        if not self.done:
            self.done = True
            self.downstream.cancel()
            if self.cut is not None:
                self.cut()


class TurnResponse(StreamingResponse):
    """A streamed turn's HTTP response that cancels the turn upstream when the response ends early."""

    def __init__(self, content, turn: TurnStream, **kwargs):
        super().__init__(content, **kwargs)
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.cancel()
