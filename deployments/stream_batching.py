"""Stream batching: LLMServer sends a turn's tokens to the ingress in fewer, larger messages.

The first chunk goes out at once (time to first token is not delayed); after it,
chunks arriving within `interval_s` of the previous message are merged into one,
as Ray Serve LLM's stream batching does. A turn's final chunk goes out without
waiting, and an error chunk is never merged (what came before it is sent first).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .protocol import ChatChunk

_END = object()


async def coalesce(chunks: AsyncIterator[ChatChunk], interval_s: float) -> AsyncIterator[ChatChunk]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ended = asyncio.Event()  # the turn's last chunk is queued: stop waiting for the interval

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
                if chunk.finish_reason is not None or chunk.error is not None:
                    ended.set()
        finally:
            queue.put_nowait(_END)
            ended.set()

    task = loop.create_task(pump())
    try:
        next_send = None  # None until the first message: it is never delayed
        while True:
            batch = [await queue.get()]
            if batch[0] is not _END and next_send is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), max(0.0, next_send - loop.time()))
            while not queue.empty():
                batch.append(queue.get_nowait())
            for chunk in merged([c for c in batch if c is not _END]):
                yield chunk
            next_send = loop.time() + interval_s
            if batch[-1] is _END:
                break
        await task  # re-raises what the turn raised
    finally:
        task.cancel()  # the consumer went away: the turn's generator is closed, the engine aborts it


def merged(batch: list[ChatChunk]) -> list[ChatChunk]:
    """Consecutive token chunks as one chunk; error chunks stay on their own."""
    out, run = [], []
    for chunk in batch:
        if chunk.error is None:
            run.append(chunk)
            continue
        if run:
            out.append(merge(run))
            run = []
        out.append(chunk)
    if run:
        out.append(merge(run))
    return out


def merge(run: list[ChatChunk]) -> ChatChunk:
    """One chunk with the text, token ids and logprobs of `run`, and its last chunk's finish and usage."""
    if len(run) == 1:
        return run[0]
    logprobs = None if run[0].logprobs is None else [lp for c in run for lp in c.logprobs or []]
    return run[-1].model_copy(update=dict(text="".join(c.text for c in run),
                                          token_ids=[t for c in run for t in c.token_ids], logprobs=logprobs,
                                          reprefill_s=run[0].reprefill_s,
                                          reprefill_cause=run[0].reprefill_cause))
