"""Which SAEs stay resident: use counts and LRU eviction under a budget, with no Ray in it.

SAEShard keeps its SAEs in Serve's multiplexing cache (an ``OrderedDict`` id -> entry, least recently used
first, an entry moved to the end on every hit). This module holds the rules it adds on top: an SAE in use is
never evicted, the least recently used idle one goes first, and eviction goes on until the incoming SAE fits
(waiting while every resident SAE is in use).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import contextmanager


class Resident:
    """A resident entry with a count of operations using it; ``idle`` is set exactly when that count is 0."""

    def __init__(self):
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextmanager
    def held(self):
        """Counts one user for the block. Entering must not await between the cache lookup and this call."""
        self.users += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.users -= 1
            if self.users == 0:
                self.idle.set()


async def evict_until(models: "OrderedDict[str, Resident]", over_budget: Callable[[], bool],
                      unload_lru: Callable[[], Awaitable[None]],
                      on_evicted: Callable[[str, Resident], None] = lambda _id, _r: None) -> None:
    """Unloads the least recently used idle entry while ``over_budget()``; waits while every entry is in use.

    ``unload_lru`` must remove the first entry of ``models`` before its first await (Serve's does). Waking
    from ``idle`` proves nothing by itself: before this task runs again that entry may be in use again, so
    every pass looks afresh, and the choice and the unload happen with no await between them.
    """
    while models and over_budget():
        victim_id = next((i for i, r in models.items() if r.users == 0), None)
        if victim_id is None:
            await _any_idle(list(models.values()))
            continue
        victim = models[victim_id]
        models.move_to_end(victim_id, last=False)  # an older entry may be busy: this idle one goes first
        await unload_lru()
        on_evicted(victim_id, victim)


async def _any_idle(entries: list[Resident]) -> None:
    waits = [asyncio.ensure_future(r.idle.wait()) for r in entries]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
