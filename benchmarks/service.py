"""The served app for the benchmark: Ray + ``serve.run(build_app(...))`` in this process, HTTP on loopback."""

from __future__ import annotations

import os
import socket
import time

import httpx


def proxy_port() -> int:
    """The HTTP proxy's port: the caller's port of this process's block when it has one (``haproxy_env.isolate``; a
    port below the ephemeral range, which nothing else is handed before the proxy binds it), else any free port."""
    from ingress import haproxy_env

    if haproxy_env.RANGE_VARS[0] in os.environ:
        return haproxy_env.block_port(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned_options(deployment_options: dict | None) -> dict:
    """One replica of each deployment unless told otherwise: autoscaling mid-run would time model loads, not serving."""
    opts = {name: {"num_replicas": 1, "autoscaling_config": None} for name in ("SAEServeIngress", "ModelDeployment", "SAEShard")}
    for name, o in (deployment_options or {}).items():
        opts[name] = {**opts.get(name, {}), **o}
        if "autoscaling_config" in o and o["autoscaling_config"] is not None:
            opts[name].pop("num_replicas", None)
    return opts


def threads_options(n: int) -> dict:
    """Deployment options giving ModelDeployment and SAEShard ``n`` torch threads (OMP_NUM_THREADS in their env)."""
    from deployments.model import ModelDeployment
    from deployments.sae_shard import SAEShard

    out = {}
    for d in (ModelDeployment, SAEShard):
        opts = dict(d.ray_actor_options or {})
        env = dict((opts.get("runtime_env") or {}).get("env_vars") or {})
        env["OMP_NUM_THREADS"] = str(n)
        opts["runtime_env"] = {**(opts.get("runtime_env") or {}), "env_vars": env}
        out[d.name] = {"ray_actor_options": opts}
    return out


def start(app_args: dict, num_cpus: int | None = None, timeout_s: float = 300) -> str:
    """Start Ray and the app; returns the base URL once /health answers 200."""
    import ray
    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM")
           if k in os.environ}
    if not ray.is_initialized():
        kw = {}
        if str(app_args.get("device", "")).startswith("cuda"):  # say it: GPU replicas would wait forever for an
            import torch                                          # undetected GPU

            kw["num_gpus"] = torch.cuda.device_count()
        ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, **kw)
    port = proxy_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs.model_validate(app_args)), name="saeserve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("service did not become healthy")


def replica_pids() -> dict[str, int]:
    """``{replica or proxy: pid}`` among this process's descendants (other Ray sessions may share the machine)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith(("ray::ServeReplica", "ray::ProxyActor")):
            name = title.split()[0].removeprefix("ray::").replace(":", "-")
            out[name] = p.pid
    return out


def _role(cmdline: str, name: str) -> str | None:
    """Which part of the service a process is: proxy, ingress, model, shard, haproxy, or ray (its daemons)."""
    if cmdline.startswith("ray::ProxyActor") or cmdline.startswith("ray::HAProxyManager"):
        return "proxy"
    if cmdline.startswith("ray::ServeReplica"):
        for key, role in (("SAEServeIngress", "ingress"), ("ModelDeployment", "model"), ("SAEShard", "shard")):
            if key in cmdline:
                return role
        return "replica"
    if name == "haproxy" or cmdline.split()[0].endswith("/haproxy"):
        return "haproxy"
    if name in ("raylet", "gcs_server") or cmdline.startswith(("ray::ServeController", "ray::IDLE", "ray::DashboardAgent")):
        return "ray"
    return None


def process_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of each part of the service among this process's descendants."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            role = _role(" ".join(p.cmdline()) or p.name(), p.name())
            if role is None:
                continue
            t = p.cpu_times()
        except (psutil.Error, IndexError):
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
