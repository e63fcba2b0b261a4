"""Two Rays with HAProxy on one machine must not share HAProxy's files or Serve's replica ports (ingress.haproxy_env)."""

from __future__ import annotations

import os
import socket

import pytest

from ingress import haproxy_env


def test_isolate_gives_private_files_and_a_port_block():
    a, b = {}, {}
    haproxy_env.isolate(a)
    haproxy_env.isolate(b)
    assert a[haproxy_env.BASE_VAR] != b[haproxy_env.BASE_VAR]
    for env in (a, b):
        base = env[haproxy_env.BASE_VAR]
        assert os.path.isdir(base)
        for var in haproxy_env.FILE_VARS:
            assert env[var].startswith(base + os.sep)
        lo, hi = int(env[haproxy_env.RANGE_VARS[0]]), int(env[haproxy_env.RANGE_VARS[1]])
        assert hi - lo + 1 == haproxy_env.REPLICA_PORTS and 20000 <= lo and hi < 30000  # apart from Serve's 30000-31000
        assert int(env[haproxy_env.RANGE_VARS[2]]) == lo - 10000
    assert haproxy_env.block_of(a) != haproxy_env.block_of(b)  # two Rays this process starts


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except OSError:
        return 32768


def test_every_port_of_a_ray_is_its_own_and_below_the_ephemeral_range():
    """The kernel hands ports in its ephemeral range to any connection or bind to port 0, so a port picked free
    there may be taken by the time HAProxy binds it. Every port isolate() and block_port() give lies below it, in
    the Ray's block, and no two of them are the same."""
    env = {}
    haproxy_env.isolate(env)
    lo, hi = int(env[haproxy_env.RANGE_VARS[0]]), int(env[haproxy_env.RANGE_VARS[1]])
    glo, ghi = int(env[haproxy_env.RANGE_VARS[2]]), int(env[haproxy_env.RANGE_VARS[3]])
    ports = [*range(lo, hi + 1), *range(glo, ghi + 1), *(int(env[v]) for v in haproxy_env.SIDE_PORTS),
             *(haproxy_env.block_port(env, i) for i in range(haproxy_env.CALLER_PORTS))]
    assert len(set(ports)) == len(ports)
    assert max(ports) < min(_ephemeral_low(), 30000) and min(ports) >= 1024
    block = range(lo, lo + haproxy_env.BLOCK)
    assert all(int(env[v]) in block for v in haproxy_env.SIDE_PORTS)
    assert all(haproxy_env.block_port(env, i) in block for i in range(haproxy_env.CALLER_PORTS))
    with pytest.raises(ValueError):
        haproxy_env.block_port(env, haproxy_env.CALLER_PORTS)


def test_a_side_port_the_caller_set_stays_unless_taken_or_forced():
    env = {"RAY_SERVE_HAPROXY_STATS_PORT": "0"}  # 0: always bindable
    haproxy_env.isolate(env)
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "0"
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = {"RAY_SERVE_HAPROXY_STATS_PORT": str(s.getsockname()[1])}
        haproxy_env.isolate(taken)
        assert taken["RAY_SERVE_HAPROXY_STATS_PORT"] != str(s.getsockname()[1])
    haproxy_env.isolate(env, force=True)
    assert int(env["RAY_SERVE_HAPROXY_STATS_PORT"]) in range(int(env[haproxy_env.RANGE_VARS[0]]),
                                                             int(env[haproxy_env.RANGE_VARS[0]]) + haproxy_env.BLOCK)


def test_isolate_keeps_what_the_caller_chose_unless_forced():
    env = {}
    haproxy_env.port_block(env, 7)
    env[haproxy_env.BASE_VAR] = "/tmp/mine"
    haproxy_env.isolate(env)
    assert env[haproxy_env.BASE_VAR] == "/tmp/mine" and haproxy_env.block_of(env) == 7
    haproxy_env.isolate(env, force=True)
    assert env[haproxy_env.BASE_VAR] != "/tmp/mine"


def test_a_listened_block_is_skipped():
    env = {}
    haproxy_env.isolate(env)
    lo = int(env[haproxy_env.RANGE_VARS[0]])
    with socket.socket() as s:  # another Ray's ingress replica on that block's first port
        s.bind(("0.0.0.0", lo))
        s.listen()
        again = {}
        haproxy_env.isolate(again)
        assert haproxy_env.block_of(again) != haproxy_env.block_of(env)


def test_defaults_fill_only_what_the_caller_left_unset():
    env = {}
    assert haproxy_env.defaults(env) == {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}
    assert env == haproxy_env.DEFAULTS
    mine = {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"}  # a user who wants HAProxy's own metrics keeps them
    assert haproxy_env.defaults(mine) == {} and mine == {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"}

