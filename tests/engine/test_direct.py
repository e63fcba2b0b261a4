"""deployments.direct: the lanes between replicas, over real sockets in one event loop (no Ray)."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct

import numpy as np
import pytest

from deployments.direct import (DirectAddress, DirectClient, DirectClosed, DirectPool, DirectServer, TOKEN_BYTES,
                                node_ip, replica_id)

UNPICKLED: list[str] = []


class Tripwire:
    """Records that it was unpickled: a refused connection must not get that far."""

    def __reduce__(self):
        return (UNPICKLED.append, ("tripwire",))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _echo_server(handler=None):
    async def default(payload):
        kind, value = payload
        if kind == "sleep":
            await asyncio.sleep(value)
            return value
        if kind == "fail":
            raise ValueError(f"bad value {value}")
        if kind == "unpicklable":
            return lambda: None  # a lambda does not pickle
        return value

    server = DirectServer(handler or default)
    return server, await server.start("127.0.0.1")


def test_round_trip_many_in_flight_and_out_of_order():
    async def main():
        server, address = await _echo_server()
        client = DirectClient(address)
        arrays = [np.arange(n, dtype=np.float32).reshape(-1, 1) for n in range(1, 40)]
        # later calls sleep less: answers come back out of order and each still reaches its own caller
        got = await asyncio.gather(*(client.call(("sleep", 0.002 * (40 - i))) for i in range(40)),
                                   *(client.call(("echo", a)) for a in arrays))
        assert got[:40] == [0.002 * (40 - i) for i in range(40)]
        for a, b in zip(arrays, got[40:]):
            np.testing.assert_array_equal(a, b)
        assert server.stats["connections"] == 1 and server.stats["calls"] == 79
        client.close()
        server.close()

    run(main())


def test_handler_errors_reach_the_caller_and_the_lane_stays_open():
    async def main():
        server, address = await _echo_server()
        client = DirectClient(address)
        with pytest.raises(ValueError, match="bad value 7"):
            await client.call(("fail", 7))
        with pytest.raises(RuntimeError, match="does not pickle"):
            await client.call(("unpicklable", None))
        assert await client.call(("echo", "still here")) == "still here"
        assert not client.closed
        client.close()
        server.close()

    run(main())


def test_wrong_token_is_refused_before_anything_is_unpickled():
    async def main():
        UNPICKLED.clear()
        server, address = await _echo_server()
        forged = DirectClient(DirectAddress(address.host, address.port, b"\0" * TOKEN_BYTES))
        with pytest.raises(DirectClosed):
            await forged.call(("echo", Tripwire()))
        assert forged.closed
        # a raw socket that sends a frame without any token at all
        reader, writer = await asyncio.open_connection(address.host, address.port)
        body = pickle.dumps(("echo", Tripwire()))
        writer.write(struct.pack("!IQB", len(body), 1, 0).rjust(TOKEN_BYTES, b"x") + body)
        assert await reader.read() == b""  # closed on us
        writer.close()
        assert UNPICKLED == [] and server.stats["refused"] == 2 and server.stats["calls"] == 0
        # the right token still works
        assert await DirectClient(address).call(("echo", 5)) == 5
        server.close()

    run(main())


def test_a_connection_that_never_says_its_token_is_closed(monkeypatch):
    from deployments import direct

    monkeypatch.setattr(direct, "TOKEN_WAIT_S", 0.2)

    async def main():
        server, address = await _echo_server()
        reader, writer = await asyncio.open_connection(address.host, address.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us, having said nothing
        writer.close()
        assert server.stats["connections"] == 0 and server.stats["calls"] == 0
        server.close()

    run(main())


def test_a_lane_that_breaks_fails_only_its_own_calls_with_direct_closed():
    async def main():
        server, address = await _echo_server()
        client = DirectClient(address)
        assert await client.call(("echo", 1)) == 1
        pending = asyncio.ensure_future(client.call(("sleep", 5)))
        await asyncio.sleep(0.05)
        for t in list(server._tasks):  # the replica goes away mid-call: its connections drop
            t.cancel()
        server.close()
        client._writer.transport.abort()
        with pytest.raises(DirectClosed):
            await pending
        assert client.closed
        with pytest.raises(DirectClosed):
            await client.call(("echo", 2))

    run(main())


def test_a_lane_to_nowhere_is_direct_closed_and_not_tried_again_for_a_while(monkeypatch):
    from deployments import direct

    async def main():
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nowhere = DirectAddress("127.0.0.1", port, b"t" * TOKEN_BYTES)
        with pytest.raises(DirectClosed, match="cannot open"):
            await DirectClient(nowhere).call(("echo", 1))
        assert not direct.reachable(nowhere)

        async def discover():
            return "r1", nowhere

        async def fallback():
            return "serve"

        clock = FakeClock()
        pool = DirectPool(discover, every_s=1.0, clock=clock)
        for k in range(3):  # Serve keeps finding it; the pool does not take it up while it is unreachable
            clock.t = 2.0 * k
            assert await pool.call(1, fallback) == "serve"
            await asyncio.sleep(0.01)
        assert pool.clients == {} and pool.stats["discoveries"] == 3
        monkeypatch.setattr(direct, "UNREACHABLE_FOR_S", 0.0)
        assert direct.reachable(nowhere)

    run(main())


def test_a_connection_that_does_not_open_in_time_is_given_up(monkeypatch):
    """A replica behind a firewall that drops packets: the lane gives up after CONNECT_TIMEOUT_S, not the
    system's TCP timeout (here a connect that never completes)."""
    from deployments import direct

    async def never(*args, **kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(direct, "CONNECT_TIMEOUT_S", 0.1)
    monkeypatch.setattr(direct.asyncio, "open_connection", never)
    address = DirectAddress("192.0.2.1", 9, b"t" * TOKEN_BYTES)

    async def main():
        with pytest.raises(DirectClosed, match="cannot open"):
            await DirectClient(address).call(("echo", 1))

    run(main())
    assert not direct.reachable(address)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_pool_goes_through_serve_until_it_knows_a_replica_then_direct():
    async def main():
        server, address = await _echo_server()
        clock = FakeClock()
        found = []

        async def discover():
            found.append(clock.t)
            return "r1", address

        async def fallback():
            return "through serve"

        pool = DirectPool(discover, every_s=1.0, forget_s=10.0, clock=clock)
        assert await pool.call(("echo", "direct"), fallback) == "through serve"  # discovery runs meanwhile
        await asyncio.sleep(0.05)
        assert await pool.call(("echo", "direct"), fallback) == "direct"
        assert pool.stats == {"direct": 1, "fallback": 1, "dropped": 0, "discoveries": 1}
        assert found == [0.0]  # not again within every_s
        clock.t = 1.5
        await pool.call(("echo", "x"), fallback)
        await asyncio.sleep(0.05)
        assert found == [0.0, 1.5]
        server.close()

    run(main())


def test_pool_balances_by_calls_in_flight_and_forgets_replicas_serve_no_longer_finds():
    async def main():
        s1, a1 = await _echo_server(lambda p: asyncio.sleep(p, result="r1"))
        s2, a2 = await _echo_server(lambda p: asyncio.sleep(p, result="r2"))
        clock = FakeClock()
        answers = iter([("r1", a1), ("r2", a2)])

        async def discover():
            return next(answers, ("r2", a2))

        async def fallback():
            return "serve"

        pool = DirectPool(discover, every_s=1.0, forget_s=10.0, clock=clock)
        await pool.call(0, fallback)
        await asyncio.sleep(0.05)
        clock.t = 2.0
        await pool.call(0, fallback)
        await asyncio.sleep(0.05)
        assert set(pool.clients) == {"r1", "r2"}
        # two slow calls at once: one on each replica
        got = await asyncio.gather(pool.call(0.2, fallback), pool.call(0.2, fallback))
        assert sorted(got) == ["r1", "r2"]
        # r1 is not found again (Serve drains it): after forget_s it gets no new calls, and its lane closes once idle
        slow = asyncio.ensure_future(pool.call(0.3, fallback))  # lands on either
        await asyncio.sleep(0.05)
        clock.t = 11.5  # r1 last seen at 0.0, r2 at 2.0
        replicas = [await pool.call(0, fallback) for _ in range(3)]
        assert replicas == ["r2"] * 3 and set(pool.clients) == {"r2"}
        assert await slow in ("r1", "r2")  # a call already on a forgotten lane still gets its answer
        s1.close()
        s2.close()

    run(main())


def test_pool_falls_back_to_serve_when_a_lane_breaks_and_drops_it():
    async def main():
        server, address = await _echo_server()

        async def discover():
            return "r1", address

        calls = []

        async def fallback():
            calls.append("serve")
            return "serve"

        pool = DirectPool(discover, every_s=100.0, clock=FakeClock())
        await pool.call(("echo", 1), fallback)
        await asyncio.sleep(0.05)
        pending = asyncio.ensure_future(pool.call(("sleep", 5), fallback))
        await asyncio.sleep(0.05)
        pool.clients["r1"]._writer.transport.abort()  # the connection breaks mid-call
        assert await pending == "serve"
        assert pool.stats["dropped"] == 1 and "r1" not in pool.clients
        assert await pool.call(("echo", 1), fallback) == "serve"  # until Serve finds it again
        server.close()

    run(main())


def test_discovery_failure_or_no_address_keeps_calls_on_serve():
    async def main():
        async def broken():
            raise RuntimeError("replica unavailable")

        async def off():
            return "r1", None  # the replica's direct calls are off

        async def fallback():
            return "serve"

        for discover in (broken, off):
            clock = FakeClock()
            pool = DirectPool(discover, every_s=1.0, clock=clock)
            for k in range(3):
                clock.t = 2.0 * k
                assert await pool.call(1, fallback) == "serve"
                await asyncio.sleep(0.01)
            assert pool.clients == {} and pool.stats["fallback"] == 3

    run(main())


def test_a_lane_listens_where_other_nodes_reach_it():
    """node_ip(): the Ray node's address in a Ray process (this test process may be a Ray driver), else loopback;
    a lane listens and answers there. replica_id() outside a replica: "local"."""
    import ray

    ip = node_ip()
    assert ip == (ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1")
    assert replica_id() == "local"

    async def main():
        server = DirectServer(lambda p: asyncio.sleep(0, result=p * 2))
        address = await server.start(ip)
        assert address.host == ip and await DirectClient(address).call(21) == 42
        server.close()

    run(main())


def test_listen_starts_once_and_a_socket_that_cannot_open_stays_off(monkeypatch):
    async def main():
        server = DirectServer(lambda p: asyncio.sleep(0, result=p))
        first = await server.listen()
        assert first is not None and await server.listen() is first
        server.close()

        broken = DirectServer(lambda p: asyncio.sleep(0, result=p))
        tries = []

        async def refuse(host="127.0.0.1"):
            tries.append(host)
            raise OSError("address in use")

        monkeypatch.setattr(broken, "start", refuse)
        assert await broken.listen() is None and await broken.listen() is None
        assert len(tries) == 1  # not tried again on every call

    run(main())
