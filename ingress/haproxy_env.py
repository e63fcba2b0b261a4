"""HAProxy settings that must differ between two Rays on one machine.

Ray Serve's HAProxy keeps its config, admin socket and server state under a fixed `/tmp/haproxy-serve/` and listens
for stats and metrics on fixed ports. A second Ray with HAProxy on the same machine (the CLI beside `serve run`, a test
run beside a benchmark) then reloads the *first* one's HAProxy through the shared socket. Worse, HAProxy reaches each
ingress replica on a port Serve hands out from a fixed range (30000 up, lowest first) and binds with SO_REUSEPORT, so
two Rays' first ingress replicas share port 30000 and the kernel spreads either HAProxy's requests over both (seen in
CI: the CLI's secret refused by the test session's ingress). `isolate()` gives this process's Ray its own directory,
its own block of replica ports and free side ports. It must run before Ray starts: Serve reads these at import and
the Ray we start inherits them.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile

log = logging.getLogger(__name__)

# Ray Serve 2.60's names (ray/serve/_private/constants.py) and, for the ports, its defaults.
FILE_VARS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
             "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
             "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}
BASE_VAR = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
# The fallback proxy (Serve's Python proxy that HAProxy falls back to while no ingress replica is up) binds its fixed
# port with SO_REUSEPORT too: two Rays' fallbacks would share it.
SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500}
# Replica ports: a block of BLOCK for HTTP in [20000, 30000) and the same block for gRPC 10000 lower, apart from
# Serve's defaults (30000-31000, 40000-41000) that a plain `serve run` on this machine uses.
RANGE_VARS = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
              "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT")
BLOCK, FIRST_HTTP, BLOCKS = 100, 20000, 100
ALL_VARS = (BASE_VAR, *FILE_VARS, *SIDE_PORTS, *RANGE_VARS)


def port_free(port: int) -> bool:
    """No process listens on ``port``. SO_REUSEADDR, as the servers that bind these ports set it: a port whose
    connections closed in the last minute (TIME_WAIT) is free for them, and so for this check."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def port_block(env, block: int) -> None:
    """Serve's replica ports for this Ray: HTTP block `block` of [20000, 30000), gRPC the same 10000 lower."""
    lo = FIRST_HTTP + (block % BLOCKS) * BLOCK
    env.update({RANGE_VARS[0]: str(lo), RANGE_VARS[1]: str(lo + BLOCK - 1),
                RANGE_VARS[2]: str(lo - 10000), RANGE_VARS[3]: str(lo - 10000 + BLOCK - 1)})


def block_of(env) -> int:
    return (int(env[RANGE_VARS[0]]) - FIRST_HTTP) // BLOCK


def _free_block() -> int:
    """A block none of whose first ports another process listens on, starting from one this pid picks (two
    Rays starting at once rarely start from the same block)."""
    start = os.getpid() % BLOCKS
    for i in range(BLOCKS):
        b = (start + i) % BLOCKS
        lo = FIRST_HTTP + b * BLOCK
        if all(port_free(p) for p in range(lo, lo + 8)) and all(port_free(p - 10000) for p in range(lo, lo + 8)):
            return b
    return start


def isolate(env: "os._Environ | dict | None" = None, *, force: bool = False) -> str:
    """Point HAProxy's files at a fresh private directory and Serve's replica ports at a free block (unless the caller
    chose them: `force` overrides), and move taken stats/metrics ports to free ones. Returns the directory."""
    env = os.environ if env is None else env
    if force or BASE_VAR not in env:
        base = tempfile.mkdtemp(prefix="haproxy-", dir="/tmp")  # short: a unix socket path has ~100 bytes
        env[BASE_VAR] = base
        for var, name in FILE_VARS.items():
            env[var] = os.path.join(base, name)
    if force or RANGE_VARS[0] not in env:
        port_block(env, _free_block())
    for var, default in SIDE_PORTS.items():
        port = int(env.get(var, default))
        if force or not port_free(port):
            free = free_port()
            if not force:
                log.info("port %d (%s) is taken on this machine: HAProxy uses %d", port, var, free)
            env[var] = str(free)
    return env[BASE_VAR]
