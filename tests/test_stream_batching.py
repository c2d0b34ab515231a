"""Stream batching alone: the first chunk is not delayed, later ones merge per interval, ends are not held."""
import asyncio
import time

import pytest

from deployments.protocol import ChatChunk, ErrorInfo, TokenLogprob
from deployments.stream_batching import coalesce


def token(i: int, **kw) -> ChatChunk:
    lp = [TokenLogprob(token=chr(97 + i), logprob=-0.1 * i, bytes=[97 + i])]
    return ChatChunk(replica_id="r", text=chr(97 + i), token_ids=[i], logprobs=lp, **kw)


async def paced(chunks: list[ChatChunk], every_s: float, stamps: dict):
    for c in chunks:
        await asyncio.sleep(every_s)
        stamps[c.token_ids[0] if c.token_ids else "end"] = time.perf_counter()
        yield c


async def received(source, interval_s: float):
    out = []
    async for c in coalesce(source, interval_s):
        out.append((time.perf_counter(), c))
    return out


async def test_first_chunk_at_once_then_merged_per_interval_and_the_end_not_held():
    stamps = {}
    chunks = [token(i) for i in range(20)] + [token(20, finish_reason="stop", prompt_tokens=3, completion_tokens=21)]
    out = await received(paced(chunks, 0.005, stamps), interval_s=0.05)
    first_at, first = out[0]
    assert first.token_ids == [0] and first_at - stamps[0] < 0.02  # not waiting for the interval
    assert 3 <= len(out) <= 8  # about 100 ms of tokens after the first, in 50 ms messages
    merged = [t for _, c in out for t in c.token_ids]
    assert merged == list(range(21)) and "".join(c.text for _, c in out) == "abcdefghijklmnopqrstu"
    assert [lp.token for _, c in out for lp in c.logprobs] == list("abcdefghijklmnopqrstu")
    last_at, last = out[-1]
    assert last.finish_reason == "stop" and last.completion_tokens == 21 and last_at - stamps[20] < 0.02


async def test_zero_interval_merges_only_what_is_waiting():
    stamps = {}
    out = await received(paced([token(i) for i in range(5)], 0.01, stamps), interval_s=0.0)
    assert [c.token_ids for _, c in out] == [[i] for i in range(5)]


async def test_an_error_is_sent_on_its_own_after_the_tokens_before_it():
    async def source():
        yield token(0)
        yield token(1)
        yield token(2)
        yield ChatChunk(replica_id="r", error=ErrorInfo(status=503, type="capacity", message="gone"))
    out = [c async for c in coalesce(source(), 0.05)]
    assert out[-1].error is not None and not out[-1].token_ids
    assert [t for c in out[:-1] for t in c.token_ids] == [0, 1, 2]


async def test_a_failing_turn_raises_and_a_closed_consumer_stops_the_turn():
    async def failing():
        yield token(0)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        [c async for c in coalesce(failing(), 0.01)]

    closed = asyncio.Event()

    async def endless():
        try:
            i = 0
            while True:
                yield token(i % 20)
                i += 1
                await asyncio.sleep(0.001)
        finally:
            closed.set()
    stream = coalesce(endless(), 0.01)
    assert (await stream.__anext__()).token_ids == [0]
    await stream.aclose()
    await asyncio.wait_for(closed.wait(), 1.0)
