"""Capture's forward pass, in process: engine.decoder's (``SlotDecoder.capture``, what ModelDeployment uses) against
TransformerLens's ``run_with_cache`` (the fallback), same prompts, same batch, one torch thread unless told.

    python -m benchmarks.capture_bench                       # demo pack and the gpt2-small shape
    python -m benchmarks.capture_bench --shape demo --batches 1,4,16 --repeats 40

Paired trials alternate the two paths so that load from elsewhere hits both; each figure is a median, and the
ratio the median of the per-pair ratios. Writes nothing; prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(shape_name: str, batches: list[int], repeats: int, hook_layers: str) -> list[dict]:
    from deployments.engine.capture import ModelRunner
    from deployments.engine.loading import load_model
    from deployments.protocol import CaptureRequest

    from .shapes import SHAPES, ensure_pack, resolve_layers
    from .workloads import make_prompts
    from deployments.engine.pack import load_tokenizer

    shape = SHAPES[shape_name]
    pack = ensure_pack(shape)
    shape = resolve_layers(shape, pack)
    model = load_model(str(pack), "cpu", shape.dtype)
    lean, hooked = ModelRunner(model, "cpu"), ModelRunner(model, "cpu", lean=False)
    assert lean.decoder is not None, "the decoder does not implement this model"
    layers = list(shape.set_layers or shape.layers) if hook_layers == "set" else [shape.single_layer]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    prompts = make_prompts(load_tokenizer(pack / "model"), shape, max(batches))
    tok = lean.tokenizer
    ids = [tok(tok.bos_token + text)["input_ids"] for text, _ in prompts]
    rows = []
    for b in batches:
        reqs = [CaptureRequest(ids[i % len(ids)], hooks) for i in range(b)]
        lean.capture(reqs), hooked.capture(reqs)  # warm-up
        t_lean, t_tl = [], []
        for _ in range(repeats):
            for runner, out in ((lean, t_lean), (hooked, t_tl)):
                t = time.perf_counter()
                runner.capture(reqs)
                out.append((time.perf_counter() - t) * 1e3)
        ratios = [tl / le for le, tl in zip(t_lean, t_tl)]
        rows.append(dict(shape=shape_name, batch=b, hooks=len(hooks), lean_ms=statistics.median(t_lean),
                         tl_ms=statistics.median(t_tl), speedup=statistics.median(ratios)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", default=None, help="demo, gpt2-small, wide, ... (repeatable)")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--repeats", type=int, default=None, help="paired trials per cell (default 40 demo, 5 others)")
    p.add_argument("--hooks", choices=["set", "single"], default="set", help="every SAE layer of the set, or one")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    batches = [int(x) for x in a.batches.split(",") if x]
    print(f"torch {torch.__version__}, {a.threads} thread(s)\n")
    print("| shape | prompts | hooks | engine.decoder ms | run_with_cache ms | speed-up (median of pairs) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in a.shape or ["demo", "gpt2-small"]:
        repeats = a.repeats or (40 if name == "demo" else 5)
        for r in measure(name, batches, repeats, a.hooks):
            print(f"| {r['shape']} | {r['batch']} | {r['hooks']} | {r['lean_ms']:.1f} | {r['tl_ms']:.1f} | "
                  f"{r['speedup']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
