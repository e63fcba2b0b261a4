"""Test-wide settings: offline, no Ray auth, the pack under test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The service's default ingress (make serve, the CLI, the manifests): Serve's HAProxy, HTTP straight to the ingress
# replicas. Set before Ray is imported: Serve reads it then, and the Ray the tests start inherits it.
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


# HAProxy's files (config, admin socket) and stats/metrics ports are fixed by default: this session's Ray, the CLI
# tests' and the multinode test's each need their own, as does another test run or benchmark on the same machine.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ingress import haproxy_env  # noqa: E402

haproxy_env.isolate(force=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `tests.reference`, `scripts.*`

import pytest  # noqa: E402


def demo_pack_dir() -> Path:
    """The committed demo pack (override with SAESERVE_TEST_PACK to try another pack)."""
    return Path(os.environ.get("SAESERVE_TEST_PACK", REPO / "models" / "demo-lm")).resolve()


@pytest.fixture(scope="session")
def pack_dir() -> Path:
    d = demo_pack_dir()
    assert (d / "model" / "config.json").is_file(), f"demo pack missing at {d}"
    return d
