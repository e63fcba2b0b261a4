"""HAProxy settings that must differ between two Rays on one machine.

Ray Serve's HAProxy keeps its config, admin socket and server state under a fixed `/tmp/haproxy-serve/` and listens
for stats and metrics on fixed ports. A second Ray with HAProxy on the same machine (the CLI beside `serve run`, a test
run beside a benchmark) then reloads the *first* one's HAProxy through the shared socket. Worse, HAProxy reaches each
ingress replica on a port Serve hands out from a fixed range (30000 up, lowest first) and binds with SO_REUSEPORT, so
two Rays' first ingress replicas share port 30000 and the kernel spreads either HAProxy's requests over both (seen in
CI: the CLI's secret refused by the test session's ingress). `isolate()` gives this process's Ray its own directory,
its own block of replica ports and free side ports. It must run before Ray starts: Serve reads these at import and
the Ray we start inherits them.

Every port chosen here lies below the kernel's ephemeral range (``ip_local_port_range``, 32768-60999 by default). The
kernel hands ports in that range to every outgoing connection and every bind to port 0, and a Ray makes hundreds of
connections while it starts: a port found free there can be taken by the time HAProxy binds it (seen in CI: the stats
port, picked free at the test session's start, was "Address already in use" when HAProxy started a minute later, and
every test that needed the app failed). So a Ray gets a block of ports of its own: its replicas' ports, then HAProxy's
side ports, then a few for the servers its caller starts (``block_port``: the HTTP proxy's port in the tests and the
benchmark).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile

log = logging.getLogger(__name__)

# Ray Serve 2.60's names (ray/serve/_private/constants.py).
FILE_VARS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
             "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
             "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}
BASE_VAR = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
# Side ports, fixed by default (8404, 9101, 8500, 9500): isolate() puts each in the Ray's block. The fallback proxy
# (Serve's Python proxy that HAProxy falls back to while no ingress replica is up) binds its port with SO_REUSEPORT
# too: two Rays' fallbacks would share it.
SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
              "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# A block: BLOCK ports in [20000, 30000), apart from Serve's defaults (30000-31000, 40000-41000) that a plain
# `serve run` on this machine uses. Its first REPLICA_PORTS are Serve's HTTP replica ports (gRPC: the same 10000
# lower), then one port per side port, then the caller's ports.
RANGE_VARS = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
              "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT")
BLOCK, FIRST_HTTP, BLOCKS, REPLICA_PORTS = 100, 20000, 100, 80
CALLER_PORTS = BLOCK - REPLICA_PORTS - len(SIDE_PORTS)
ALL_VARS = (BASE_VAR, *FILE_VARS, *SIDE_PORTS, *RANGE_VARS)


# Serve's HAProxy writes a log line per request to a socket that its manager actor reads and parses in Python, to
# record Serve's HTTP metrics (serve_num_http_requests, serve_http_request_latency_ms, ...). With this off the
# ingress replicas record the same metrics themselves, aggregated before export (Serve's replica.py: it emits them
# when HAProxy does not), so nothing a dashboard shows goes missing but the requests HAProxy answers alone (no
# replica up, or its own timeouts). The parsing cost ~0.1 ms of CPU a request (benchmarks/README.md,
# "How to read these runs", stop 33): 3% of the demo pack's whole request. ``defaults`` sets it where the caller has not.
METRICS_VAR = "RAY_SERVE_HAPROXY_METRICS_ENABLED"
DEFAULTS = {METRICS_VAR: "0"}


def defaults(env: "os._Environ | dict | None" = None) -> dict[str, str]:
    """The service's HAProxy settings (``DEFAULTS``), each where ``env`` (default ``os.environ``) does not set it
    already; returns what it set. Before Ray Serve is imported: it reads them then, as the Ray started here does."""
    env = os.environ if env is None else env
    added = {k: v for k, v in DEFAULTS.items() if k not in env}
    env.update(added)
    return added


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


def port_block(env, block: int) -> None:
    """Serve's replica ports for this Ray: the start of block `block` for HTTP, gRPC the same 10000 lower."""
    lo = _first(block % BLOCKS)
    env.update({RANGE_VARS[0]: str(lo), RANGE_VARS[1]: str(lo + REPLICA_PORTS - 1),
                RANGE_VARS[2]: str(lo - 10000), RANGE_VARS[3]: str(lo - 10000 + REPLICA_PORTS - 1)})


def block_of(env) -> int:
    return (int(env[RANGE_VARS[0]]) - FIRST_HTTP) // BLOCK


def block_port(env, i: int = 0) -> int:
    """The ``i``-th port of ``env``'s block kept for its caller (its HTTP proxy, say): no Ray or kernel hands it out."""
    if not 0 <= i < CALLER_PORTS:
        raise ValueError(f"a block keeps {CALLER_PORTS} ports for its caller, not {i + 1}")
    return _first(block_of(env)) + REPLICA_PORTS + len(SIDE_PORTS) + i


def _first(block: int) -> int:
    return FIRST_HTTP + block * BLOCK


def _side_port(block: int, var: str) -> int:
    return _first(block) + REPLICA_PORTS + SIDE_PORTS.index(var)


_handed_out: set[int] = set()  # blocks this process gave a Ray: two Rays it starts at once pick apart


def _free_block() -> int:
    """A block whose first replica ports, side ports and first caller port nobody listens on, starting from one this
    pid picks (two processes starting a Ray at once rarely start from the same block). Never this process's own
    Ray's block (named in ``os.environ``) or the one beside it (``port_block(env, block_of(os.environ) + 1)`` is how
    a caller starts a second Ray in a block it chose), nor a block this process handed out before."""
    start = os.getpid() % BLOCKS
    skip = set(_handed_out)
    if RANGE_VARS[0] in os.environ:
        own = block_of(os.environ)
        skip |= {own % BLOCKS, (own + 1) % BLOCKS}
    for i in range(BLOCKS):
        b = (start + i) % BLOCKS
        if b in skip:
            continue
        lo = _first(b)
        ports = [*range(lo, lo + 8), *range(lo - 10000, lo - 10000 + 8),
                 *range(lo + REPLICA_PORTS, lo + REPLICA_PORTS + len(SIDE_PORTS) + 1)]
        if all(port_free(p) for p in ports):
            _handed_out.add(b)
            return b
    return start


def isolate(env: "os._Environ | dict | None" = None, *, force: bool = False) -> str:
    """Point HAProxy's files at a fresh private directory and Serve's replica ports at a free block (unless the caller
    chose them: `force` overrides), and HAProxy's side ports at that block's (a side port the caller set stays
    unless forced or taken). Returns the directory."""
    env = os.environ if env is None else env
    if force or BASE_VAR not in env:
        base = tempfile.mkdtemp(prefix="haproxy-", dir="/tmp")  # short: a unix socket path has ~100 bytes
        env[BASE_VAR] = base
        for var, name in FILE_VARS.items():
            env[var] = os.path.join(base, name)
    if force or RANGE_VARS[0] not in env:
        port_block(env, _free_block())
    block = block_of(env)
    for var in SIDE_PORTS:
        mine = _side_port(block, var)
        if var in env and not force and int(env[var]) != mine:
            if port_free(int(env[var])):
                continue
            log.info("port %s (%s) is taken on this machine: HAProxy uses %d", env[var], var, mine)
        env[var] = str(mine)
    return env[BASE_VAR]
