"""Several nodes: runs tests/service/multinode_check.py (its own multi-node Ray cluster on this machine) in a
subprocess, so the test session's Ray is untouched. See that script for what it checks. It runs in the session's
background (tests/background.py) once the autoscaling test is over; the test waits for its outcome."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ingress import haproxy_env
from tests import background

SCRIPT = Path(__file__).with_name("multinode_check.py")
REPO = SCRIPT.parents[2]
BUDGET_S = 300  # the script's own watchdog (cluster shut down, exit 3)
HARD_LIMIT_S = BUDGET_S + 60  # then the whole process group goes


@background.check("multinode", order=0, gate=background.AFTER_AUTOSCALING)
def run_multinode_check() -> tuple[int, str]:
    """The script's (exit status, output); it never meets the session's Ray (its own cluster, temp dir and ports)."""
    import shutil

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # its cluster address stays out of /tmp/ray
    # Several Ray nodes on one machine: each node's HAProxy would bind the same stats and metrics ports. This test is
    # about placement and node loss, not the ingress, so its cluster uses Serve's Python proxy.
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    # its proxy's port: one the session's block keeps for its caller (a probed free port can be taken before it binds)
    port = haproxy_env.block_port(os.environ, 1)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--budget", str(BUDGET_S), "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HARD_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"multinode_check.py ran past {HARD_LIMIT_S}s:\n{out[-8000:]}") from None
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.background("multinode")
def test_several_nodes_placement_and_node_loss():
    rc, out = background.result("multinode")
    progress = "\n".join(line for line in out.splitlines() if line.startswith(("[", "MULTINODE")))
    print(progress)
    assert rc == 0, f"exit {rc}:\n{progress}\n--- last output ---\n{out[-6000:]}"
    assert "MULTINODE OK" in out
