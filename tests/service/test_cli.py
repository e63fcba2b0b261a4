"""``neuronpedia-server`` end to end, as a user runs it: a subprocess with a Ray instance of its own (its own temp
dir, so it never meets the test session's Ray), on a random pack; /health, activation/all, SIGINT → exit 0 with
no Ray process left behind. Also ``--list_models`` against SAE Lens's directory, and bad flags → exit 2.

Uses no fixture from conftest.py: it does not start the session's Ray or app. The real-command runs are checks in
the session's background (tests/background.py), started with the run; their tests wait for the outcome.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

from ingress import haproxy_env  # noqa: E402
from tests import background  # noqa: E402


def _exe() -> list[str]:
    script = Path(sys.executable).parent / "neuronpedia-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ingress.cli"]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("SECRET", None)
    for var in haproxy_env.ALL_VARS:  # the CLI's Ray gets HAProxy files and ports of its own, apart from this session's
        env.pop(var, None)
    haproxy_env.port_block(env, haproxy_env.block_of(os.environ) + 1)  # the block beside the session's, never it
    return env


def _ray_processes(marker: str) -> list:
    """Every process of the Ray instance whose temp dir is ``marker``: its daemons (the marker is in their command
    lines) and everything they started (workers, replicas)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in a for a in p.info["cmdline"] or []):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def random_pack() -> Path:
    """A seeded random pack in a temp dir of its own (apart from the Ray temp dir: only Ray's processes name that)."""
    from scripts.make_random_pack import write_random_pack

    return write_random_pack(Path(tempfile.mkdtemp(prefix="cli-pack-")) / "pack", n_layers=2, d_model=32, d_sae=64,
                             vocab_size=300, set_name="res-rand", model_name="rand-lm")


# The CLI's ray.init Ray would take the job agent's port if free: it starts once the README's tests are over.
@background.check("cli-sigint", order=4, gate=background.JOB_AGENT_PORT, prepare=random_pack)
def serve_a_pack_and_sigint(pack: Path) -> None:
    env = _env()
    port = haproxy_env.block_port(env)
    ray_tmp = tempfile.mkdtemp(prefix="rcli", dir="/tmp")  # short: Ray's socket paths live under it
    log_path = Path(ray_tmp) / "cli.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*_exe(), "--model_id", str(pack), "--host", "127.0.0.1", "--port", str(port),
                                 "--secret", "cli-secret", "--token_limit", "32", "--ray_temp_dir", ray_tmp],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"never healthy:\n{log_path.read_text()[-4000:]}"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        body = {"prompt": "hello world the cat", "model": "rand-lm", "source_set": "res-rand", "selected_sources": [],
                "num_results": 5, "sort_by_token_indexes": [], "ignore_bos": True}
        assert httpx.post(f"{base}/v1/activation/all", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{base}/v1/activation/all", json=body, headers={"X-SECRET-KEY": "cli-secret"}, timeout=60)
        assert r.status_code == 200, r.text
        acts = r.json()["activations"]
        assert len(acts) == 5 and {a["source"] for a in acts} <= {"0-res-rand", "1-res-rand"}
        assert r.json()["tokens"][0] == "<|bos|>"
        r = httpx.post(f"{base}/v1/activation/all", json={**body, "prompt": "the cat " * 40},
                       headers={"X-SECRET-KEY": "cli-secret"}, timeout=60)
        assert r.status_code == 400 and "max is 32" in r.json()["error"]  # --token_limit reached the app

        ours = _ray_processes(ray_tmp)
        assert ours, "no Ray processes found under the CLI's temp dir"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=45)
        text = log_path.read_text()
        assert rc == 0, text[-4000:]
        assert "loading model" in text and "loading SAE" in text  # progress logs reach the console
        deadline = time.monotonic() + 15
        while any(p.is_running() and p.status() != "zombie" for p in ours) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p.pid for p in ours if p.is_running() and p.status() != "zombie"]
        assert not left, f"Ray processes left behind: {left}"
        assert not _ray_processes(ray_tmp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(pack.parent, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.background("cli-sigint")
def test_cli_serves_a_pack_and_shuts_down_cleanly_on_sigint():
    background.result("cli-sigint")


@background.check("cli-commands", order=1)
def real_command_runs() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """The real command with each argv below, the runs side by side: each spends ~10 s importing on one core."""
    argvs = [("--list_models",), *(tuple(argv) for argv, _ in REAL_BAD_FLAGS)]
    procs = {argv: subprocess.Popen([*_exe(), *argv], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=str(REPO)) for argv in argvs}
    runs = {}
    try:
        for argv, p in procs.items():
            out, err = p.communicate(timeout=240)
            runs[argv] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return runs


@pytest.fixture(scope="module")
def real_runs() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    return background.result("cli-commands")


@pytest.mark.background("cli-commands")
def test_list_models_matches_sae_lens_directory(real_runs):
    from deployments.specs import list_pretrained_models

    r = real_runs[("--list_models",)]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    models = list_pretrained_models()
    for model, sets in models.items():
        i = lines.index(f"  {model}:")
        for j, (name, n) in enumerate(sets.items(), 1):
            assert lines[i + j] == f"    - {name} ({n} SAE{'s' if n != 1 else ''})"
    assert "    - res-jb (13 SAEs)" in lines[lines.index("  gpt2-small:"):]
    assert "raylet" not in r.stderr.lower() and "Started a local Ray" not in r.stderr  # offline, no Ray


BAD_FLAGS = [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--model_dtype", "float64"], "invalid choice"),
    (["--sae_dtype", "int8"], "invalid choice"),
    (["--port", "not-a-number"], "invalid int value"),
    (["--port", "70000"], "--port must be"),
    (["--token_limit", "0"], "token_limit"),
    (["--max_loaded_saes", "0"], "max_loaded_saes"),
    (["--model_id", "no-such-model"], "Unknown model 'no-such-model'"),
    (["--model_id", "/"], "not a model pack"),
    (["--model_id", "gemma-2-2b", "--override_model_id", "nope-it"], "Unknown override_model_id 'nope-it'"),
    (["--sae_sets", "no-such-set"], "SAE set 'no-such-set' not found"),
    (["--model_id", "gpt2-small", "--sae_sets", "res-nope"], "known sets for it"),
    (["--include_sae", "(bad"], "Bad include/exclude SAE regex"),
    (["--include_sae", "matches-nothing"], "no SAEs to serve"),
    (["--sae_config", "/no/such/file.yaml"], "not found"),
]


@pytest.mark.parametrize("argv, needle", BAD_FLAGS)
def test_bad_flags_exit_2_with_a_message(argv, needle, capsys):
    """In process (the same main() the entry point runs): argparse's exit status 2 and a one-line reason."""
    from ingress.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert needle in err and "neuronpedia-server: error:" in err, err


REAL_BAD_FLAGS = [BAD_FLAGS[0], BAD_FLAGS[10]]


@pytest.mark.background("cli-commands")
@pytest.mark.parametrize("argv, needle", REAL_BAD_FLAGS)
def test_bad_flags_exit_status_of_the_real_command(real_runs, argv, needle):
    r = real_runs[tuple(argv)]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
