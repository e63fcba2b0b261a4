"""One benchmark run on one machine: the serialized in-process baseline, then the service over HTTP.

    python -m benchmarks.run                                   # gpt2-small shape, CPU, concurrency 1,8,32
    python -m benchmarks.run --shape demo --requests 16 --concurrency 1,8 --only all-1,topk
    python -m benchmarks.run --device cuda                     # model and SAEs on the GPU (baseline too)

Prints a markdown table (p50/p95 latency, requests/s, tokens/s, and each ratio to the baseline) and writes JSON
(default ``benchmarks/results/<shape>-<device>.json``; ``python -m benchmarks.report`` renders it into the README).
Tokens/s counts prompt tokens read for activation workloads and new tokens written for steering (2 x 32 a request).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")  # the service's default ingress (--serve-env ...=0 for Serve's proxy)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deployments import stage_trace  # noqa: E402

from . import stages  # noqa: E402
from .load import CellResult, pooled, run_concurrent, run_serial  # noqa: E402
from .shapes import SHAPES, Shape, ensure_pack, resolve_layers  # noqa: E402
from .workloads import WORKLOADS, Workload, make_prompts  # noqa: E402

# The issues' targets, per shape: same-run ratios against the serialized in-process baseline (issues 14 and 17).
TARGETS = {
    "demo": {"rps": {("all-set", 16): 2.0}, "rps_or_http_share": {("all-set", 16): 0.75}, "added_p50_ms": {"all-set": 15.0}},
    "wide": {"rps": {("all-set", 16): 1.5}},
    "gpt2-small": {"rps": {(w, 32): 1.3 for w in ("all-1", "all-3", "single", "topk")},
                   "added_p50_ms": {w: 30.0 for w in ("all-1", "all-3", "single", "topk")},
                   "tps": {("steer", 32): 10.0, ("steer", 1): 1.0}},
}


def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "device": device, "torch_threads": torch.get_num_threads()}
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                                capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --- the baseline ----------------------------------------------------------------------------------------


def run_baseline(pack: Path, shape: Shape, workloads: list[Workload], prompts: list[tuple[str, int]], n: int,
                 max_seconds: float, device: str, steer_n: int, dtype: str = "float32") -> dict[str, CellResult]:
    from .baseline import Baseline

    b = Baseline(pack, shape, device, dtype)
    out = {}
    for w in workloads:
        def call(i: int, w=w) -> int:
            text, ntok = prompts[i % len(prompts)]
            b.run(w, text, i)
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            return w.units(ntok)

        out[w.name] = run_serial(w.name, call, steer_n if w.kind == "steer" else n, max_seconds)
        r = out[w.name]
        print(f"  baseline {w.name:7s} n={r.requests:3d} p50 {r.pct(.5):8.1f} ms  {r.rps:7.2f} req/s  {r.tps:9.0f} tok/s",
              flush=True)
    b = None  # release the baseline's weights before the service starts
    import gc

    gc.collect()
    return out


# --- the service -----------------------------------------------------------------------------------------


def app_args_for(pack: Path, shape: Shape, device: str, overrides: dict, deployment_options: dict,
                 torch_threads: int | None = None) -> dict:
    from .service import pinned_options, threads_options

    if torch_threads:
        deployment_options = {**threads_options(torch_threads), **deployment_options}
    args = dict(model=str(pack), sae_sets=[shape.set_name], device=device, token_limit=max(200, shape.prompt_tokens[1]),
                deployment_options=pinned_options(deployment_options))
    args.update(overrides)
    return args


class Profiler:
    """py-spy ``record`` (raw collapsed stacks) on every Serve replica and the HTTP proxy during one cell."""

    def __init__(self, out_dir: Path, tag: str):
        from .service import replica_pids

        out_dir.mkdir(parents=True, exist_ok=True)
        # py-spy is installed beside this interpreter (the venv's bin), which need not be on PATH.
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.procs = []
        for name, pid in replica_pids().items():
            f = out_dir / f"{tag}-{name}-{pid}.txt"
            self.procs.append(subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                                "--output", str(f), "--nonblocking", "--threads", "--subprocesses"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def capture_stats() -> dict | None:
    """ModelDeployment's capture counters and SAEShard's call counts (one pinned replica each), and every service
    process's CPU seconds so far; None for what cannot be read."""
    from concurrent.futures import ThreadPoolExecutor

    from .service import process_cpu

    def read():
        from ray import serve

        model = serve.get_deployment_handle("ModelDeployment", app_name="saeserve").capture_stats.remote().result(timeout_s=30)
        shard = serve.get_deployment_handle("SAEShard", app_name="saeserve").metrics.remote().result(timeout_s=30)
        return {**model, "shard_calls": shard.get("calls", {})}

    try:  # from a plain thread: Serve refuses blocking handle calls on a thread running an event loop
        with ThreadPoolExecutor(1) as ex:
            out = ex.submit(read).result()
    except Exception as e:  # a benchmark must not fail on its diagnostics
        print(f"  (capture stats unavailable: {type(e).__name__}: {e})", flush=True)
        out = {}
    out["cpu"] = process_cpu()
    # this process: the load generator's HTTP clients (and an idle Ray driver), which share the CPUs with the service
    t = os.times()
    out["cpu"]["client"] = t.user + t.system
    return out


def capture_delta(before: dict | None, after: dict | None, requests: int = 0) -> dict | None:
    if not before or not after:
        return None
    d: dict = {}
    if requests:
        cpu = {k: after["cpu"].get(k, 0.0) - before["cpu"].get(k, 0.0) for k in after.get("cpu", {})}
        d["cpu_ms_per_request"] = {k: round(1000 * v / requests, 2) for k, v in sorted(cpu.items())}
        # Serve handle calls, and calls on direct lanes (deployments.direct), into ModelDeployment and SAEShard
        calls = lambda st: sum((st.get("calls") or {}).get(m, 0) for m in ("features", "capture")) + sum(  # noqa: E731
            n for m, n in (st.get("shard_calls") or {}).items() if m != "direct_run")
        direct = lambda st: (st.get("calls") or {}).get("features_direct", 0) + (  # noqa: E731
            st.get("shard_calls") or {}).get("direct_run", 0)
        if "calls" in after:
            d["handle_calls_per_request"] = round((calls(after) - calls(before)) / requests, 3)
            d["direct_calls_per_request"] = round((direct(after) - direct(before)) / requests, 3)
    if "batches" not in after or "batches" not in before:
        return d
    d.update({k: after[k] - before[k] for k in ("batches", "prompts", "tokens", "forward_s")})
    if d["batches"]:
        d["prompts_per_batch"] = d["prompts"] / d["batches"]
    if d["prompts"]:
        d["forward_ms_per_prompt"] = 1000 * d["forward_s"] / d["prompts"]
    tasks = (after.get("compute") or {}).get("tasks", 0) - (before.get("compute") or {}).get("tasks", 0)
    if tasks:  # the model replica's compute tasks that ran as CPU bursts (engine.compute)
        d["burst_share"] = (after["compute"]["burst_tasks"] - before["compute"]["burst_tasks"]) / tasks
    return d


async def run_service_cells(base: str, shape: Shape, workloads: list[Workload], prompts: list[tuple[str, int]],
                            n: int, concurrency: list[int], max_seconds: float, steer_n: int,
                            profile: tuple[str, int] | None, profile_dir: Path | None,
                            on_cell=lambda cells: None, client: str = "raw",
                            stages_dir: str | None = None) -> list[CellResult]:
    import httpx

    from .rawclient import RawPool

    out = []
    limits = httpx.Limits(max_connections=max(concurrency) + 4, max_keepalive_connections=max(concurrency) + 4)
    errors = (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError)
    async with (httpx.AsyncClient(base_url=base, timeout=600, limits=limits) if client == "httpx"
                else RawPool(base)) as session:
        for w in workloads:
            async def send(i: int, w=w):
                text, ntok = prompts[i % len(prompts)]
                try:
                    r = await session.post(w.route, json=w.body(shape, text, i))
                except errors as e:
                    return False, 0, f"{type(e).__name__}: {e}"
                if r.status_code != 200:
                    return False, 0, f"{r.status_code}: {r.text[:300]}"
                return True, w.units(ntok), None

            for c in concurrency:
                count = max(steer_n if w.kind == "steer" else n, c)
                prof = None
                if profile and profile == (w.name, c):
                    prof = Profiler(profile_dir, f"{w.name}-c{c}")
                before: list[dict | None] = []
                window = []
                try:
                    r = await run_concurrent(w.name, send, count, c, max_seconds, warmup=min(max(c, 2), 8 if w.kind == "steer" else 32),
                                             on_measure=lambda: (before.append(capture_stats()), window.append(time.time())))
                    window.append(time.time())
                finally:
                    if prof:
                        prof.stop()
                r.model = capture_delta(before[0] if before else None, capture_stats(), r.requests)
                if stages_dir and r.model is not None and len(window) == 2:
                    s = stages.summary(stage_trace.read(stages_dir), *window)
                    if s:
                        r.model["stages"] = s
                out.append(r)
                on_cell(out)
                m = r.model
                print(f"  service  {w.name:7s} c={c:<3d} n={r.requests:3d} err={r.errors} p50 {r.pct(.5):8.1f} ms  "
                      f"p95 {r.pct(.95):8.1f} ms  {r.rps:7.2f} req/s  {r.tps:9.0f} tok/s"
                      + (f"  model: {m['prompts_per_batch']:.1f} prompts/batch, {m['forward_ms_per_prompt']:.0f} ms/prompt"
                         if m and m.get("prompts") else "")
                      + (f", {100 * m['burst_share']:.0f}% of tasks burst" if m and "burst_share" in m else "")
                      + (f"  calls/req {m['handle_calls_per_request']} handle, {m.get('direct_calls_per_request', 0)} direct"
                         if m and "handle_calls_per_request" in m else "")
                      + (f"  CPU ms/req {m['cpu_ms_per_request']}" if m and m.get("cpu_ms_per_request") else "")
                      + (f"  first error: {r.first_error}" if r.first_error else ""), flush=True)
                if m and m.get("stages"):
                    print(stages.line(m["stages"]), flush=True)
    return out


def steer_served() -> bool:
    """Whether this checkout's app has the steering route (added separately from the activation API)."""
    from ingress.app import app

    return "/v1/steer/completion" in app.openapi().get("paths", {})


# --- results ---------------------------------------------------------------------------------------------


def ratios(baseline: dict, service: list[dict]) -> list[dict]:
    rows = []
    for s in service:
        b = baseline.get(s["workload"])
        if not b:
            continue
        rows.append({**s, "rps_ratio": s["rps"] / b["rps"] if b["rps"] else None,
                     "tps_ratio": s["tps"] / b["tps"] if b["tps"] else None,
                     "added_p50_ms": s["p50_ms"] - b["p50_ms"], "p50_ratio": s["p50_ms"] / b["p50_ms"] if b["p50_ms"] else None})
    return rows


def check_targets(result: dict) -> list[dict]:
    """The issues' targets for this run's shape (informational: tests never assert timings)."""
    targets = TARGETS.get(result.get("shape"), {})
    cell = {(s["workload"], s["concurrency"]): s for s in result["service"]}
    checks = []
    for (w, c), want in targets.get("rps", {}).items():
        s = cell.get((w, c))
        if not s or s.get("rps_ratio") is None:
            continue
        share = targets.get("rps_or_http_share", {}).get((w, c))
        http = cell.get(("tokenize", c))
        if share is not None and http and http.get("rps"):
            # the lower of the two bars: want x the baseline, or share x what the HTTP path alone carries
            bar = min(want * s["rps"] / s["rps_ratio"], share * http["rps"])
            checks.append(dict(target=f"{w} req/s at concurrency {c} >= min({want}x baseline, {share:.0%} of tokenize's "
                                      f"{http['rps']:.0f} req/s) = {bar:.1f}", value=round(s["rps"], 2), at=c,
                               ok=s["rps"] >= bar))
        else:
            checks.append(dict(target=f"{w} req/s at concurrency {c} >= {want}x baseline", value=round(s["rps_ratio"], 2),
                               at=c, ok=s["rps_ratio"] >= want))
    for (w, c), want in targets.get("tps", {}).items():
        s = cell.get((w, c))
        if s and s.get("tps_ratio") is not None:
            checks.append(dict(target=f"{w} tok/s at concurrency {c} >= {want}x baseline", value=round(s["tps_ratio"], 2),
                               at=c, ok=s["tps_ratio"] >= want))
    for w, most in targets.get("added_p50_ms", {}).items():
        s = cell.get((w, 1))
        if s and s.get("added_p50_ms") is not None:
            checks.append(dict(target=f"{w} added p50 at concurrency 1 <= {most:.0f} ms", value=round(s["added_p50_ms"], 1),
                               at=1, ok=s["added_p50_ms"] <= most))
    return checks


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def markdown_table(result: dict) -> str:
    labels = {w.name: w.label for w in WORKLOADS.values()}
    lines = ["| workload | conc. | n | p50 ms | p95 ms | req/s | tok/s | × req/s | × tok/s | p50 − baseline ms | prompts / forward pass "
             "| calls / req: handle · direct | CPU ms / req: proxy · ingress · model · shard · ray · client |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def per_batch(s: dict) -> str:
        m = s.get("model") or {}
        return f"{m['prompts_per_batch']:.1f}" if m.get("prompts_per_batch") else "–"

    def calls(s: dict) -> str:
        m = s.get("model") or {}
        if m.get("handle_calls_per_request") is None:
            return "–"
        return f"{m['handle_calls_per_request']:.2f} · {m.get('direct_calls_per_request', 0):.2f}"

    def cpu(s: dict) -> str:
        c = (s.get("model") or {}).get("cpu_ms_per_request") or {}
        if not c:
            return "–"
        proxy = c.get("proxy", 0.0) + c.get("haproxy", 0.0)
        return " · ".join(f"{v:.1f}" for v in (proxy, c.get("ingress", 0.0), c.get("model", 0.0), c.get("shard", 0.0),
                                                c.get("ray", 0.0))) + (f" · {c['client']:.1f}" if "client" in c else "")

    for name, b in result["baseline"].items():
        lines.append(f"| {labels.get(name, name)} — **baseline** (serial, in-process) | 1 | {b['requests']} | {b['p50_ms']:.1f} | "
                     f"{b['p95_ms']:.1f} | {b['rps']:.2f} | {b['tps']:,.0f} | 1 | 1 | 0 | 1 | 0 | – |")
        for s in result["service"]:
            if s["workload"] != name:
                continue
            err = f" ({s['errors']} errors)" if s["errors"] else ""
            lines.append(f"| {labels.get(name, name)} — service | {s['concurrency']} | {s['requests']}{err} | {s['p50_ms']:.1f} | "
                         f"{s['p95_ms']:.1f} | {s['rps']:.2f} | {s['tps']:,.0f} | {_f(s.get('rps_ratio'), '.2f')} | "
                         f"{_f(s.get('tps_ratio'), '.2f')} | {_f(s.get('added_p50_ms'), '+.1f')} | {per_batch(s)} | {calls(s)} | "
                         f"{cpu(s)} |")
    return "\n".join(lines)


def targets_text(checks: list[dict]) -> str:
    return "\n".join(f"- {'PASS' if c['ok'] else 'MISS'}: {c['target']}: {c['value']}" for c in checks)


def parse_kv(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def save(out: Path, result: dict) -> None:
    """Write the result (``complete`` only once the run ended), atomically: a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"complete": False, **result}, indent=1) + "\n")
    tmp.replace(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    p.add_argument("--requests", type=int, default=64, help="measured requests per cell (service) and for the baseline")
    p.add_argument("--steer-requests", type=int, default=16, help="the same for steer/completion (slow on a CPU)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated workloads of {list(WORKLOADS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (model and SAEs, baseline and service alike)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model and SAE dtype, baseline and service alike (default: the shape's)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<shape>-<device>.json)")
    p.add_argument("--max-seconds", type=float, default=90, help="stop dispatching a cell's requests after this")
    p.add_argument("--app-arg", action="append", default=[], metavar="KEY=JSON", help="AppArgs override (repeatable)")
    p.add_argument("--deployment-options", default="{}", help="JSON merged over one pinned replica per deployment")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads in ModelDeployment and SAEShard (Ray gives fractional-CPU actors 1)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the whole Ray cluster this run starts (e.g. RAY_SERVE_ENABLE_HA_PROXY=1); repeatable")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="the load generator's HTTP client: raw (benchmarks.rawclient: kept-alive sockets, little CPU) "
                        "or httpx (3-4 ms of CPU a request, taken from the service's cores)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--baseline-once", action="store_true",
                   help="measure the baseline only before the service (default: before and after, pooled)")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--profile", default=None, metavar="WORKLOAD:CONC", help="py-spy every replica during that cell")
    p.add_argument("--profile-dir", default=str(REPO / ".bench" / "profiles"))
    p.add_argument("--stages", action="store_true",
                   help="the replicas mark their stages (deployments.stage_trace); each feature cell reports how an "
                        "ingress call's time splits between compute and hops (benchmarks.stages)")
    a = p.parse_args(argv)
    serve_env = dict(kv.split("=", 1) for kv in a.serve_env)
    if a.stages:
        serve_env[stage_trace.ENV] = tempfile.mkdtemp(prefix="saeserve-stages-")
    os.environ.update(serve_env)  # before Ray is imported: Serve reads its settings from the environment at import
    from ingress import haproxy_env

    haproxy_env.isolate()  # apart from any other Ray with HAProxy on this machine (a test run, make serve)
    haproxy_env.defaults()  # the service's HAProxy settings, unless --serve-env names them

    shape = SHAPES[a.shape]
    dtype = a.dtype or shape.dtype
    concurrency = [int(c) for c in a.concurrency.split(",") if c]
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    workloads = [WORKLOADS[n] for n in names]
    dev_tag = "cpu" if a.device == "cpu" else a.device.replace(":", "")
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"{a.shape}-{dev_tag}.json"

    print(f"# shape {shape.name}: preparing pack", flush=True)
    pack = ensure_pack(shape)
    shape = resolve_layers(shape, pack)
    from deployments.engine.pack import load_tokenizer

    prompts = make_prompts(load_tokenizer(pack / "model"), shape, 256)
    result = {"shape": shape.name, "pack": str(pack), "started": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(a.device), "loadavg_start": loadavg(),
              "settings": {"requests": a.requests, "steer_requests": a.steer_requests, "concurrency": concurrency,
                           "dtype": dtype,
                           "workloads": names, "max_seconds": a.max_seconds, "client": a.client,
                           "prompt_tokens": [min(n for _, n in prompts), max(n for _, n in prompts)]},
              "baseline": {}, "service": []}

    steer_ok = None if a.skip_service else steer_served()  # the baseline alone needs no route
    if steer_ok is False and any(w.kind == "steer" for w in workloads):
        print("# /v1/steer/completion is not served by this checkout: skipping steer", flush=True)
        workloads = [w for w in workloads if w.kind != "steer"]
    if not a.skip_baseline:
        print("# baseline: TransformerLens + SAE Lens, in-process, one request at a time", flush=True)
        base_cells = run_baseline(pack, shape, workloads, prompts, a.requests, a.max_seconds, a.device, a.steer_requests,
                                  dtype)
        result["baseline"] = {k: v.summary() for k, v in base_cells.items()}
        save(out, result)  # so far: a run stopped by a timeout keeps what it measured
    if not a.skip_service:
        from . import service

        app_args = app_args_for(pack, shape, a.device, {"model_dtype": dtype, "sae_dtype": dtype, **parse_kv(a.app_arg)},
                                json.loads(a.deployment_options), a.torch_threads)
        result["settings"]["app_args"] = {k: v for k, v in app_args.items() if k != "model"}
        result["settings"]["serve_env"] = serve_env
        print(f"# starting the service ({shape.name}, {a.device})", flush=True)
        base = service.start(app_args)
        print(f"# service over HTTP at concurrency {concurrency}", flush=True)
        profile = None
        if a.profile:
            w, _, c = a.profile.partition(":")
            profile = (w, int(c or 1))
        try:
            def partial(cells):
                save(out, {**result, "service": ratios(result["baseline"], [c.summary() for c in cells])
                           if result["baseline"] else [c.summary() for c in cells]})

            cells = asyncio.run(run_service_cells(base, shape, workloads, prompts, a.requests, concurrency,
                                                  a.max_seconds, a.steer_requests, profile, Path(a.profile_dir),
                                                  on_cell=partial, client=a.client,
                                                  stages_dir=serve_env.get(stage_trace.ENV)))
        finally:
            service.stop()
        result["service"] = [c.summary() for c in cells]
    if not a.skip_baseline and not a.skip_service and not a.baseline_once:
        # Again after the service, pooled with the first: this machine's speed drifts by tens of percent within
        # minutes, and a baseline measured only before would give the whole drift to the ratios.
        print("# baseline again, after the service", flush=True)
        after = run_baseline(pack, shape, workloads, prompts, a.requests, a.max_seconds, a.device, a.steer_requests, dtype)
        result["baseline_runs"] = {"before": result["baseline"], "after": {k: v.summary() for k, v in after.items()}}
        result["baseline"] = {k: pooled(base_cells[k], after[k]).summary() if k in after else v.summary()
                              for k, v in base_cells.items()}
    result["steer_served"] = steer_ok
    result["service"] = ratios(result["baseline"], result["service"]) if result["baseline"] else result["service"]
    result["targets"] = check_targets(result)
    result["loadavg_end"] = loadavg()
    result["complete"] = True
    save(out, result)
    print(f"\n## {shape.name} on {result['machine'].get('cpu_model', a.device)} ({a.device}), load average "
          f"{result['loadavg_start']} -> {result['loadavg_end']}\n")
    if result["baseline"]:
        print(markdown_table(result))
    print("\n" + targets_text(result["targets"]))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()

