"""Steering throughput: N concurrent completions batched together vs the same N generated one after another.

    python -m benchmarks.steer_bench --n 8                       # models/demo-lm (or a random pack), CPU
    python -m benchmarks.steer_bench --n 8 --pack /tmp/pack --new-tokens 32 --out /tmp/steer.json

In process and Ray-free (engine only), so it measures the batching itself, not HTTP or Ray. Every request is
STEERED + DEFAULT (two rows) with ``n`` new tokens each (EOS ignored so every row writes all of them). Three runs:

- ``sequential``        each request alone, decode batch = its own 2 rows (the cheapest way to run one request);
- ``sequential-server`` each request alone, as the server runs it (decode batch padded to ``--rows`` rows);
- ``concurrent``        all N submitted at once to the GenerationScheduler (one wave of 2N rows).

Prints a markdown table (tokens/s and the ratio to ``sequential``) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deployments.engine.generate import GenerationRequest, GenerationScheduler, generate, tokens_of  # noqa: E402
from deployments.engine.pack import load_model_dir  # noqa: E402
from deployments.engine.steering import SteerVector  # noqa: E402


def requests(model, n: int, new_tokens: int) -> list[list[GenerationRequest]]:
    rng = np.random.RandomState(0)
    vec = rng.randn(model.cfg.d_model).astype(np.float32)
    vec /= np.linalg.norm(vec)
    tok = model.tokenizer
    out = []
    for i in range(n):
        ids = [tok.bos_token_id, *tok(f"the cat number {i} sat on the", add_special_tokens=False)["input_ids"]]
        common = dict(tokens=ids, max_new_tokens=new_tokens, temperature=0.7, seed=i, stop_tokens=[])
        out.append([GenerationRequest(**common, steering=[SteerVector("blocks.0.hook_resid_post", vec, 8.0)]),
                    GenerationRequest(**common)])
    return out


def run_sequential(model, reqs, rows) -> tuple[float, int, list]:
    t0 = time.perf_counter()
    outs = [[tokens_of(ev) for ev in generate(model, pair, decode_rows=rows)] for pair in reqs]
    return time.perf_counter() - t0, sum(len(t) for o in outs for t in o), outs


def run_concurrent(model, reqs, rows) -> tuple[float, int, list, dict]:
    async def go():
        sched = GenerationScheduler(model, max_rows=rows, wait_s=0.005)

        async def one(pair):
            sub = sched.submit(pair)
            toks = [[] for _ in pair]
            async for events in sub:
                for e in events:
                    if e.token is not None:
                        toks[e.row].append(e.token)
            return toks

        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(p) for p in reqs))
        return time.perf_counter() - t0, outs, sched.stats

    dt, outs, stats = asyncio.run(go())
    return dt, sum(len(t) for o in outs for t in o), outs, stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="concurrent requests (each STEERED + DEFAULT)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pack", default=None, help="model pack (default models/demo-lm, else a random pack)")
    p.add_argument("--rows", type=int, default=None, help="decode batch rows (default 2N, at least 16)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/steer-<n>.json)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    pack = Path(a.pack) if a.pack else Path(__file__).resolve().parents[1] / "models" / "demo-lm"
    if not (pack / "model" / "config.json").is_file():
        from scripts.make_random_pack import write_random_pack

        pack = write_random_pack(Path(tempfile.mkdtemp()) / "pack")
    model = load_model_dir(pack)
    rows = a.rows or max(16, 2 * a.n)
    reqs = requests(model, a.n, a.new_tokens)
    generate(model, reqs[0], decode_rows=rows)  # warm-up

    t_seq, n_seq, out_seq = run_sequential(model, reqs, None)
    t_srv, n_srv, out_srv = run_sequential(model, reqs, rows)
    t_con, n_con, out_con, stats = run_concurrent(model, reqs, rows)
    same = out_con == out_srv
    results = {
        "pack": str(pack), "n_requests": a.n, "new_tokens": a.new_tokens, "decode_rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "loadavg": os.getloadavg()},
        "runs": {
            "sequential": {"seconds": t_seq, "tokens": n_seq, "tokens_per_s": n_seq / t_seq},
            "sequential-server": {"seconds": t_srv, "tokens": n_srv, "tokens_per_s": n_srv / t_srv},
            "concurrent": {"seconds": t_con, "tokens": n_con, "tokens_per_s": n_con / t_con, "waves": stats["waves"],
                           "max_wave_rows": stats["max_wave_rows"]},
        },
        "concurrent_equals_alone": same,
    }
    base = results["runs"]["sequential"]["tokens_per_s"]
    print(f"\nSteering throughput, {a.n} requests x (STEERED + DEFAULT) x {a.new_tokens} new tokens, {pack.name}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| run | seconds | new tokens | tokens/s | x sequential |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} |")
    print(f"\nconcurrent outputs identical to the same requests run alone (server shapes): {same}")
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"steer-{a.n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
