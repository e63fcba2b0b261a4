"""One prepared run on a lent GPU machine (scripts/gpu_check.sh calls this): every step under its own timeout,
inside one overall budget, results as JSON and markdown in the output folder.

    python scripts/gpu_check.py [--out DIR] [--budget-s 400] [--steps env,tests,bench-gpt2-small,bench-gemma-2-2b]
    python scripts/gpu_check.py --dry-run --out /tmp/x      # the same entry points on the CPU, tiny shapes

Steps:
  env               nvidia-smi, torch and its CUDA, which of the project's packages import (Ray, Serve, ...)
  tests             pytest tests/gpu (all three dtypes; batch invariance at 6, 70 and 1100 tokens; float16
                    overflow isolation; forced OOM under a memory cap -> 503; health check on a poisoned context)
  bench-<shape>     python -m benchmarks.run on that shape at concurrency 1, 8, 16: the serialized baseline, and
                    the service over HTTP on cuda when Ray Serve imports
Files (at most 8, the device tool's limit): summary.json, summary.md, run.log, pytest.log, <shape>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT_RESERVE_S = 10  # kept back from the budget for writing the report
BENCH_SHAPES = ("gpt2-small", "gemma-2-2b")


class Run:
    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": dry_run, "device": self.device,
                              "budget_s": budget_s, "steps": {}}
        self.log = open(out / "run.log", "a", buffering=1)

    def left(self) -> float:
        return self.deadline - time.monotonic() - REPORT_RESERVE_S

    def sh(self, cmd: list[str], timeout: float, env: dict | None = None, log_to: Path | None = None) -> dict:
        """Run a command with its output in run.log (or ``log_to``); never raises."""
        t0 = time.monotonic()
        self.log.write(f"\n$ {' '.join(cmd)}   (timeout {timeout:.0f} s)\n")
        sink = open(log_to, "a", buffering=1) if log_to else self.log
        try:
            p = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=sink, stderr=subprocess.STDOUT,
                               timeout=max(1.0, timeout))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if log_to:
                sink.close()
        took = round(time.monotonic() - t0, 1)
        self.log.write(f"-> {rc} in {took} s\n")
        return {"rc": rc, "seconds": took}

    def step(self, name: str, cap_s: float, min_s: float, fn) -> None:
        left = self.left()
        if left < min_s:
            self.summary["steps"][name] = {"status": "skipped", "why": f"{left:.0f} s left of the budget, needs {min_s:.0f}"}
            return
        t0 = time.monotonic()
        print(f"== {name} (up to {min(cap_s, left):.0f} s)", flush=True)
        try:
            result = fn(min(cap_s, left))
        except Exception as e:  # noqa: BLE001 - one step's failure must not lose the others' results
            result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        result.setdefault("seconds", round(time.monotonic() - t0, 1))
        self.summary["steps"][name] = result
        print(f"   {result.get('status')} in {result['seconds']} s", flush=True)


# --- steps --------------------------------------------------------------------------------------------------------


def imports_ok(modules: list[str]) -> dict[str, str]:
    """``{module: "ok" or the error's last line}``, tried in one fresh interpreter (what the steps will see)."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "        out[m] = 'ok'\n    except BaseException as e:\n        out[m] = f'{type(e).__name__}: {e}'[:300]\n"
            "print(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True, text=True, timeout=300)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {m: f"interpreter failed: {r.stderr.strip()[-300:]}" for m in modules}


def env_step(run: Run, timeout: float) -> dict:
    info: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    code = ("import json, torch; d = {'torch': torch.__version__, 'cuda_build': torch.version.cuda, "
            "'cuda_available': torch.cuda.is_available()}\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0); d.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), "
            "capability=list(torch.cuda.get_device_capability(0)))\n"
            "print(json.dumps(d))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    info.update(json.loads(r.stdout) if r.returncode == 0 else {"torch_error": r.stderr[-500:]})
    info["imports"] = imports_ok(["transformer_lens", "sae_lens", "deployments.engine.capture", "ingress.backend",
                                  "ray", "ray.serve", "ingress.app"])
    run.summary["env"] = info
    ok = info.get("cuda_available") or run.dry_run
    return {"status": "ok" if ok else "failed", "why": None if ok else "torch sees no CUDA device"}


def tests_step(run: Run, timeout: float, pytest_args: list[str]) -> dict:
    xml = run.out / ".pytest-junit.xml"  # parsed into summary.json, then removed (the file limit)
    env = {"SAESERVE_GPU_TEST_DEVICE": run.device, "PYTHONUNBUFFERED": "1"}
    r = run.sh([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/gpu",
                f"--junitxml={xml}", "-o", "timeout=240", *pytest_args], timeout, env, log_to=run.out / "pytest.log")
    tests = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], (el.get("message") or "")[:300]
            tests.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", "outcome": outcome,
                          "seconds": round(float(case.get("time") or 0), 2), "message": message})
        xml.unlink()
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    status = "ok" if r["rc"] == 0 else ("timeout" if r["rc"] == "timeout" else "failed")
    return {"status": status, **r, "counts": counts, "tests": tests}


def bench_step(run: Run, timeout: float, shape: str, service: bool) -> dict:
    dev_tag = run.device.replace(":", "")
    out_json = run.out / f"{shape}-{dev_tag}.json"
    if run.dry_run:  # the harness's own tiny shape, a few requests: the same entry points in seconds
        args = ["--shape", "tiny", "--requests", "4", "--steer-requests", "1", "--concurrency", "1,2", "--max-seconds", "5"]
    else:
        args = ["--shape", shape, "--requests", "24", "--steer-requests", "8", "--concurrency", "1,8,16", "--max-seconds", "4"]
    cmd = [sys.executable, "-m", "benchmarks.run", *args, "--device", run.device, "--out", str(out_json)]
    if not service:
        cmd.append("--skip-service")
    env = {"SAESERVE_BENCH_DIR": os.environ.get("SAESERVE_BENCH_DIR", "/tmp/saeserve-bench"), "PYTHONUNBUFFERED": "1"}
    r = run.sh(cmd, timeout, env)
    result: dict = {"status": "ok" if r["rc"] == 0 else ("timeout" if r["rc"] == "timeout" else "failed"), **r,
                    "service": service, "service_why": run.summary.get("service_why"),
                    "json": out_json.name if out_json.is_file() else None}
    if out_json.is_file():
        data = json.loads(out_json.read_text())
        result["complete"] = bool(data.get("complete"))  # False: cut off by its timeout, cells so far kept
        result["targets"] = data.get("targets", [])
        result["gpu_targets"] = gpu_targets(data)
    return result


def gpu_targets(result: dict) -> list[dict]:
    """Issue 16's GPU targets on this run (informational; c=32 is not in this run's grid, so activation/all is
    read at c=16, its highest)."""
    out = []
    svc = result.get("service", [])
    for s in svc:
        if s["workload"] == "steer" and s["concurrency"] == 16 and s.get("tps_ratio"):
            out.append({"target": "steer/completion tok/s at c=16 >= 10x baseline", "value": round(s["tps_ratio"], 2),
                        "ok": s["tps_ratio"] >= 10})
        if s["workload"] in ("all-1", "all-3") and s["concurrency"] == 16 and s.get("rps_ratio"):
            out.append({"target": f"{s['workload']} req/s at c=16 (c=32 not run) >= 5x baseline",
                        "value": round(s["rps_ratio"], 2), "ok": s["rps_ratio"] >= 5})
    return out


# --- report -------------------------------------------------------------------------------------------------------


def markdown(summary: dict, out: Path) -> str:
    env = summary.get("env", {})
    lines = [f"# GPU check {'(dry run, CPU)' if summary['dry_run'] else ''}".rstrip(), "",
             f"- started {summary['started']}, budget {summary['budget_s']:.0f} s, took {summary.get('seconds', '?')} s",
             f"- GPU: {env.get('gpu', env.get('nvidia_smi', 'none'))}; torch {env.get('torch')} (CUDA build "
             f"{env.get('cuda_build')}); python {env.get('python')}; {env.get('cpus')} CPUs",
             "- imports: " + ", ".join(f"{k}: {v}" for k, v in env.get("imports", {}).items()), "",
             "| step | status | seconds | notes |", "| --- | --- | ---: | --- |"]
    for name, st in summary["steps"].items():
        note = st.get("why") or st.get("error") or ""
        if "counts" in st:
            note = ", ".join(f"{v} {k}" for k, v in st["counts"].items() if v)
        if name.startswith("bench-"):
            note = ("service over HTTP" if st.get("service") else f"baseline only ({st.get('service_why')})") + \
                (f"; {st['json']}" if st.get("json") else "") + ("" if st.get("complete", True) else " (partial)")
        lines.append(f"| {name} | {st.get('status')} | {st.get('seconds', '')} | {note} |")
    tests = summary["steps"].get("tests", {}).get("tests", [])
    bad = [t for t in tests if t["outcome"] in ("failed", "error")]
    if bad:
        lines += ["", "## Failing tests", ""] + [f"- `{t['test']}`: {t['message']}" for t in bad]
    sys.path.insert(0, str(REPO))
    from benchmarks.run import markdown_table, targets_text

    for name, st in summary["steps"].items():
        if name.startswith("bench-") and st.get("json"):
            data = json.loads((out / st["json"]).read_text())
            lines += ["", f"## {name}: {data['shape']} on {data['machine'].get('gpu', data['machine'].get('device'))}", ""]
            if data.get("baseline"):
                lines.append(markdown_table(data))
            checks = st.get("gpu_targets", [])  # the CPU targets in the JSON's "targets" are issue 8's
            if checks:
                lines += ["", targets_text(checks)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / ".bench" / "gpu-check"))
    p.add_argument("--budget-s", type=float, default=400, help="the whole run, report included")
    p.add_argument("--steps", default="env,tests," + ",".join(f"bench-{s}" for s in BENCH_SHAPES))
    p.add_argument("--dry-run", action="store_true", help="on the CPU: tests/gpu on cpu, the benchmark's tiny shape")
    p.add_argument("--service", choices=["auto", "on", "off"], default="auto",
                   help="benchmark the service over HTTP too (auto: when Ray Serve imports; off in a dry run)")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments for the tests step (e.g. '-k oom')")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, a.budget_s, a.dry_run)
    t0 = time.monotonic()
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = set(steps) - {"env", "tests", *(f"bench-{s}" for s in BENCH_SHAPES)}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}")
    if "env" in steps:
        run.step("env", 90, 5, lambda t: env_step(run, t))
    if a.service == "auto" and not a.dry_run:
        imports = run.summary.get("env", {}).get("imports") or imports_ok(["ray.serve", "ingress.app"])
        service = all(imports.get(m) == "ok" for m in ("ray.serve", "ingress.app"))
    else:
        imports, service = {}, a.service == "on"
    run.summary["service"] = service
    run.summary["service_why"] = (None if service else "--service off" if a.service == "off" else
                                  "a dry run (--service on to include it)" if a.dry_run else
                                  "Ray Serve does not import: " + "; ".join(f"{m}: {imports.get(m)}" for m in ("ray.serve", "ingress.app")))
    if "tests" in steps:
        run.step("tests", 150, 30, lambda t: tests_step(run, t, a.pytest_args.split()))
    caps = {"gpt2-small": (120, 40), "gemma-2-2b": (180, 60)}  # (cap, least worth starting), seconds
    for shape in BENCH_SHAPES:
        if f"bench-{shape}" in steps:
            cap, least = caps[shape]
            run.step(f"bench-{shape}", cap, least if not a.dry_run else 20, lambda t, s=shape: bench_step(run, t, s, service))
    run.summary["seconds"] = round(time.monotonic() - t0, 1)
    (out / "summary.json").write_text(json.dumps(run.summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(run.summary, out))
    print((out / "summary.md").read_text())
    failed = [n for n, s in run.summary["steps"].items() if s.get("status") not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
