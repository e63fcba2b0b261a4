"""A lean HTTP/1.1 client for the load generator: one kept-alive connection per concurrent client, the request
written as bytes, the reply read by Content-Length or chunks, nothing parsed past the status line and framing.

Why: the load generator shares the machine's two cores with the service, and httpx spends 3-4 ms of CPU per
request (measured by the harness's ``client`` column), more than the service's whole HTTP path; on a real
deployment the clients are elsewhere. ``--client httpx`` keeps the old client for an A/B.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


class RawResponse:
    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class RawPool:
    """``await pool.post(path, json=obj)`` -> RawResponse; connections are reused and opened on demand."""

    def __init__(self, base: str, timeout: float = 600):
        u = urlsplit(base)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> "RawPool":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for _, w in self._idle:
            w.close()
        self._idle.clear()

    async def post(self, path: str, json: object) -> RawResponse:  # noqa: A002 - httpx's keyword
        body = _dumps(json)
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        conn = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        try:
            resp, keep = await asyncio.wait_for(self._exchange(conn, head + body), self.timeout)
        except BaseException:
            conn[1].close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            conn[1].close()
        return resp

    @staticmethod
    async def _exchange(conn, data: bytes) -> tuple[RawResponse, bool]:
        reader, writer = conn
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            content = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from the service
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            content = b"".join(parts)
        else:  # read to close
            content = await reader.read()
            return RawResponse(status, content), False
        return RawResponse(status, content), headers.get("connection", "").lower() != "close"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
