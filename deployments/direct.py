"""Direct lanes: calls between the request path's replicas over one socket per pair, below Serve's handles.

A Serve handle call costs about a millisecond of Python on each side (router, request context, gRPC, metrics) and,
on a loaded machine, a few milliseconds of latency per hop (benchmarks/README.md, "Where a batch's time goes").
Where a caller already knows which replica it wants, because Serve routed an earlier call there, a lane carries
the next calls straight to that replica: a length-prefixed pickle on a kept-open TCP connection, answered in the
replica's own event loop. Serve stays in charge of everything else: the first call (which routes, and loads a
multiplexed SAE), autoscaling (replicas count lane calls in their load), and every call a lane cannot carry. A
lane that fails (the replica went away, the connection broke) fails only the calls on it with :class:`DirectClosed`,
and the caller sends them again through Serve; calls on lanes must therefore be safe to repeat.

A lane listens on the replica's node address with a random token that only the replica's Serve replies carry:
a connection that does not open with it is closed before anything of it is unpickled.

Nothing here imports Ray or torch.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

log = logging.getLogger("saeserve.direct")

_HEADER = struct.Struct("!IQB")  # payload bytes, call id, kind
_CALL, _OK, _ERROR = 0, 1, 2
TOKEN_BYTES = 16
# Activations a caller sends on a lane at most, where no gRPC cap says otherwise: from a few MB on, Ray's object
# store (shared memory on one node) copies less than a socket (benchmarks.transport_bench)
DIRECT_MAX_BYTES = 2 << 20
# A frame larger than this is refused (the connection closes). Callers send larger payloads through Serve.
MAX_FRAME = 1 << 30


# How long a caller waits for a lane's connection to open (a replica on another node behind a firewall that drops
# packets would otherwise hold the calls for the system's TCP connect timeout, minutes), and how long an address
# that could not be reached is not tried again (its calls go through Serve meanwhile).
CONNECT_TIMEOUT_S = 2.0
TOKEN_WAIT_S = 10.0  # how long a lane waits for a new connection's token
UNREACHABLE_FOR_S = 60.0
_unreachable: dict[tuple[str, int], float] = {}


def reachable(address: "DirectAddress") -> bool:
    """False for an address whose connection failed to open in the last UNREACHABLE_FOR_S seconds."""
    since = _unreachable.get((address.host, address.port))
    if since is None:
        return True
    if time.monotonic() - since > UNREACHABLE_FOR_S:
        _unreachable.pop((address.host, address.port), None)
        return True
    return False


class DirectClosed(ConnectionError):
    """The lane broke before the call's answer came: the call may not have run, or may have; send it again."""


@dataclass(frozen=True)
class DirectAddress:
    host: str
    port: int
    token: bytes


def node_ip() -> str:
    """This node's address, where replicas on other nodes reach this one's lane (127.0.0.1 outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def replica_id() -> str:
    """This Serve replica's id, or "local" outside a replica (the classes run in process, as tests do)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - Serve raises RayServeException outside a replica
        return "local"


class DirectServer:
    """Serves ``handler(payload) -> answer`` on a socket; each call runs as a task of the loop that started it, so a
    slow call never holds up the next. An exception in the handler goes back to the caller and is raised there."""

    def __init__(self, handler: Callable[[Any], Awaitable[Any]]):
        self.handler = handler
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.address: DirectAddress | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._failed = False
        self.stats = {"connections": 0, "refused": 0, "calls": 0}

    async def start(self, host: str = "127.0.0.1") -> DirectAddress:
        if self.address is None:
            self._server = await asyncio.start_server(self._connection, host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = DirectAddress(host, port, self.token)
        return self.address

    async def listen(self) -> DirectAddress | None:
        """Start on this node's address on the first call (in the replica's event loop, where its calls must run);
        the address, or None for good if the socket could not open (calls keep coming through Serve)."""
        if self.address is None and not self._failed:
            try:
                await self.start(node_ip())
            except OSError:
                log.exception("cannot open a direct lane: calls keep coming through Serve")
                self._failed = True
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # a connection that does not say its token soon (a port scanner, a stuck peer) is not kept open
            token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), TOKEN_WAIT_S)
            if not hmac.compare_digest(token, self.token):
                self.stats["refused"] += 1
                return
            self.stats["connections"] += 1
            while True:
                n, call_id, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if kind != _CALL or n > MAX_FRAME:
                    return
                body = await reader.readexactly(n)
                t = asyncio.get_running_loop().create_task(self._call(writer, call_id, body))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _call(self, writer: asyncio.StreamWriter, call_id: int, body: bytes) -> None:
        self.stats["calls"] += 1
        try:
            answer, kind = await self.handler(pickle.loads(body)), _OK
        except Exception as e:  # noqa: BLE001 - the caller's to raise
            answer, kind = e, _ERROR
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an answer or error that does not pickle: say so rather than leave the call hanging
            log.exception("lane answer does not pickle")
            data, kind = pickle.dumps(RuntimeError(f"lane answer does not pickle: {e!r}")), _ERROR
        if writer.is_closing():
            return
        writer.write(_HEADER.pack(len(data), call_id, kind) + data)  # one write: frames never interleave


class DirectClient:
    """Calls on one replica's lane: one connection, opened on the first call, many calls in flight on it."""

    def __init__(self, address: DirectAddress):
        self.address = address
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._opening: asyncio.Task | None = None
        self.closed = False
        self._retiring = False

    async def _open(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.address.host, self.address.port),
                                                    CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            _unreachable[(self.address.host, self.address.port)] = time.monotonic()
            log.warning("cannot open a direct lane to %s:%d within %.0f s: its calls go through Serve",
                        self.address.host, self.address.port, CONNECT_TIMEOUT_S)
            raise
        writer.write(self.address.token)
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def call(self, payload: Any) -> Any:
        if self.closed:
            raise DirectClosed("lane closed")
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_FRAME:
            raise DirectClosed("payload too large for a lane")
        if self._writer is None:
            if self._opening is None:
                self._opening = asyncio.get_running_loop().create_task(self._open())
            try:
                await asyncio.shield(self._opening)
            except (OSError, asyncio.TimeoutError) as e:
                self._fail(e)
                raise DirectClosed(f"cannot open lane to {self.address.host}:{self.address.port}: {e}") from e
        if self.closed:
            raise DirectClosed("lane closed")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            self._writer.write(_HEADER.pack(len(data), call_id, _CALL) + data)
            return await fut
        finally:
            self._pending.pop(call_id, None)
            if self._retiring and not self._pending:
                self.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                n, call_id, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                body = await reader.readexactly(n)
                fut = self._pending.pop(call_id, None)
                if fut is None or fut.done():
                    continue
                answer = pickle.loads(body)
                if kind == _OK:
                    fut.set_result(answer)
                else:
                    fut.set_exception(answer if isinstance(answer, BaseException) else RuntimeError(str(answer)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self._fail(e)
        except Exception as e:  # noqa: BLE001 - a frame that does not unpickle: this lane is done
            log.exception("lane reply unreadable")
            self._fail(e)

    def _fail(self, why: BaseException) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DirectClosed(f"lane to {self.address.host}:{self.address.port} closed: {why!r}"))
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()

    def close(self) -> None:
        self._fail(DirectClosed("closed by the caller"))
        if self._reader_task is not None:
            self._reader_task.cancel()

    def retire(self) -> None:
        """Close once the calls in flight have their answers (none new should come)."""
        self._retiring = True
        if not self._pending:
            self.close()


class DirectPool:
    """Direct clients to the replicas of one deployment, for calls that any replica may answer. Replicas are learnt
    through Serve: ``discover()`` is a handle call (Serve routes it, so a replica that Serve no longer routes to is
    no longer found) answering ``(replica id, DirectAddress or None)``; it runs in the background at most every
    ``every_s`` seconds while calls come. A call goes to the known replica with the fewest calls in flight, or, while
    none is known (or its lane broke), through Serve (``fallback``). A replica not found again for ``forget_s``
    seconds is forgotten: one that Serve is draining gets no new calls once that time has passed."""

    def __init__(self, discover: Callable[[], Awaitable[tuple[str, DirectAddress | None]]], every_s: float = 1.0,
                 forget_s: float = 30.0, clock: Callable[[], float] | None = None):
        self.discover = discover
        self.every_s, self.forget_s = every_s, forget_s
        self.clock = clock or time.monotonic
        self.clients: dict[str, DirectClient] = {}
        self.seen: dict[str, float] = {}
        self.in_flight: dict[str, int] = {}
        self._last_discovery: float | None = None
        self._discovering: asyncio.Task | None = None
        self.stats = {"direct": 0, "fallback": 0, "dropped": 0, "discoveries": 0}

    async def call(self, payload: Any, fallback: Callable[[], Awaitable[Any]]) -> Any:
        self._maybe_discover()
        replica = self._pick()
        if replica is None:
            self.stats["fallback"] += 1
            return await fallback()
        client = self.clients[replica]
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1
        try:
            self.stats["direct"] += 1
            return await client.call(payload)
        except DirectClosed:  # the replica went away or the connection broke: Serve routes it again
            self.stats["dropped"] += 1
            self._forget(replica)
            return await fallback()
        finally:
            if replica in self.in_flight:
                self.in_flight[replica] -= 1

    def _pick(self) -> str | None:
        now = self.clock()
        for replica in [r for r, t in self.seen.items() if now - t > self.forget_s or self.clients[r].closed]:
            self._forget(replica, retire=True)
        if not self.clients:
            return None
        return min(self.clients, key=lambda r: self.in_flight.get(r, 0))

    def _forget(self, replica: str, retire: bool = False) -> None:
        client = self.clients.pop(replica, None)
        self.seen.pop(replica, None)
        self.in_flight.pop(replica, None)
        if client is not None:
            client.retire() if retire else client.close()

    def _maybe_discover(self) -> None:
        now = self.clock()
        if self._discovering is not None or (self._last_discovery is not None and now - self._last_discovery < self.every_s):
            return
        self._last_discovery = now
        self._discovering = asyncio.get_running_loop().create_task(self._discover())

    async def _discover(self) -> None:
        try:
            replica, address = await self.discover()
            self.stats["discoveries"] += 1
            if address is None or not reachable(address):
                return
            known = self.clients.get(replica)
            if known is None or known.closed or known.address != address:
                if known is not None:
                    known.close()
                self.clients[replica] = DirectClient(address)
            self.seen[replica] = self.clock()
        except Exception as e:  # noqa: BLE001 - calls keep going through Serve; the next discovery tries again
            log.debug("direct discovery failed: %r", e)
        finally:
            self._discovering = None
