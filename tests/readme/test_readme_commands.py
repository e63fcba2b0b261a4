"""Every command the README shows works as written after its own set-up (`make serve`): the curl, the published
client, the Ray handle (submitted as a Ray job) and the bulk job through `ray job submit`, whose `python` must be
the venv's (`make serve` starts Ray with the venv's bin first on PATH).

This runs the real `make serve` on its own Ray, apart from any other: its own RAY_TMPDIR, HAProxy files and side
ports (`ingress.haproxy_env.isolate`), and a free HTTP port. One port cannot be moved: the job agent of a Ray that
`ray.init` starts (as `serve run` does) listens on 52365, so only one such Ray per machine accepts jobs. This module
lives outside tests/service so that it runs before the test session's Ray starts; where another Ray holds the port
(other work on the same machine), the two job cases skip, saying so. The only edits to the README's text are the
host ports (8000 -> this server's, 8265 -> its Ray dashboard's) and the job's output path. Each answer is checked
against the same request sent over HTTP (the job's strongest context against `activation/single` on every text).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from ingress import haproxy_env
from tests.compare import assert_same_answer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
START_S = 600  # a cold `serve run` (Ray, the model, four SAEs) on a loaded 2-core machine
JOB_OUT = "/tmp/top_contexts.parquet"
JOB_AGENT_PORT = 52365  # ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT; ray.init has no way to change it


def readme_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in _FENCE.findall(README.read_text(encoding="utf-8")) if lang in ("bash", "python")]


def kind(lang: str, body: str) -> str:
    """What a block is: the set-up (run by the fixture), a shell command, a Ray driver, or a plain Python script."""
    if lang == "bash" and "make serve" in body:
        return "setup"
    if lang == "bash":
        return "shell"
    return "ray" if "ray.init" in body else "python"


BLOCKS = [(kind(lang, body), body) for lang, body in readme_blocks()]




def _ours(tmp: str) -> list:
    """This test's Ray processes: each names the private temp dir on its command line."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp in a for a in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def served():
    """`make serve` on a copy of serve_config.yaml that differs only in its HTTP port."""
    jobs_ok = haproxy_env.port_free(JOB_AGENT_PORT)
    work = Path(tempfile.mkdtemp(prefix="readme-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SECRET") and not k.startswith("RAY_SERVE_HAPROXY")}
    env["RAY_TMPDIR"] = str(work)
    haproxy_env.isolate(env, force=True)
    port = haproxy_env.block_port(env)
    config = (REPO / "serve_config.yaml").read_text()
    assert "port: 8000" in config
    (work / "serve_config.yaml").write_text(config.replace("port: 8000", f"port: {port}", 1))
    log = (work / "serve.log").open("w")
    # -o: never rebuild the (shared) venv from here; `make serve` itself does when pyproject.toml changed
    proc = subprocess.Popen(["make", "-o", ".venv/bin/.installed", "serve", f"SERVE_CONFIG={work / 'serve_config.yaml'}"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base, dashboard = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"make serve exited {proc.returncode}:\n{(work / 'serve.log').read_text()[-4000:]}"
            text = re.sub(r"\x1b\[[0-9;]*m", "", (work / "serve.log").read_text())  # Ray colours the URL
            m = re.search(r"dashboard at (?:https?://)?([\d.]+:\d+)", text)
            dashboard = dashboard or (m and m.group(1))
            try:
                if dashboard and httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"make serve did not become healthy in {START_S} s:\n{(work / 'serve.log').read_text()[-4000:]}")
        yield {"base": base, "port": port, "dashboard": dashboard, "env": env, "work": work, "jobs_ok": jobs_ok}
    finally:
        # the whole group: a SIGTERM to `serve run` alone ends it but leaves its Ray running (README)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # Ray's daemons, should any outlive serve run, and its HAProxy, which does (its files are under the HAProxy
        # directory isolate() gave this server, not under RAY_TMPDIR)
        for p in _ours(str(work)) + _ours(env[haproxy_env.BASE_VAR]):
            p.kill()
        log.close()


def as_run_here(body: str, served, out: Path) -> str:
    """The README's text with this server's ports and a private output path."""
    body = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{served['port']}", body)
    body = body.replace("http://127.0.0.1:8265", f"http://{served['dashboard']}")
    return body.replace(JOB_OUT, str(out))


# Ray's answer to a job submitted before the node's dashboard agent is up (seen ~20 s after a cold start on this
# machine): nothing was submitted, and Ray says to try again.
NO_AGENT = "No available agent to submit job"
# Ray's open race (ray-project/ray#36703, seen here once with other Rays busy on the machine): the job's working_dir
# package is dropped from the GCS while the job runs, so the job's Ray Data tasks cannot set up and the job fails
# before writing anything. Submitting again uploads the package anew; once only.
PACKAGE_GONE = "Failed to download runtime_env file package"


def run(cmd: list[str], served, timeout: int = 600) -> str:
    env = {**served["env"], "PATH": os.environ["PATH"]}
    package_retries = 1
    for _ in range(24):
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        if r.returncode == 0:
            break
        if NO_AGENT in out:
            time.sleep(5)
        elif PACKAGE_GONE in out and package_retries:
            package_retries -= 1
        else:
            break
    assert r.returncode == 0, f"{cmd[:3]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def http_answer(served, body_text: str) -> dict:
    """The activation/all request the block makes (its prompt), answered over HTTP."""
    prompt = re.search(r'prompt(?:"\s*:\s*|=)"([^"]+)"', body_text).group(1)
    req = {"prompt": prompt, "model": "demo-lm", "source_set": "res-demo", "selected_sources": [],
           "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 5}
    r = httpx.post(f"{served['base']}/v1/activation/all", json=req, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_readme_shows_the_commands_this_test_runs():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("setup") == 1 and "shell" in kinds and "ray" in kinds and "python" in kinds, kinds
    assert any("ray job submit" in b for _, b in BLOCKS) and any("curl" in b for _, b in BLOCKS)
    assert any(JOB_OUT in b for _, b in BLOCKS)


@pytest.mark.parametrize("i", [i for i, (k, _) in enumerate(BLOCKS) if k != "setup"],
                         ids=lambda i: f"{BLOCKS[i][0]}-{i}")
def test_readme_command(served, tmp_path, i):
    what, body = BLOCKS[i]
    if (what == "ray" or "ray job submit" in body) and not served["jobs_ok"]:
        pytest.skip(f"port {JOB_AGENT_PORT} was held by another Ray on this machine when `make serve` started: its Ray's "
                    "job agent could not listen (ray.init cannot move it), so it accepts no jobs; run this test alone")
    out = tmp_path / "top_contexts.parquet"
    text = as_run_here(body, served, out)
    if what == "shell" and "ray job submit" in text:
        stdout = run(["bash", "-c", text], served)
        assert "succeeded" in stdout.lower(), stdout[-2000:]
        check_job_output(served, body, out)
    elif what == "shell":
        got = json.loads(run(["bash", "-c", text], served))
        assert_same_answer(got, http_answer(served, body))
    elif what == "python":
        script = tmp_path / "block.py"
        script.write_text(text)
        got = ast.literal_eval(run([str(VENV_BIN / "python"), str(script)], served).strip().splitlines()[-1])
        want = http_answer(served, body)["activations"]
        assert_same_answer([{"source": s, "index": i, "max_value": v} for s, i, v in got],
                           [{k: a[k] for k in ("source", "index", "max_value")} for a in want])
    else:  # a Ray driver: submitted as a job on the service's cluster, as the README says
        script = tmp_path / "block.py"
        script.write_text(text)
        stdout = run([str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://{served['dashboard']}", "--",
                      "python", str(script)], served)
        line = next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("{"))
        assert_same_answer(ast.literal_eval(line), http_answer(served, body))


def check_job_output(served, body: str, out: Path) -> None:
    """The job's strongest context per feature is the text with that feature's largest activation/single value."""
    import pyarrow.parquet as pq

    args = dict(re.findall(r"--([\w-]+) (\S+)", body))
    from jobs.top_contexts import parse_features

    features, source, top = parse_features(args["features"]), args["source"], int(args["top"])
    table = pq.read_table(out).to_pylist()
    texts = [json.loads(line)["text"] for line in (REPO / args["dataset"]).read_text().splitlines()]
    assert {r["feature"] for r in table} <= set(features) and all(r["rank"] < top for r in table)
    for f in features:
        best = []
        for k in range(0, len(texts), 16):
            r = httpx.post(f"{served['base']}/v1/activation/single-batch", timeout=120,
                           json={"prompts": texts[k:k + 16], "model": "demo-lm", "source": source, "index": str(f)})
            assert r.status_code == 200, r.text
            best += [a["activation"]["max_value"] for a in r.json()["results"]]
        rows = sorted((r for r in table if r["feature"] == f), key=lambda r: r["rank"])
        if max(best) <= 0:
            assert not rows
            continue
        # different batches: float32 drift only (tests/compare.py)
        assert_same_answer(rows[0]["activation"], max(best))
