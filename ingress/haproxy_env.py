"""HAProxy settings that must differ between two Rays on one machine.

Ray Serve's HAProxy keeps its config, admin socket and server state under a fixed `/tmp/haproxy-serve/` and listens
for stats and metrics on fixed ports. A second Ray with HAProxy on the same machine (the CLI beside `serve run`, a test
run beside a benchmark) then reloads the *first* one's HAProxy through the shared socket, and requests to either port
reach the other's replicas (seen: the CLI's secret refused by the test session's ingress). `isolate()` gives this
process's Ray its own directory and free side ports. It must run before Ray starts: Serve reads these at import and
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
             "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}
BASE_VAR = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
ALL_VARS = (BASE_VAR, *FILE_VARS, *SIDE_PORTS)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def isolate(env: "os._Environ | dict | None" = None, *, force: bool = False) -> str:
    """Point HAProxy's files at a fresh private directory (unless the caller chose one: `force` overrides) and move
    taken stats/metrics ports to free ones. Returns the directory."""
    env = os.environ if env is None else env
    if force or BASE_VAR not in env:
        base = tempfile.mkdtemp(prefix="haproxy-", dir="/tmp")  # short: a unix socket path has ~100 bytes
        env[BASE_VAR] = base
        for var, name in FILE_VARS.items():
            env[var] = os.path.join(base, name)
    for var, default in SIDE_PORTS.items():
        port = int(env.get(var, default))
        if force or not _port_free(port):
            free = _free_port()
            if not force:
                log.info("port %d (%s) is taken on this machine: HAProxy uses %d", port, var, free)
            env[var] = str(free)
    return env[BASE_VAR]
