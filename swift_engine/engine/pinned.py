"""Pinned pages: one copy per replica of each pinned region, shared by every session that pins the same ids.

A session's pinned region (BOS + its system prompt, or a completion's first `pinned_tokens`) takes the
place of the sinks: cache positions 0..P-1, never evicted, keys stored before RoPE. So equal ids give
equal pages whichever session computed them, and one copy serves all. The registry maps a content hash
(model + ids) to those pages and counts the tables using them; the pages go back to the pool when the
last table lets go (SinkWindowCache.release: session drop, eviction, restore, a failed step).

Pinned pages are never written after their prefill: window tokens always start a page of their own,
so a region that ends mid-page is shared whole, its last page included (nothing is copied).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import PageTable


def pinned_hash(model: str, ids: list[int]) -> str:
    """Content address of a pinned region; stable across processes (routers compare it)."""
    return hashlib.sha256(json.dumps([model, list(ids)]).encode()).hexdigest()[:32]


@dataclass
class PinnedRegion:
    pages: list[int]
    tokens: int
    tables: int  # page tables pointing at these pages


class PinnedPages:
    def __init__(self):
        self.regions: dict[str, PinnedRegion] = {}

    def attach(self, table: PageTable, key: str) -> bool:
        """Point an empty table at the resident region `key`; False if none is resident."""
        region = self.regions.get(key)
        if region is None or table.pages:
            return False
        region.tables += 1
        table.sink_pages, table.sink_len, table.pinned_hash = list(region.pages), region.tokens, key
        return True

    def publish(self, table: PageTable, key: str) -> list[int]:
        """A table has just prefilled its pinned region: register its pages, or, when another table
        registered the same region meanwhile, share those instead. Returns the pages now unused."""
        region = self.regions.get(key)
        table.pinned_hash = key
        if region is None:
            self.regions[key] = PinnedRegion(list(table.sink_pages), table.sink_len, 1)
            return []
        region.tables += 1
        own, table.sink_pages = table.sink_pages, list(region.pages)
        return own

    def release(self, table: PageTable) -> list[int]:
        """The table lets go of its shared pages; returns them if it was the last one."""
        key, table.pinned_hash = table.pinned_hash, None
        region = self.regions[key]
        region.tables -= 1
        if region.tables:
            return []
        del self.regions[key]
        return region.pages

    def pages_saved(self) -> int:
        """Pages the pool would hold on top if every table kept its own copy."""
        return sum(len(r.pages) * (r.tables - 1) for r in self.regions.values())
