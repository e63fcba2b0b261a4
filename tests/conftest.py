"""Test-wide settings: offline, no Ray auth, the pack under test."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The service's default ingress (make serve, the CLI, the manifests): Serve's HAProxy, HTTP straight to the ingress
# replicas. Set before Ray is imported: Serve reads it then, and the Ray the tests start inherits it.
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
# With HAProxy an ingress replica that stops drains for at least 30 s (so HAProxy stops routing to it first): every
# serve.delete and the session's serve.shutdown waited that out (measured: 31 s -> 2 s each). No test needs the drain.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


# HAProxy's files (config, admin socket) and stats/metrics ports are fixed by default: this session's Ray, the CLI
# tests' and the multinode test's each need their own, as does another test run or benchmark on the same machine.
# Its ports come from a block below the kernel's ephemeral range, where nothing else is handed them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ingress import haproxy_env  # noqa: E402

haproxy_env.isolate(force=True)
haproxy_env.defaults()  # as the service runs (make serve, the CLI, the manifests)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `tests.reference`, `scripts.*`

import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread in the test process. Its tensors are small (the demo pack), so a second OpenMP thread buys nothing
# (the engine tests: the same wall time, a fifth less CPU), and while the background checks (tests/background.py) or
# Ray's replicas keep the other core busy, the second thread is descheduled and the first waits for it at every
# parallel region: tests/engine/test_decoder.py took 37 s instead of 7. This process only: replicas and
# subprocesses keep their own settings (it is not an environment variable).
torch.set_num_threads(1)


def demo_pack_dir() -> Path:
    """The committed demo pack (override with SAESERVE_TEST_PACK to try another pack)."""
    return Path(os.environ.get("SAESERVE_TEST_PACK", REPO / "models" / "demo-lm")).resolve()


@pytest.fixture(scope="session")
def pack_dir() -> Path:
    d = demo_pack_dir()
    assert (d / "model" / "config.json").is_file(), f"demo pack missing at {d}"
    return d


# --- the session's Ray and the main app ---------------------------------------------------------------------

SECRET = "test-secret-Zq81"
# The session's replicas mark their stages here (deployments.stage_trace): tests/service/test_stage_trace.py reads them.
STAGE_TRACE_DIR = tempfile.mkdtemp(prefix="saeserve-test-stages-")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from ingress import header_timeout

        # The header-read timeout in Serve's proxy (it inherits this environment), shortened for the tests.
        os.environ.update(header_timeout.ray_env())
        os.environ.setdefault(header_timeout.ENV, "5")
        # Serve kills a proxy not ready in 5 s (serve.start then fails); beside other tests on 2 cores that happens.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
        from deployments import stage_trace

        # the replicas' environment only: in-process tests (this process) mark nothing
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                                           stage_trace.ENV: STAGE_TRACE_DIR}})
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(STAGE_TRACE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def att_sae_dir(pack_dir, tmp_path_factory):
    """An attention-output (hook_z) SAE beside the pack's, served as ``0-att-demo`` (for DFA)."""
    import json

    from tests.packs import write_hook_z_sae

    cfg = json.loads((pack_dir / "model" / "config.json").read_text())
    d_head = cfg.get("d_head") or cfg["d_model"] // cfg["n_heads"]
    return write_hook_z_sae(tmp_path_factory.mktemp("saes") / "att-demo" / "0", cfg["n_heads"], d_head)


@pytest.fixture(scope="session")
def temporal_sae_dir(pack_dir, tmp_path_factory):
    """A temporal SAE on ``blocks.1.hook_resid_post`` beside the pack's, served as ``1-temporal-demo`` (for
    util/similarity-matrix-pred)."""
    import json

    from tests.packs import write_temporal_sae

    cfg = json.loads((pack_dir / "model" / "config.json").read_text())
    return write_temporal_sae(tmp_path_factory.mktemp("saes") / "temporal-demo" / "1", cfg["d_model"], layer=1)


@pytest.fixture(scope="session")
def main_app_deployed(ray_session, pack_dir, att_sae_dir, temporal_sae_dir):
    """The real application (build_app + Serve) on the demo pack, with auth on, deployed from a thread without
    waiting for its replicas: Serve's proxies and the replicas start while other tests run (``_main_app_early``).
    ``(base URL, deploy)``, ``deploy`` a ``background.Check`` run in that thread; tests/service's ``serve_app`` waits
    for it and then until the app answers."""
    import threading

    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs
    from ingress.haproxy_env import block_port
    from tests import background

    port = block_port(os.environ)  # this Ray's block (haproxy_env.isolate above): no other process is handed it
    args = AppArgs(model=str(pack_dir), sae_sets=["res-demo"], sae_dirs=[str(att_sae_dir), str(temporal_sae_dir)], secret=SECRET,
                   token_limit=64, max_batch_prompts=4)
    app = build_app(args)

    def deploy_app():
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([serve.RunTarget(target=app, name="saeserve", route_prefix="/")], wait_for_applications_running=False)

    # Not a scheduled background check: it must not queue behind them.
    deploy = background.Check("deploy-main-app", deploy_app, order=0, gate=None)
    threading.Thread(target=deploy.run, name="deploy-main-app", daemon=True).start()
    return f"http://127.0.0.1:{port}", deploy


_wants_main_app = False


@pytest.fixture(autouse=True)
def _main_app_early(request):
    """At the first test after the README's (they need no Ray of the session's and must run before it starts), the
    session's Ray starts and the main app is deployed, if a selected test uses it: its replicas (a minute of CPU
    on 2 cores) start while the Ray-free tests run instead of holding up the first service test."""
    if _wants_main_app and not _under(request.node, README_TESTS):
        request.getfixturevalue("main_app_deployed")


# --- order and background checks (tests/background.py) ---------------------------------------------------------

README_TESTS = REPO / "tests" / "readme"


def _under(item, path: Path) -> bool:
    return Path(item.path) == path or path in Path(item.path).parents


# The order of the session, by the first of these paths a test is under (a stable sort: the rest keep their order):
# - the README's commands first: their `make serve` must be the first Ray on the machine, the one whose job agent
#   gets port 52365 (its `ray job submit` cases need it; ray.init cannot move it);
# - the several-nodes test near the end: its check runs in the background from the end of the autoscaling test
#   (tests/background.py), about 100 s, and the test only collects its outcome;
# - the fault tests last: they kill the main app's replicas.
ORDER = [(README_TESTS, 0), (REPO / "tests" / "service" / "test_multinode.py", 2),
         (REPO / "tests" / "service" / "test_faults.py", 3)]


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: next((rank for path, rank in ORDER if _under(item, path)), 1))


_gate_after: dict[str, int] = {}  # gate -> index of the last selected test it waits for
_position: dict[str, int] = {}


def pytest_collection_finish(session):
    """Start the background checks that the selected tests use, now, so that they overlap the whole run; each gate
    opens once the session has passed the last selected test it waits for (at once if there is none)."""
    from tests import background

    waits_for = {background.JOB_AGENT_PORT: README_TESTS,
                 background.AFTER_AUTOSCALING: REPO / "tests" / "service" / "test_autoscaling.py"}
    global _wants_main_app
    _wants_main_app = any("serve_app" in getattr(item, "fixturenames", ()) for item in session.items)
    _position.update((item.nodeid, i) for i, item in enumerate(session.items))
    for gate, path in waits_for.items():
        _gate_after[gate] = max((i for i, item in enumerate(session.items) if _under(item, path)), default=-1)
        if _gate_after[gate] < 0:
            background.open_gate(gate)
    background.start({m.args[0] for item in session.items for m in item.iter_markers("background")})


def pytest_runtest_setup(item):
    from tests import background

    i = _position.get(item.nodeid, len(_position))
    for gate, last in _gate_after.items():
        if i > last:
            background.open_gate(gate)
