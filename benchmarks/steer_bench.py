"""Generation benchmarks, in process and Ray-free (engine only: the batching and the decode step, not HTTP or Ray).

    python -m benchmarks.steer_bench                     # all four on models/demo-lm (or a random pack), CPU
    python -m benchmarks.steer_bench --what join,steps --pack /tmp/pack --out /tmp/steer.json

Four measurements, each a same-run ratio:

- ``join``        a short seeded request (4 new tokens, STEERED + DEFAULT) submitted while six 110-token requests
                  decode: its latency against the same request alone (continuous batching: it joins at the next step);
- ``steps``       decode steps per second with 16 rows: the engine against TransformerLens ``generate`` on the same
                  batch (greedy, KV cache), unsteered and with one steering vector on every row;
- ``concurrency`` closed-loop clients at concurrency 1, 8, 32, 64 (each request STEERED + DEFAULT, 32 new tokens,
                  seeded sampling), steps run as ModelDeployment runs them (wide tasks: ``--lanes``): new tokens/s
                  and latency percentiles, against TransformerLens serially (one request after another, ``generate``
                  with the hook, STEERED then DEFAULT, on as many threads as the lanes);
- ``alone``       whether each concurrency run's outputs equal the same requests run alone (the batch-invariance
                  promise; must be true on CPU);
- ``wave``        (not by default) the service's steering cell as the engine sees it: 32 requests at once, STEERED at
                  two thirds of the depth + DEFAULT, 48-80 token prompts; prefill and decode seconds on one lane
                  against several, alternating.

Prints markdown tables and writes JSON. ``--threads`` (default 1, what a Ray replica with a fractional CPU gets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deployments.engine.generate import GenerationEngine, GenerationRequest, GenerationScheduler, generate, tokens_of  # noqa: E402
from deployments.engine.pack import load_model_dir  # noqa: E402
from deployments.engine.steering import SteerVector  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
STRENGTH = 8.0
MAX_LEN = [456]  # KV positions per row slot: the server's token_limit + max_completion_tokens (200 + 256)


def steering_vector(model) -> np.ndarray:
    vec = np.random.RandomState(0).randn(model.cfg.d_model).astype(np.float32)
    return vec / np.linalg.norm(vec)


def pair(model, i: int, new_tokens: int, temperature: float = 0.7) -> list[GenerationRequest]:
    """A steer/completion request: its STEERED and DEFAULT rows."""
    tok = model.tokenizer
    ids = [tok.bos_token_id, *tok(f"the cat number {i} sat on the", add_special_tokens=False)["input_ids"]]
    common = dict(tokens=ids, max_new_tokens=new_tokens, temperature=temperature, seed=i, stop_tokens=[])
    return [GenerationRequest(**common, steering=[SteerVector(HOOK, steering_vector(model), STRENGTH)]),
            GenerationRequest(**common)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _consume(sub) -> list[list[int]]:
    toks = [[] for _ in sub.requests]
    async for events in sub:
        for e in events:
            if e.token is not None:
                toks[e.row].append(e.token)
    return toks


# --- join ---------------------------------------------------------------------------------------------------------


def bench_join(model, rows: int, repeats: int) -> dict:
    short = pair(model, 999, 4)

    async def alone() -> float:
        sched = GenerationScheduler(model, max_rows=rows, max_len=MAX_LEN[0])
        t0 = time.perf_counter()
        await _consume(sched.submit(short))
        return time.perf_counter() - t0

    async def joining() -> tuple[float, dict]:
        sched = GenerationScheduler(model, max_rows=rows, max_len=MAX_LEN[0])
        longs = [sched.submit(pair(model, i, 110)) for i in range(6)]
        tasks = [asyncio.ensure_future(_consume(s)) for s in longs]
        while sched.stats["decode_steps"] < 10:  # the six are decoding
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        await _consume(sched.submit(short))
        dt = time.perf_counter() - t0
        still = sched.stats["active_rows"]
        await asyncio.gather(*tasks)
        return dt, {"active_rows_when_done": still, **{k: sched.stats[k] for k in ("rows_joined_mid_flight", "mean_step_ms")}}

    asyncio.run(alone())  # warm-up
    t_alone, t_join, info = [], [], {}
    for _ in range(repeats):
        t_alone.append(asyncio.run(alone()))
        dt, info = asyncio.run(joining())
        t_join.append(dt)
    a, j = statistics.median(t_alone), statistics.median(t_join)
    return {"alone_s": a, "joining_s": j, "ratio": j / a, "repeats": repeats, "alone_all": t_alone, "joining_all": t_join,
            **info}


# --- decode steps per second -----------------------------------------------------------------------------------


def bench_steps(model, n_rows: int, new_tokens: int, repeats: int) -> dict:
    """Paired trials, alternating engine and TransformerLens, so that load from elsewhere on the machine hits both:
    the ratio is the median of the per-pair ratios."""
    reqs = [pair(model, i, new_tokens, temperature=0.0)[1] for i in range(n_rows)]
    vec = torch.as_tensor(steering_vector(model))
    n = max(len(r.tokens) for r in reqs)
    toks = torch.tensor([r.tokens + [r.tokens[-1]] * (n - len(r.tokens)) for r in reqs])  # same length: no padding
    out = {}
    for steered in (False, True):
        steering = [SteerVector(HOOK, vec.numpy(), STRENGTH)] if steered else []
        rows = [GenerationRequest(tokens=t, max_new_tokens=new_tokens, stop_tokens=[], steering=steering) for t in toks.tolist()]
        hooks = [(HOOK, lambda act, hook: act + STRENGTH * vec)] if steered else []
        ours, tl = [], []
        for _ in range(repeats):
            eng = GenerationEngine(model, capacity=n_rows, max_len=MAX_LEN[0])
            eng.add(rows)
            t0 = time.perf_counter()
            while not eng.idle:
                eng.step()
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with model.hooks(fwd_hooks=hooks):
                model.generate(toks, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False, verbose=False,
                               use_past_kv_cache=True)
            tl.append(time.perf_counter() - t0)
        out["steered" if steered else "unsteered"] = {
            "engine_steps_per_s": new_tokens / statistics.median(ours),
            "transformer_lens_steps_per_s": new_tokens / statistics.median(tl),
            "ratio": statistics.median([t / o for t, o in zip(tl, ours)]), "engine_s": ours, "transformer_lens_s": tl}
    return {"rows": n_rows, "new_tokens": new_tokens, **out}


# --- a wave of the service's steering requests ---------------------------------------------------------------------


def bench_wave(model, n_requests: int, new_tokens: int, repeats: int, lanes: int, rows: int) -> dict:
    """What the service's steer/completion cell hands the engine at concurrency ``n_requests``: that many requests
    at once, each STEERED (a unit vector x 10 at ``blocks.{2L/3}.hook_resid_post``, like an SAE feature at layer 8
    of 12) + DEFAULT, prompts of 48-80 tokens, ``new_tokens`` sampled tokens. Prefill and decode times, one lane
    against ``lanes`` (alternating, ``repeats`` pairs; one lane only if ``lanes`` is 1)."""
    import random

    from deployments.engine.compute import ComputeThread

    rng = random.Random(0)
    tok = model.tokenizer
    hook = f"blocks.{2 * model.cfg.n_layers // 3}.hook_resid_post"
    vec = steering_vector(model)
    reqs = []
    for i in range(n_requests):
        ids = [tok.bos_token_id] + [rng.randrange(model.cfg.d_vocab) for _ in range(rng.randint(48, 80) - 1)]
        common = dict(tokens=ids, max_new_tokens=new_tokens, temperature=0.5, seed=16, stop_tokens=[])
        reqs.append([GenerationRequest(**common, steering=[SteerVector(hook, vec, 10.0)]), GenerationRequest(**common)])
    compute = ComputeThread("wave", torch_threads=torch.get_num_threads(),
                            burst_threads=lanes * torch.get_num_threads() if lanes > 1 else None)
    try:
        # (lanes 1 runs on code without lanes too: the comparison with an earlier commit)
        kw = {"compute": compute} if lanes > 1 else {}
        eng = compute.call(lambda: GenerationEngine(model, capacity=rows, max_len=MAX_LEN[0], **kw))
        runs = {1: [], lanes: []}
        for k in range(repeats * len(runs)):
            w = (1, lanes)[k % len(runs)]
            step = (lambda: compute._submit(eng.step, False, True).result()) if w > 1 else (lambda: compute.call(eng.step))
            for r in reqs:
                eng.add(r, owner=object())
            t0 = time.perf_counter()
            step()  # admits and prefills every row, then one decode step
            t1 = time.perf_counter()
            steps = 0
            while not eng.idle:
                step()
                steps += 1
            t2 = time.perf_counter()
            runs[w].append({"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps,
                            "tokens_per_s": 2 * n_requests * new_tokens / (t2 - t0)})
    finally:
        compute.shutdown()
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    out = {"requests": n_requests, "hook": hook, "new_tokens": new_tokens, "lanes": lanes,
           "prefill_rows_shared": eng.stats.get("prefill_rows_shared"), "runs": {str(k): v for k, v in runs.items()}}
    for w, xs in runs.items():
        out[f"lanes_{w}"] = {k: med(xs, k) for k in ("prefill_s", "decode_s", "tokens_per_s")}
    return out


# --- concurrency ---------------------------------------------------------------------------------------------------


def baseline_serial(model, reqs: list[list[GenerationRequest]]) -> dict:
    """TransformerLens one request at a time: STEERED (hook) then DEFAULT, each ``generate`` with sampling."""
    vec = torch.as_tensor(steering_vector(model))
    t0 = time.perf_counter()
    lat, n_tok = [], 0
    for p in reqs:
        t1 = time.perf_counter()
        toks = torch.tensor([p[0].tokens])
        for hooks in ([(HOOK, lambda act, hook: act + STRENGTH * vec)], []):
            with model.hooks(fwd_hooks=hooks):
                out = model.generate(toks, max_new_tokens=p[0].max_new_tokens, do_sample=True, temperature=p[0].temperature,
                                     stop_at_eos=False, verbose=False, use_past_kv_cache=True)
            n_tok += out.shape[1] - toks.shape[1]
        lat.append(time.perf_counter() - t1)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": n_tok, "tokens_per_s": n_tok / dt, "p50_ms": 1e3 * pct(lat, 50)}


def bench_concurrency(model, levels: list[int], per_client: int, new_tokens: int, rows: int, lanes: int = 1) -> dict:
    """Steps run as ModelDeployment runs them: wide tasks on a ComputeThread, split between ``lanes`` when they
    do enough work (1: no lanes); the serial baseline then gets as many torch threads."""
    from deployments.engine.compute import ComputeThread

    compute = ComputeThread("bench", torch_threads=torch.get_num_threads(),
                            burst_threads=lanes * torch.get_num_threads() if lanes > 1 else None)
    out = {}
    for c in levels:
        n_req = max(c * per_client, 8)
        reqs = [pair(model, i, new_tokens) for i in range(n_req)]

        async def go():
            sched = GenerationScheduler(model, max_rows=rows, max_len=MAX_LEN[0], compute=compute)
            queue = list(range(n_req))
            lat, outs = [], {}

            async def client():
                while queue:
                    i = queue.pop(0)
                    t0 = time.perf_counter()
                    outs[i] = await _consume(sched.submit(reqs[i]))
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(c)))
            return time.perf_counter() - t0, lat, outs, sched.stats

        dt, lat, outs, st = asyncio.run(go())
        n_tok = sum(len(t) for o in outs.values() for t in o)
        # the promise: each request's text equals the same request alone (checked on a sample, to keep it short)
        sample = list(range(0, n_req, max(1, n_req // 4)))
        alone_ok = all([tokens_of(ev) for ev in generate(model, reqs[i], capacity=rows, max_len=MAX_LEN[0])] == outs[i] for i in sample)
        out[str(c)] = {"requests": n_req, "seconds": dt, "tokens": n_tok, "tokens_per_s": n_tok / dt,
                       "p50_ms": 1e3 * pct(lat, 50), "p90_ms": 1e3 * pct(lat, 90), "p99_ms": 1e3 * pct(lat, 99),
                       "mean_active_rows": st["mean_active_rows"], "slot_occupancy": st["slot_occupancy"],
                       "mean_step_ms": st["mean_step_ms"], "rows_joined_mid_flight": st["rows_joined_mid_flight"],
                       "wide_steps": st["wide_steps"], "prefill_rows_shared": st["prefill_rows_shared"],
                       "equals_alone": alone_ok}
    compute.shutdown()
    narrow = torch.get_num_threads()
    torch.set_num_threads(narrow * lanes)  # the baseline may use every core the lanes do
    try:
        base = baseline_serial(model, [pair(model, i, new_tokens) for i in range(4)])
    finally:
        torch.set_num_threads(narrow)
    base["torch_threads"] = narrow * lanes
    for r in out.values():
        r["x_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
    return {"new_tokens": new_tokens, "rows": rows, "levels": out, "baseline_serial": base}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="join,steps,concurrency",
                   help="comma-separated: join, steps, concurrency, wave")
    p.add_argument("--wave-requests", type=int, default=32, help="requests in the wave measurement")
    p.add_argument("--pack", default=None, help="model pack (default models/demo-lm, else a random pack)")
    p.add_argument("--rows", type=int, default=64, help="generation row slots (the server's generate_rows)")
    p.add_argument("--levels", default="1,8,32,64", help="client concurrencies")
    p.add_argument("--per-client", type=int, default=2, help="requests per client in the concurrency runs")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    p.add_argument("--lanes", type=int, default=None,
                   help="concurrency runs: lanes a step may split into, as ModelDeployment's (default: the CPUs this "
                        "process may use over --threads; 1: none); the serial baseline gets lanes x threads")
    p.add_argument("--max-len", type=int, default=456, help="KV positions per row slot (capped by the model's n_ctx)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/steer/steer-bench.json: not in "
                   "results/, whose *.json benchmarks.report reads)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    MAX_LEN[0] = a.max_len
    if a.threads:
        torch.set_num_threads(a.threads)
    pack = Path(a.pack) if a.pack else Path(__file__).resolve().parents[1] / "models" / "demo-lm"
    if not (pack / "model" / "config.json").is_file():
        from scripts.make_random_pack import write_random_pack

        pack = write_random_pack(Path(tempfile.mkdtemp()) / "pack")
    model = load_model_dir(pack)
    what = set(a.what.split(","))
    results = {"pack": str(pack), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "loadavg_start": os.getloadavg()}}
    print(f"\n{pack.name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    if "join" in what:
        j = results["join"] = bench_join(model, a.rows, a.repeats)
        print(f"join: a 4-token request (STEERED + DEFAULT) alone {1e3 * j['alone_s']:.0f} ms, joining six 110-token "
              f"requests {1e3 * j['joining_s']:.0f} ms: {j['ratio']:.2f}x (median of {a.repeats})\n")
    if "steps" in what:
        s = results["steps"] = bench_steps(model, 16, 64, a.repeats)
        print("| 16 rows, 64 new tokens | engine steps/s | TransformerLens generate steps/s | x |")
        print("| --- | ---: | ---: | ---: |")
        for k in ("unsteered", "steered"):
            r = s[k]
            print(f"| {k} | {r['engine_steps_per_s']:.0f} | {r['transformer_lens_steps_per_s']:.0f} | {r['ratio']:.2f} |")
        print()
    from deployments.engine.compute import available_cpus

    lanes = a.lanes if a.lanes is not None else max(1, available_cpus() // torch.get_num_threads())
    if "wave" in what:
        wv = results["wave"] = bench_wave(model, a.wave_requests, a.new_tokens, a.repeats, lanes, a.rows)
        print(f"wave: {wv['requests']} requests at once (STEERED at {wv['hook']} + DEFAULT, 48-80 token prompts, "
              f"{wv['new_tokens']} new tokens), {wv['prefill_rows_shared']} rows' prefill shared\n")
        print("| lanes | prefill s | decode s | tokens/s |\n| ---: | ---: | ---: | ---: |")
        for w in dict.fromkeys((1, lanes)):
            r = wv[f"lanes_{w}"]
            print(f"| {w} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} | {r['tokens_per_s']:.0f} |")
        print()
    if "concurrency" in what:
        c = results["concurrency"] = bench_concurrency(model, [int(x) for x in a.levels.split(",")], a.per_client,
                                                       a.new_tokens, a.rows, lanes)
        c["lanes"] = lanes
        b = c["baseline_serial"]
        print(f"| concurrency ({a.new_tokens} new tokens x STEERED + DEFAULT) | requests | tokens/s | x serial TL | "
              "p50 ms | p90 ms | p99 ms | mean rows/step | equals alone |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        print(f"| serial TransformerLens ({b['torch_threads']} threads) | 4 | {b['tokens_per_s']:.0f} | 1 | "
              f"{b['p50_ms']:.0f} | | | | |")
        for lvl, r in c["levels"].items():
            print(f"| {lvl} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['x_baseline']:.1f} | {r['p50_ms']:.0f} | "
                  f"{r['p90_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_active_rows']:.1f} | {r['equals_alone']} |")
        print()
    results["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / "steer" / "steer-bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
