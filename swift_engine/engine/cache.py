"""The sink+window paged KV cache: one preallocated page pool shared by all sessions.

Each session has a page table: sink pages (the first S tokens, never evicted;
a pinned region of P >= S tokens in their place, engine/pinned.py), then window
pages in logical order, used as a queue. Tokens are evicted one at
a time from the window's front; a window page is freed once all its tokens are
evicted. A slot is `page * page_size + offset`; keys are stored before RoPE.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import CapacityError
from . import kv_fp8
from .pinned import PinnedPages


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def span_pages(sinks: int, window: int, page_size: int) -> int:
    """Most pages a table of `sinks` sink and `window` window tokens spans (the oldest window
    token may sit anywhere in its page). Every page count of the engine derives from this."""
    return ceil_div(sinks, page_size) + ceil_div(window + page_size - 1, page_size)


def running_pages(sinks: int, window: int, page_size: int, max_batch_tokens: int) -> int:
    """Pages reserved for a running session: its steady S + W pages, one step's chunk, one spare."""
    return span_pages(sinks, window, page_size) + ceil_div(max_batch_tokens, page_size) + 1


def page_bytes(shape: tuple[int, int, int], page_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> float:
    """Bytes one page of keys and values takes over all layers (fp8: scales included)."""
    layers, kv_heads, head_dim = shape
    return 2 * layers * kv_heads * head_dim * page_size * kv_fp8.bytes_per_element(kv_cache_dtype, dtype, head_dim)


def slot_of(pages, index: int, page_size: int) -> int:
    """The pool slot of a page table's `index`-th token."""
    return pages[index // page_size] * page_size + index % page_size


@dataclass
class PageTable:
    sink_pages: list[int] = field(default_factory=list)
    sink_len: int = 0
    window_pages: deque[int] = field(default_factory=deque)
    window_start: int = 0  # offset of the oldest window token in window_pages[0]
    window_len: int = 0
    sink_cap: int | None = None    # sink tokens of this table (a pinned region's P); None: the cache's S
    pinned_hash: str | None = None  # set while sink_pages are the registry's shared pinned pages

    @property
    def pages(self) -> int:
        return len(self.sink_pages) + len(self.window_pages)

    @property
    def tokens(self) -> int:
        return self.sink_len + self.window_len


@dataclass
class AppendPlan:
    """Where a step's new tokens go and what attention may read (before eviction).

    Carries the page lists, not per-token slots: building S + W Python ints per session per
    step cost ~1 ms at 4096 tokens. The torch path asks for `sink_slots` / `window_slots`;
    the GPU path reads the pages directly.
    """

    write_slots: list[int]
    new_sinks: int             # leading tokens of the chunk that became sinks
    old_window: int            # window tokens that were there before the chunk
    page_size: int
    sink_pages: list[int]      # after the append
    sink_len: int
    window_pages: list[int]    # in logical order, oldest first
    window_start: int          # offset of the oldest window token in window_pages[0]
    window_len: int            # old window then new window tokens

    @property
    def sink_slots(self) -> list[int]:
        return [slot_of(self.sink_pages, i, self.page_size) for i in range(self.sink_len)]

    @property
    def window_slots(self) -> list[int]:
        start = self.window_start
        return [slot_of(self.window_pages, start + i, self.page_size) for i in range(self.window_len)]


class SinkWindowCache:
    def __init__(self, sink_tokens: int, window_tokens: int, page_size: int, num_pages: int,
                 shape: tuple[int, int, int], device, dtype, kv_cache_dtype: str = "auto",
                 max_pinned_tokens: int = 0):
        self.S, self.W, self.P = sink_tokens, window_tokens, page_size
        self.max_sinks = max(sink_tokens, max_pinned_tokens)  # longest sink region a table may have
        self.pinned = PinnedPages()
        layers, kv_heads, head_dim = shape
        self.dtype = dtype  # what attention computes in; k/v hold e4m3 under kv_cache_dtype "fp8"
        self.fp8 = kv_cache_dtype == "fp8"
        store = kv_fp8.FP8 if self.fp8 else dtype
        self.k = torch.empty(layers, num_pages * page_size, kv_heads, head_dim, device=device, dtype=store)
        self.v = torch.empty_like(self.k)
        # fp8: one scale per KV head and slot (kv_fp8.py says why), a head's slots contiguous so a
        # kernel reads a block of keys' scales in one transaction; None otherwise
        self.k_scale = torch.zeros(layers, kv_heads, num_pages * page_size, device=device,
                                   dtype=kv_fp8.SCALE_DTYPE) if self.fp8 else None
        self.v_scale = torch.zeros_like(self.k_scale) if self.fp8 else None
        self.num_pages = num_pages
        self.free: deque[int] = deque(range(num_pages))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' keys/values [n, kv_heads, D] at `slots` (quantized under fp8)."""
        if not self.fp8:
            self.k[layer].index_copy_(0, slots, k)
            self.v[layer].index_copy_(0, slots, v)
            return
        for x, cache, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, scale = kv_fp8.quantize(x)  # index_copy_ has no e4m3 kernel on CPU: copy the bytes
            cache[layer].view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))
            scales[layer].index_copy_(1, slots, scale.T)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values at `slots`, in the compute dtype."""
        if not self.fp8:
            return self.k[layer][slots], self.v[layer][slots]
        k = self.k[layer].view(torch.uint8)[slots].view(kv_fp8.FP8)
        v = self.v[layer].view(torch.uint8)[slots].view(kv_fp8.FP8)
        return (kv_fp8.dequantize(k, self.k_scale[layer][:, slots].T, self.dtype),
                kv_fp8.dequantize(v, self.v_scale[layer][:, slots].T, self.dtype))

    @property
    def steady_pages(self) -> int:
        """Most pages a session holds between steps: S + W tokens' worth, page-rounded."""
        return span_pages(self.S, self.W, self.P)

    def pages_spanned(self, window: int) -> int:
        """Most pages a table with `window` window tokens (before eviction) spans."""
        return span_pages(self.S, window, self.P)

    def pages_for(self, table: PageTable, n: int) -> int:
        """New pages an append of n tokens needs."""
        sinks = min(n, self.sinks_of(table) - table.sink_len)
        need = ceil_div(table.sink_len + sinks, self.P) - len(table.sink_pages)
        end = table.window_start + table.window_len + (n - sinks)
        return need + max(0, ceil_div(end, self.P) - len(table.window_pages))

    def append(self, table: PageTable, n: int) -> AppendPlan:
        if self.pages_for(table, n) > len(self.free):
            raise CapacityError("KV page pool exhausted (scheduler reservation violated)")
        old_window = table.window_len
        new_sinks = min(n, self.sinks_of(table) - table.sink_len)
        write = [self._push_sink(table) for _ in range(new_sinks)]
        write += [self._push_window(table) for _ in range(n - new_sinks)]
        return AppendPlan(write, new_sinks, old_window, self.P, list(table.sink_pages), table.sink_len,
                          list(table.window_pages), table.window_start, table.window_len)

    def evict(self, table: PageTable) -> None:
        """Drop window tokens beyond W from the front; free pages left empty."""
        extra = table.window_len - self.W
        if extra <= 0:
            return
        table.window_start += extra
        table.window_len -= extra
        while table.window_start >= self.P:
            self.free.append(table.window_pages.popleft())
            table.window_start -= self.P

    def sinks_of(self, table: PageTable) -> int:
        return self.S if table.sink_cap is None else table.sink_cap

    def release(self, table: PageTable) -> None:
        """Free the table's pages; shared pinned pages only when their last table lets go."""
        shared = table.pinned_hash is not None
        self.free.extend(self.pinned.release(table) if shared else table.sink_pages)
        self.free.extend(table.window_pages)
        table.sink_pages, table.window_pages = [], deque()
        table.sink_len = table.window_len = table.window_start = 0

    def _push_sink(self, table: PageTable) -> int:
        if table.sink_len == len(table.sink_pages) * self.P:
            table.sink_pages.append(self.free.popleft())
        table.sink_len += 1
        return slot_of(table.sink_pages, table.sink_len - 1, self.P)

    def _push_window(self, table: PageTable) -> int:
        index = table.window_start + table.window_len
        if index == len(table.window_pages) * self.P:
            table.window_pages.append(self.free.popleft())
        table.window_len += 1
        return slot_of(table.window_pages, index, self.P)
