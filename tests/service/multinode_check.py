"""Several Ray nodes on one machine: placement by custom resources, requests across nodes, losing a node.

A head node (the ingress and the HTTP proxy), a ``model_node`` worker (ModelDeployment) and two ``sae_node``
workers (one SAEShard replica each), started with ``ray.cluster_utils.Cluster``. The script checks that each
replica runs on a node offering the resource it asked for, that requests succeed across nodes, then removes
one SAE node: the service must recover within a bound (the surviving shard replica takes every SAE) and,
once recovered, answer every request with 200 and the same answers; a replacement ``sae_node`` then gets
the replacement replica. Everything is bounded by ``--budget`` seconds (a watchdog shuts the cluster down
and exits 3); the cluster is always shut down.

It needs its own Ray cluster, so tests/service/test_multinode.py runs it in a subprocess; by hand:

    python tests/service/multinode_check.py --budget 300

Exit status 0 and a last line ``MULTINODE OK {...}`` on success.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")  # it runs beside the suite (docs/reliability.md)
os.environ.pop("RAY_ADDRESS", None)
# Our own Ray temp dir: Cluster records its address in <temp>/ray/ray_current_cluster, and a plain ray.init()
# elsewhere on this machine reads /tmp/ray/ray_current_cluster; keep ours out of other sessions' way.
_OWN_TMP = None
if "RAY_TMPDIR" not in os.environ:
    _OWN_TMP = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    os.environ["RAY_TMPDIR"] = _OWN_TMP

T0 = time.monotonic()
MB = 1024 * 1024
PACK = REPO / "models" / "demo-lm"
# dashboard_agent_listen_port=None: any free port (0) for every node's job agent, the head's included, which would
# otherwise take 52365, the port the README's `make serve` needs for its `ray job submit` (tests/readme) while this
# script runs beside it (tests/background.py).
NODE = dict(object_store_memory=80 * MB, include_dashboard=False, dashboard_agent_listen_port=None)
HEALTH_CHECKS = {"health_check_period_s": 1, "health_check_timeout_s": 10}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, cond, within_s: float, every_s: float = 0.5):
    end = time.monotonic() + within_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {within_s:.0f}s")
        time.sleep(every_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=300, help="seconds before the watchdog stops everything")
    p.add_argument("--port", type=int, default=0, help="the HTTP proxy's port (0: any free one)")
    a = p.parse_args()

    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from ingress.app import build_app
    from ingress.args import AppArgs

    cluster = None
    stopped = threading.Event()

    def watchdog():
        if stopped.is_set():
            return
        log(f"WATCHDOG: over the {a.budget:.0f}s budget; shutting the cluster down")
        try:
            if cluster is not None:
                cluster.shutdown()
        finally:
            os._exit(3)

    timer = threading.Timer(a.budget, watchdog)
    timer.daemon = True
    timer.start()
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, resources={"ingress_node": 1}, **NODE))
        model_node = cluster.add_node(num_cpus=1, resources={"model_node": 1}, **NODE)
        sae_nodes = [cluster.add_node(num_cpus=1, resources={"sae_node": 1}, **NODE) for _ in range(2)]
        names = {cluster.head_node.node_id: "head", model_node.node_id: "model", sae_nodes[0].node_id: "sae-1",
                 sae_nodes[1].node_id: "sae-2"}
        log("cluster: head + model_node + 2 sae_node workers")
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}})
        port = a.port or free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})

        def opts(replicas: int, resource: str, **extra) -> dict:
            return {"num_replicas": replicas, "autoscaling_config": None,
                    "ray_actor_options": {"num_cpus": 0.1, "resources": {resource: 1}}, **extra}

        args = AppArgs(model=str(PACK), sae_sets=["res-demo"], token_limit=64, deployment_options={
            "SAEServeIngress": opts(1, "ingress_node"),
            "ModelDeployment": opts(1, "model_node", **HEALTH_CHECKS),
            "SAEShard": opts(2, "sae_node", **HEALTH_CHECKS),
        })
        serve.run(build_app(args), name="saeserve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=base, timeout=30)
        wait_until("healthy", lambda: http.get("/health").status_code == 200, 120)
        log(f"app running, HTTP on {base}")

        def replicas() -> dict[str, list[str]]:
            """deployment -> names of the nodes its RUNNING replicas are on (from the Serve controller)."""
            from ray.serve.context import _get_global_client

            details = _get_global_client().get_serve_details()
            deps = details["applications"]["saeserve"]["deployments"]
            return {d: sorted(names.get(r["node_id"], r["node_id"]) for r in deps[d]["replicas"] if r["state"] == "RUNNING")
                    for d in deps}

        placed = replicas()
        log(f"placement: {placed}")
        assert placed == {"SAEServeIngress": ["head"], "ModelDeployment": ["model"], "SAEShard": ["sae-1", "sae-2"]}, placed
        node_resources = {names[n["NodeID"]]: n["Resources"] for n in ray.nodes() if n["Alive"] and n["NodeID"] in names}
        for dep, res in (("ModelDeployment", "model_node"), ("SAEShard", "sae_node")):
            for node in placed[dep]:
                assert node_resources[node].get(res) == 1, (dep, node, node_resources[node])

        bodies = [dict(prompt=f"the {w} sat on the mat", model="demo-lm", source_set="res-demo", selected_sources=sel,
                       sort_by_token_indexes=[], ignore_bos=True, num_results=8)
                  for w in ("cat", "dog", "bird") for sel in ([], ["0-res-demo"], ["1-res-demo"])]

        from tests.compare import same_answer  # other nodes, other batches: the same answer up to float32 drift

        def key(resp: dict):
            return resp

        want = []
        for b in bodies:  # both SAEs, on either SAE node, through the model node
            r = http.post("/v1/activation/all", json=b)
            assert r.status_code == 200, r.text
            want.append(key(r.json()))
        log(f"{len(bodies)} requests across nodes: all 200")

        def ask(i: int) -> int:
            try:
                r = http.post("/v1/activation/all", json=bodies[i % len(bodies)])
            except httpx.HTTPError as e:
                return type(e).__name__
            if r.status_code == 200:
                assert same_answer(key(r.json()), want[i % len(bodies)]), "different answer after a node change"
            return r.status_code

        # --- lose an SAE node ---------------------------------------------------------------------------
        cluster.remove_node(sae_nodes[0], allow_graceful=False)
        t_removed = time.monotonic()
        log("removed node sae-1 (killed)")
        transition: dict = {}
        run, i = 0, 0
        end = t_removed + 120
        while run < 10 or "sae-1" in replicas().get("SAEShard", []):
            assert time.monotonic() < end, f"no recovery within 120s: {transition}, replicas {replicas()}"
            code = ask(i)
            i += 1
            transition[code] = transition.get(code, 0) + 1
            run = run + 1 if code == 200 else 0
            time.sleep(0.2)
        t_recovered = time.monotonic() - t_removed
        log(f"recovered {t_recovered:.1f}s after the node went: responses meanwhile {transition}; replicas {replicas()}")

        after = [ask(k) for k in range(30)]
        assert after == [200] * 30, after
        log("30 requests after recovery: all 200, same answers")

        # --- a replacement SAE node gets the missing replica --------------------------------------------
        sae3 = cluster.add_node(num_cpus=1, resources={"sae_node": 1}, **NODE)
        names[sae3.node_id] = "sae-3"
        t_added = time.monotonic()
        during: dict = {}

        def replaced():
            code = ask(len(during))
            during[code] = during.get(code, 0) + 1
            return replicas().get("SAEShard") == ["sae-2", "sae-3"]

        wait_until("replacement SAEShard replica on sae-3", replaced, 150, every_s=0.3)
        log(f"replacement replica running on sae-3 {time.monotonic() - t_added:.1f}s after the node joined; "
            f"responses meanwhile {during}")
        assert set(during) == {200}, during
        final = [ask(k) for k in range(20)]
        assert final == [200] * 20, final
        log(f"placement: {replicas()}; 20 more requests: all 200")
        print("MULTINODE OK " + json.dumps({"recovery_s": round(t_recovered, 1), "during_loss": {str(k): v for k, v in transition.items()},
                                             "seconds": round(time.monotonic() - T0, 1)}), flush=True)
        return 0
    finally:
        stopped.set()
        timer.cancel()
        # The cluster is thrown away: kill its nodes rather than drain them (serve.shutdown and a graceful
        # Cluster.shutdown took 26 s here). A node's workers and replicas exit when their raylet goes.
        nodes = [n for n in (*cluster.worker_nodes, cluster.head_node) if n] if cluster is not None else []
        for step in (ray.shutdown, *(functools.partial(cluster.remove_node, n, allow_graceful=False) for n in nodes)):
            try:
                step()
            except Exception as e:  # keep shutting down
                log(f"shutdown step failed: {e!r}")
        if _OWN_TMP:
            shutil.rmtree(_OWN_TMP, ignore_errors=True)
        log("cluster shut down")


if __name__ == "__main__":
    sys.exit(main())
