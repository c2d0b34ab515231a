"""The host tier: idle sessions' cache pages copied out of the GPU pool into bounded host memory.

A session's tiers: resident (pages in the pool) -> host (its pages here) -> ids only
(re-prefilled from its retained ids) -> store only. Leaving the pool under page pressure
copies the pages here instead of dropping them; the session's next turn copies them back
(bytes, so bit-identical) instead of re-prefilling. Full: the least recently offloaded
session falls to ids only.

The copies are written in terms of "these page ids of these pool tensors" (`pool_tensors`:
today the k and v pools; per-page scales of a quantized cache would be one more tensor), so
a host page is the bytes of one pool page of every tensor, every layer. On CUDA the host
memory is pinned and every copy runs on one copy stream, gathered or scattered through a
small device staging buffer (pool pages are not contiguous, host pages mostly are): decode
steps on the compute stream go on meanwhile. Pages leaving the pool return to its free list
only once their copy has finished; a returning session is left out of steps until its
pages have arrived.

Tensor parallel: each rank's pool holds its own heads of the same pages. Rank 0's tier decides
and records each copy (`ops`); the step plan carries them to the other ranks, whose tiers
`replay` them on their own pages and memory before the step's forward.
"""
from __future__ import annotations

import mmap
import weakref
from collections import OrderedDict, deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cache import PageTable, SinkWindowCache
from .session import Session

# device staging per copy chunk: few chunks (each costs ~10 launches of the engine thread's time) and
# a scatter/gather kernel well under a decode step; 7B: 8 chunks per 2 GiB session
STAGING_BYTES = 256 << 20
# one host<->device copy at most: a decode step's own small copies (metadata in, sampled ids out) may
# queue behind one on the copy engine, so keep it well under a step (~0.3 ms of PCIe 5)
COPY_BYTES = 16 << 20


def pool_tensors(cache: SinkWindowCache) -> list[torch.Tensor]:
    """The paged tensors a host page holds: each [rows, pages * page_size, ...] (fp8: the per-token
    scales too, [layers, kv_heads, slots] seen as [layers * kv_heads, slots])."""
    if not cache.fp8:
        return [cache.k, cache.v]
    # e4m3 moved as its bytes (index_copy has no float8 kernel on the CPU)
    return [cache.k.view(torch.uint8), cache.v.view(torch.uint8),
            *(s.view(-1, s.shape[-1]) for s in (cache.k_scale, cache.v_scale))]


@dataclass
class HostEntry:
    """Where a session's pages sit in the host tier, and the page table's shape to rebuild."""
    session: Session
    pages: list[int]  # host pages: the table's sink pages, then its window pages in order
    sink_pages: int
    sink_len: int
    window_start: int
    window_len: int
    pinned_hash: str | None  # the sink pages were a shared pinned region (engine/pinned.py)


class HostTier:
    def __init__(self, cache: SinkWindowCache, capacity_bytes: int):
        self.cache = cache
        # what one page of the copied tensors takes (cache.page_bytes' figure, counted from the tensors)
        self.page_bytes = sum(t[:, :cache.P].numel() * t.element_size() for t in pool_tensors(cache))
        self.num_pages = capacity_bytes // self.page_bytes
        device = cache.k.device
        self.cuda = device.type == "cuda"
        nbytes = self.num_pages * self.page_bytes
        host = pinned(self, nbytes) if self.cuda and nbytes else torch.empty(nbytes, dtype=torch.uint8)
        self.host = host.view(self.num_pages, self.page_bytes)
        self.free: deque[int] = deque(range(self.num_pages))
        self.entries: OrderedDict[str, HostEntry] = OrderedDict()  # least recently offloaded first
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        n_stage = max(1, min(STAGING_BYTES // self.page_bytes, self.num_pages))
        self.copy_pages = max(1, COPY_BYTES // self.page_bytes)
        self.staging = torch.empty(n_stage, self.page_bytes, dtype=torch.uint8, device=device) \
            if self.num_pages else None
        self.leaving: deque[tuple[object, list[int]]] = deque()  # (copy done, pool pages) of offloads
        self.arriving: dict[str, object] = {}  # session id -> copy done, of reloads under way
        self.offloads = self.reloads = self.drops = 0
        self.ops: list[tuple[str, list[int], list[int]]] | None = None  # rank 0 of a TP engine: copies made

    # ---- pool -> host ---------------------------------------------------------------
    def offload(self, session: Session) -> bool:
        """Copy a session's pages here and empty its table (the pool pages come back to the pool's free
        list when the copy is done: `poll`); the least recently offloaded sessions fall to ids only to
        make room. False when its pages cannot fit (nothing changed)."""
        table = session.table
        gpu = table.sink_pages + list(table.window_pages)
        # never drop a session whose turn is queued: it is about to be copied back
        droppable = [sid for sid, e in self.entries.items() if not e.session.running]
        if not gpu or len(gpu) > len(self.free) + sum(len(self.entries[sid].pages) for sid in droppable):
            return False
        for sid in droppable:
            if len(self.free) >= len(gpu):
                break
            entry = self.entries.pop(sid)
            self.free.extend(entry.pages)
            entry.session.needs_reprefill = True  # ids only: its next turn re-prefills them
            self.drops += 1
        host = [self.free.popleft() for _ in gpu]
        self.entries[session.id] = HostEntry(session, host, len(table.sink_pages), table.sink_len,
                                             table.window_start, table.window_len, table.pinned_hash)
        with self._copying():
            self._copy_out(gpu, host)
            # shared pinned pages leave the pool only with their last table (copied here all the same:
            # the region may be gone when this session comes back)
            sinks = self.cache.pinned.release(table) if table.pinned_hash else table.sink_pages
            self.leaving.append((self._done(), sinks + list(table.window_pages)))
        table.sink_pages, table.window_pages = [], deque()
        table.sink_len = table.window_len = table.window_start = 0
        self.offloads += 1
        return True

    def _copy_out(self, gpu: list[int], host: list[int]) -> None:
        idx, n = self._index(gpu), len(self.staging)
        for i in range(0, len(gpu), n):
            self._out(idx[i:i + n], host[i:i + n])
        if self.ops is not None:
            self.ops.append(("out", gpu, host))

    def _out(self, idx: torch.Tensor, host: list[int]) -> None:
        stage = self.staging[:len(host)]
        for t, part in zip(pool_tensors(self.cache), self._parts(stage)):
            part.copy_(paged(t, self.cache.P).index_select(1, idx).transpose(0, 1))
        for a, b, h in runs(host, self.copy_pages):
            self.host[h:h + b - a].copy_(stage[a:b], non_blocking=True)

    # ---- host -> pool ---------------------------------------------------------------
    def holds(self, session_id: str) -> bool:
        return session_id in self.entries

    def reload(self, session_id: str, table: PageTable) -> None:
        """Copy a session's pages back into free pool pages (the caller reserved them) and rebuild its
        table; the session may run once `arrived` says so. Its host pages are free at once: every
        later copy that could reuse them runs after this one on the same stream."""
        entry = self.entries.pop(session_id)
        shared = entry.pinned_hash is not None and self.cache.pinned.attach(table, entry.pinned_hash)
        wanted = entry.pages[entry.sink_pages:] if shared else entry.pages  # a resident region is not copied
        gpu = [self.cache.free.popleft() for _ in wanted]
        with self._copying():
            self._copy_in(wanted, gpu)
            if self.cuda:
                self.arriving[session_id] = self._done()
        self.free.extend(entry.pages)
        table.sink_len, table.window_start, table.window_len = entry.sink_len, entry.window_start, entry.window_len
        if shared:
            table.window_pages = deque(gpu)
        else:
            table.sink_pages, table.window_pages = gpu[:entry.sink_pages], deque(gpu[entry.sink_pages:])
            # the region left the pool meanwhile: this copy is it again. Published once the table's lengths are
            # back: the region records sink_len as its length (it was 0 here, so the next session attaching to
            # it started with no sinks and wrote its own ids over the shared pages)
            if entry.pinned_hash is not None:
                self.cache.pinned.publish(table, entry.pinned_hash)
        self.reloads += 1

    def _copy_in(self, host: list[int], gpu: list[int]) -> None:
        idx, n = self._index(gpu), len(self.staging)
        for i in range(0, len(gpu), n):
            self._in(host[i:i + n], idx[i:i + n])
        if self.ops is not None:
            self.ops.append(("in", host, gpu))

    def _in(self, host: list[int], idx: torch.Tensor) -> None:
        stage = self.staging[:len(host)]
        for a, b, h in runs(host, self.copy_pages):
            stage[a:b].copy_(self.host[h:h + b - a], non_blocking=True)
        for t, part in zip(pool_tensors(self.cache), self._parts(stage)):
            paged(t, self.cache.P).index_copy_(1, idx, part.transpose(0, 1))

    def arrived(self, session_id: str) -> bool:
        done = self.arriving.get(session_id)
        if done is None or done.query():
            self.arriving.pop(session_id, None)
            return True
        return False

    def replay(self, ops: list[tuple[str, list[int], list[int]]]) -> None:
        """Ranks 1..N-1: rank 0's copies since the last step, on this rank's pages, ordered before the
        step's forward (which may write pages just copied out, or read pages just copied in)."""
        if not ops:
            return
        with self._copying():
            for kind, a, b in ops:
                (self._copy_out if kind == "out" else self._copy_in)(a, b)
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    # ---- bookkeeping ------------------------------------------------------------------
    def discard(self, session_id: str) -> None:
        """Forget a session's host copy (the session was dropped)."""
        entry = self.entries.pop(session_id, None)
        if entry is not None:
            self.free.extend(entry.pages)

    def poll(self) -> None:
        """Return the pool pages of finished offloads to the pool's free list."""
        while self.leaving and (self.leaving[0][0] is None or self.leaving[0][0].query()):
            self.cache.free.extend(self.leaving.popleft()[1])

    def pages_leaving(self) -> int:
        return sum(len(pages) for _, pages in self.leaving)

    def busy(self) -> bool:
        return bool(self.leaving or self.arriving)

    def wait(self) -> None:
        """Block until every copy under way is done (nothing else to run, or before pages are reused
        outside the tier's bookkeeping: a failed step, an aborted reload)."""
        if self.stream is not None:
            self.stream.synchronize()
        self.arriving.clear()
        self.poll()

    @property
    def bytes_used(self) -> int:
        return (self.num_pages - len(self.free)) * self.page_bytes

    # ---- helpers ------------------------------------------------------------------------
    def _copying(self):
        if self.stream is None:
            return nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # pages written, old reads done
        return torch.cuda.stream(self.stream)

    def _done(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def _index(self, pages: list[int]) -> torch.Tensor:
        """Pool page ids on the device, copied from pinned memory: a pageable copy could wait for the
        copies already queued on the stream, and the engine thread with it."""
        idx = torch.tensor(pages, dtype=torch.long)
        return idx.pin_memory().to(self.staging.device, non_blocking=True) if self.cuda else idx

    def _parts(self, stage: torch.Tensor) -> list[torch.Tensor]:
        """The staging rows as one [n, layers, elements] view per pool tensor."""
        parts, off, n = [], 0, len(stage)
        for t in pool_tensors(self.cache):
            size = t[:, :self.cache.P].numel() * t.element_size()
            parts.append(stage[:, off:off + size].view(t.dtype).view(n, t.shape[0], -1))
            off += size
        return parts


def paged(t: torch.Tensor, page_size: int) -> torch.Tensor:
    """A pool tensor [layers, pages * page_size, ...] as [layers, pages, elements of one page]."""
    return t.view(t.shape[0], t.shape[1] // page_size, -1)


def runs(pages: list[int], most: int):
    """(start, end, first page) of each run of consecutive pages in the list, `most` pages at most:
    one copy each."""
    a = 0
    for i in range(1, len(pages) + 1):
        if i == len(pages) or pages[i] != pages[i - 1] + 1 or i - a == most:
            yield a, i, pages[a]
            a = i


def pinned(owner: object, nbytes: int) -> torch.Tensor:
    """nbytes of page-locked host memory (cudaHostRegister) until `owner` is collected. Not pin_memory():
    PyTorch's pinned allocator rounds a block up to a power of two (80 GB would take 128 GiB)."""
    raw = torch.empty(nbytes + mmap.PAGESIZE, dtype=torch.uint8)
    t = raw[(-raw.data_ptr()) % mmap.PAGESIZE:][:nbytes]  # page-aligned: the pieces never share a page
    # one registration: a copy may not span two of them (cudaErrorInvalidValue on the H200)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0))
    weakref.finalize(owner, _unpin, raw, t.data_ptr())  # holds the memory: unregistered before it is freed
    return t


def _unpin(raw: torch.Tensor, base: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(base)
