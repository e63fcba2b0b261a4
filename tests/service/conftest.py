"""The real app served on the session's Ray over HTTP (the Ray session and the deploy: tests/conftest.py), and clients."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import SECRET  # noqa: F401 (the tests import it from here)
MODEL_ID = "demo-lm"


@pytest.fixture(scope="session")
def serve_app(main_app_deployed):
    """The real application (build_app + Serve) on the demo pack, with auth on, once it answers /health (it was
    deployed when the session left the README's tests: tests/conftest.py). Yields the base URL."""
    base, deploy = main_app_deployed
    if not deploy.done.wait(240):
        raise RuntimeError("deploying the main app took over 240 s")
    if deploy.error is not None:
        raise RuntimeError(f"deploying the main app failed: {deploy.error!r}") from deploy.error
    deadline = time.monotonic() + 240  # deployed beside other tests on 2 cores
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
