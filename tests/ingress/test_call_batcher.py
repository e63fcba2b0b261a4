"""CallBatcher: concurrent requests share handle calls, a lone one goes at once, and each gets its own results."""

from __future__ import annotations

import asyncio

import pytest

from ingress.backend import CallBatcher


def test_lone_request_goes_at_once_and_queued_ones_share_a_call():
    async def main():
        calls: list[list] = []
        release = asyncio.Event()

        async def send(items):
            calls.append(list(items))
            if len(calls) <= 2:
                await release.wait()  # the first two calls stay out while more requests arrive
            return [x * 10 for x in items]

        b = CallBatcher(send, max_in_flight=2)
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.01)
        assert calls == [[1]]  # sent at once, alone
        second = asyncio.ensure_future(b.submit([2, 3]))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.submit([i])) for i in (4, 5, 6)]
        await asyncio.sleep(0.01)
        assert calls == [[1], [2, 3]]  # two in flight; the rest wait
        release.set()
        out = await asyncio.gather(first, second, *rest)
        return calls, out

    calls, out = asyncio.run(main())
    assert out == [[10], [20, 30], [40], [50], [60]]
    assert calls[2] == [4, 5, 6]  # the three that queued went out together


def test_a_failed_call_fails_its_own_requests_and_the_batcher_goes_on():
    async def main():
        async def send(items):
            if 99 in items:
                raise RuntimeError("replica died")
            return items

        b = CallBatcher(send, max_in_flight=1)
        bad = asyncio.ensure_future(b.submit([99]))
        good = asyncio.ensure_future(b.submit([1, 2]))
        res = await asyncio.gather(bad, good, return_exceptions=True)
        return res, await b.submit([3])

    (bad, good), later = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good == [1, 2] and later == [3]


def test_a_caller_that_went_away_is_left_out():
    async def main():
        sent: list[list] = []
        gate = asyncio.Event()

        async def send(items):
            sent.append(list(items))
            await gate.wait()
            return items

        b = CallBatcher(send, max_in_flight=1)
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.submit([2]))
        kept = asyncio.ensure_future(b.submit([3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        await first
        assert await kept == [3]
        with pytest.raises(asyncio.CancelledError):
            await gone
        return sent

    assert asyncio.run(main()) == [[1], [3]]


def test_the_next_call_goes_out_before_the_finished_calls_callers_resume():
    """When a call returns, the requests that queued meanwhile are sent before that call's callers wake up to
    build their replies (benchmarks/README.md: the dispatch order is worth ~8% of demo throughput at 16 clients)."""
    async def main():
        events: list[str] = []
        release = asyncio.Event()

        async def send(items):
            events.append(f"send {items}")
            if items == [1]:
                await release.wait()
            return items

        b = CallBatcher(send, max_in_flight=1)

        async def caller(x):
            r = await b.submit([x])
            events.append(f"resumed {x}")
            return r

        first = asyncio.ensure_future(caller(1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(caller(2))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, second)
        return events

    events = asyncio.run(main())
    assert events.index("send [2]") < events.index("resumed 1"), events
