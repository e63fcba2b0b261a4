"""Two Rays with HAProxy on one machine must not share HAProxy's files or Serve's replica ports (ingress.haproxy_env)."""

from __future__ import annotations

import os
import socket

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
        assert hi - lo + 1 == haproxy_env.BLOCK and 20000 <= lo and hi < 30000  # apart from Serve's 30000-31000
        assert int(env[haproxy_env.RANGE_VARS[2]]) == lo - 10000


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
