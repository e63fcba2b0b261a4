"""One Ray session for the whole test run, and the real app served on it over HTTP."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

SECRET = "test-secret-Zq81"
MODEL_ID = "demo-lm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from ingress import header_timeout

        # The header-read timeout in Serve's proxy (it inherits this environment), shortened for the tests.
        os.environ.update(header_timeout.ray_env())
        os.environ.setdefault(header_timeout.ENV, "5")
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}})
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


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
def serve_app(ray_session, pack_dir, att_sae_dir, temporal_sae_dir):
    """The real application (build_app + serve.run) on the demo pack, with auth on. Yields the base URL."""
    from ray import serve

    from ingress.app import build_app
    from ingress.args import AppArgs

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(model=str(pack_dir), sae_sets=["res-demo"], sae_dirs=[str(att_sae_dir), str(temporal_sae_dir)], secret=SECRET,
                   token_limit=64, max_batch_prompts=4)
    serve.run(build_app(args), name="saeserve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError("service did not become healthy")
    yield base


@pytest.fixture(scope="session")
def http(serve_app):
    with httpx.Client(base_url=serve_app, timeout=60, headers={"X-SECRET-KEY": SECRET}) as c:
        yield c


@pytest.fixture(scope="session")
def np_client(serve_app):
    """The published neuronpedia-inference-client 1.10.1, pointed at the served app."""
    from neuronpedia_inference_client import ApiClient, Configuration, DefaultApi

    cfg = Configuration(host=f"{serve_app}/v1", api_key={"SimpleSecretAuth": SECRET})
    with ApiClient(cfg) as api:
        yield DefaultApi(api)


@pytest.fixture(scope="session")
def np_web(serve_app):
    """HTTP as Neuronpedia's web app (2026-08) speaks it: inference host ``<base>/neuronpedia``, X-SECRET-KEY always."""
    with httpx.Client(base_url=f"{serve_app}/neuronpedia", timeout=60, headers={"X-SECRET-KEY": SECRET}) as c:
        yield c
