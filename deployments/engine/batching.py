"""Batcher: dynamic batching that forms a batch when the worker is free, not when the last one was formed.

Ray's ``@serve.batch`` forms the next batch as soon as the previous one has been handed off, and batches then
queue behind its concurrency limit. With a slow step (a 200 ms CPU forward pass) each batch holds only what
arrived within ``batch_wait_timeout_s``: measured at 32 concurrent clients, 1.6 prompts per forward pass. Here
one worker runs one batch at a time and takes, when it is free, everything that queued meanwhile (up to
``max_batch_size``), so batches grow with load. A lone request waits at most ``wait_s`` for company.

Items carry a key (an SAE id, say); a batch holds one key's items, the key of the oldest waiting item first.
A batch that fails is run again item by item, so that only the items that fail alone get an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

I = TypeVar("I")
O = TypeVar("O")


class _Pending:
    __slots__ = ("key", "item", "future", "since")

    def __init__(self, key, item, future, since):
        self.key, self.item, self.future, self.since = key, item, future, since


class Batcher(Generic[I, O]):
    """``await submit(item, key)`` -> that item's result from ``run_batch(key, items)`` (one result per item)."""

    def __init__(self, run_batch: Callable[[Hashable, list[I]], Awaitable[list[O]]], max_batch_size: int = 16,
                 wait_s: float = 0.0, on_batch: Callable[[list[float]], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.on_batch = on_batch  # gets each batch's queue waits (seconds), for metrics
        self._pending: list[_Pending] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: I, key: Hashable = None) -> O:
        loop = asyncio.get_running_loop()
        p = _Pending(key, item, loop.create_future(), time.monotonic())
        self._pending.append(p)
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await p.future  # a cancelled caller's item is dropped before its batch runs

    def _live(self) -> list[_Pending]:
        """The waiting items, oldest first; a cancelled caller's item drops out here."""
        self._pending = [p for p in self._pending if not p.future.done()]
        return self._pending

    async def _work(self) -> None:
        while True:
            live = self._live()
            if not live:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Wait for company only while the oldest item is younger than wait_s: under load it has long waited.
            key, oldest = live[0].key, live[0].since
            while sum(p.key == key for p in self._live()) < self.max_batch_size:
                left = oldest + self.wait_s - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            live = self._live()
            if not live:
                continue
            key = live[0].key
            batch = [p for p in live if p.key == key][: self.max_batch_size]
            taken = {id(p) for p in batch}
            self._pending = [p for p in live if id(p) not in taken]
            now = time.monotonic()
            if self.on_batch is not None:
                self.on_batch([now - p.since for p in batch])
            try:
                results = await self._run_checked(key, [p.item for p in batch])
            except asyncio.CancelledError:
                self._shutting_down(batch)
                raise
            except Exception as e:
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(e)
                    continue
                # One bad item must not fail its batch-mates: run each alone, so only the one that fails hears of it
                # (and a batch too big for memory still answers item by item).
                for p in batch:
                    if p.future.done():
                        continue
                    try:
                        (r,) = await self._run_checked(key, [p.item])
                    except asyncio.CancelledError:
                        self._shutting_down(batch)
                        raise
                    except Exception as e1:
                        if not p.future.done():
                            p.future.set_exception(e1)
                    else:
                        if not p.future.done():
                            p.future.set_result(r)
            else:
                for p, r in zip(batch, results):
                    if not p.future.done():
                        p.future.set_result(r)

    async def _run_checked(self, key, items: list) -> list:
        results = await self.run_batch(key, items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    @staticmethod
    def _shutting_down(batch: list[_Pending]) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))
