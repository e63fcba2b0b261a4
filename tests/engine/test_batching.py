"""Batcher: batches form when the worker is free, so they grow with load; keys never mix; errors and
cancellations reach only the callers they belong to."""

from __future__ import annotations

import asyncio

import pytest

from deployments.engine.batching import Batcher


def test_batches_grow_while_the_worker_is_busy():
    """Items that arrive during a slow batch all go into the next one (Serve's eager batching took ~1.6)."""
    async def main():
        sizes = []

        async def run(_key, items):
            sizes.append(len(items))
            await asyncio.sleep(0.05)  # a slow forward pass
            return [x * 2 for x in items]

        b = Batcher(run, max_batch_size=16, wait_s=0.001)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.01)  # the first batch (one item) is running
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 11)]
        for _ in range(10):
            await asyncio.sleep(0.002)
        out = await asyncio.gather(first, *rest)
        return sizes, out

    sizes, out = asyncio.run(main())
    assert out == [i * 2 for i in range(11)]
    assert sizes == [1, 10]


def test_max_batch_size_and_keys():
    async def main():
        seen = []

        async def run(key, items):
            seen.append((key, list(items)))
            return [(key, x) for x in items]

        b = Batcher(run, max_batch_size=3, wait_s=0.01)
        jobs = [b.submit(i, key="a" if i % 2 == 0 else "b") for i in range(8)]
        return seen, await asyncio.gather(*jobs)

    seen, out = asyncio.run(main())
    assert out == [("a" if i % 2 == 0 else "b", i) for i in range(8)]
    assert all(len(items) <= 3 for _, items in seen)
    assert all({x % 2 for x in items} == ({0} if key == "a" else {1}) for key, items in seen)
    assert seen[0] == ("a", [0, 2, 4])  # the oldest item's key goes first, in arrival order


def test_a_lone_item_waits_at_most_wait_s():
    async def main():
        async def run(_key, items):
            return items

        b = Batcher(run, max_batch_size=16, wait_s=0.02)
        loop = asyncio.get_running_loop()
        t = loop.time()
        assert await b.submit("x") == "x"
        return loop.time() - t

    assert asyncio.run(main()) < 0.5


def test_errors_reach_their_batch_and_the_worker_goes_on():
    async def main():
        async def run(_key, items):
            if "bad" in items:
                raise ValueError("bad batch")
            return [x.upper() for x in items]

        b = Batcher(run, max_batch_size=1, wait_s=0)
        bad = asyncio.ensure_future(b.submit("bad"))
        good = asyncio.ensure_future(b.submit("good"))
        with pytest.raises(ValueError, match="bad batch"):
            await bad
        return await good

    assert asyncio.run(main()) == "GOOD"


def test_a_cancelled_caller_is_dropped_before_its_batch_runs():
    async def main():
        ran = []

        async def run(_key, items):
            ran.extend(items)
            await asyncio.sleep(0.02)
            return items

        b = Batcher(run, max_batch_size=4, wait_s=0)
        first = asyncio.ensure_future(b.submit("first"))
        await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(b.submit("gone"))
        kept = asyncio.ensure_future(b.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await first == "first" and await kept == "kept"
        return ran

    assert asyncio.run(main()) == ["first", "kept"]


def test_wrong_result_count_is_an_error_not_a_hang():
    async def main():
        async def run(_key, items):
            return items[:-1]

        b = Batcher(run, max_batch_size=2, wait_s=0.01)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in out)


def test_a_bad_item_fails_alone_and_its_batch_mates_get_their_own_answers():
    """A batch that raises is run again item by item: only the item that fails alone hears of it (a hostile capture or
    encode item never fails the requests batched with it)."""
    calls = []

    async def main():
        async def run(_key, items):
            calls.append(list(items))
            if "bad" in items:
                raise ValueError("bad item")
            return [x.upper() for x in items]

        b = Batcher(run, max_batch_size=8, wait_s=0.05)
        futs = [asyncio.ensure_future(b.submit(x)) for x in ("a", "bad", "c", "d")]
        return await asyncio.gather(*futs, return_exceptions=True)

    got = asyncio.run(main())
    assert got[0] == "A" and got[2:] == ["C", "D"]
    assert isinstance(got[1], ValueError) and "bad item" in str(got[1])
    assert ["a", "bad", "c", "d"] in calls  # they did share a batch first
    assert ["bad"] in calls and ["a"] in calls  # then each ran alone
