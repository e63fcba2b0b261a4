"""HTTP spoken over a bare socket, for the tests that send what no HTTP client will (unfinished headers)."""

from __future__ import annotations

import socket
import time


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes), and when it closed
    (seconds after the call; ``inf`` if it never did)."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    data = b""
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk
    return data, float("inf")


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
