"""The eviction rules of the SAE cache, driven through exact interleavings with asyncio (no Ray).

The race these pin down hung a CI run: the evictor woke because the LRU SAE went idle, but before it ran
again that SAE was in use again and back at the head of the LRU order; evicting it then left its queued
encode to reload it while the evictor held the cache lock.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from deployments.engine.residency import Resident, evict_until


class Cache:
    """A stand-in for Serve's multiplexing cache with the same contract: LRU first, hits move to the end."""

    def __init__(self, ids, limit):
        self.models: OrderedDict[str, Resident] = OrderedDict((i, Resident()) for i in ids)
        self.limit = limit
        self.evicted: list[str] = []

    def hit(self, i):
        self.models.move_to_end(i)
        return self.models[i].held()

    async def unload_lru(self):
        self.models.popitem(last=False)  # before the first await, as Serve does
        await asyncio.sleep(0)

    def evict(self):
        return asyncio.ensure_future(evict_until(self.models, lambda: len(self.models) >= self.limit,
                                                 self.unload_lru, lambda i, _r: self.evicted.append(i)))


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_sae_used_again_before_the_evictor_wakes_is_not_evicted():
    async def main():
        c = Cache(["X", "Y"], limit=2)
        x1, y1 = c.hit("X"), c.hit("Y")
        x1.__enter__(), y1.__enter__()
        task = c.evict()
        await settle()
        assert not task.done() and c.evicted == []  # both in use: it waits

        x1.__exit__(None, None, None)  # X goes idle: the evictor is woken ...
        x2 = c.hit("X"); x2.__enter__()  # ... but X is in use again before it runs,
        y1.__exit__(None, None, None); y2 = c.hit("Y"); y2.__enter__()  # and back at the LRU head
        assert list(c.models) == ["X", "Y"] and c.models["X"].users == 1
        await settle()
        assert not task.done() and c.evicted == [] and list(c.models) == ["X", "Y"]

        y2.__exit__(None, None, None)  # Y idle, X still busy: Y goes although X is older
        await settle()
        assert task.done() and c.evicted == ["Y"] and list(c.models) == ["X"]
        x2.__exit__(None, None, None)

    asyncio.run(main())


def test_idle_entries_go_in_lru_order_until_under_budget():
    async def main():
        c = Cache(["A", "B", "C", "D"], limit=2)
        c.hit("A")  # A becomes most recently used: B, C, D, A
        b = c.hit("C"); b.__enter__()  # C busy: B, D, A, C
        await c.evict()
        assert c.evicted == ["B", "D", "A"] and list(c.models) == ["C"]
        b.__exit__(None, None, None)

    asyncio.run(main())


def test_held_counts_users_and_sets_idle_at_zero():
    async def main():
        r = Resident()
        with r.held():
            with r.held():
                assert r.users == 2 and not r.idle.is_set()
            assert r.users == 1 and not r.idle.is_set()
        assert r.users == 0 and r.idle.is_set()
        try:
            with r.held():
                raise ValueError
        except ValueError:
            pass
        assert r.users == 0 and r.idle.is_set()

    asyncio.run(main())
