"""Fit a Jacobian lens for any model: ``J_l`` = the mean, over a corpus's token positions, of the Jacobian of the
final layer's residual with respect to layer l's residual at the same position,

    J_l = mean over (document, position t) of  d blocks.<L-1>.hook_resid_post[t] / d blocks.<l>.hook_resid_post[t]

for every layer l but the last (whose lens is the identity). lens/prompt's JACOBIAN_LENS then reads layer l out
as ``unembed(ln_final(r @ J_l^T))``: r carried linearly to the last layer, then decoded as the model decodes.

    python scripts/fit_jacobian_lens.py --model models/demo-lm                 # the demo pack, on its own corpus
    python scripts/fit_jacobian_lens.py --model gpt2-small --corpus texts.txt --out gpt2_jacobian_lens.pt \\
        --max-docs 500 --positions 16

Writes a torch file ``{"J": {layer: float32 [d_model, d_model]}, "source_layers", "d_model", "n_documents",
"n_positions", "corpus", "model"}``; for a pack, by default ``<pack>/jlens/<corpus>/<name>_jacobian_lens.pt``,
which the service serves without further configuration (``model.jacobian_lens`` names any other file).

How: a zero "probe" is added at each layer's residual (so the gradient with respect to it is the gradient with
respect to that residual, every downstream path included). The same-position Jacobian holds the other positions
fixed, so position t runs alone on the KV cache of the positions before it, as a batch of d_model copies, copy i
asking for row i: one backward pass gives the whole Jacobian at t for every layer. Position 0 (BOS, an attention
sink with an outsized norm) is left out. The cost is about d_model single-token passes per sampled position: a few
minutes for the demo pack on a CPU, a GPU for anything large.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.loading import load_model  # noqa: E402
from deployments.specs import local_path  # noqa: E402

log = logging.getLogger("fit_jacobian_lens")


def demo_corpus(n_docs: int, seed: int) -> list[str]:
    from scripts.demo_pack.corpus import generate

    return [d.text for d in generate(n_docs, seed)]


def read_corpus(path: str) -> list[str]:
    """Documents separated by blank lines."""
    text = Path(path).read_text()
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def document_tokens(model, text: str, max_len: int) -> list[int]:
    tok = model.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return ids[:max_len]


def _prefix_cache(cache, t: int, batch: int):
    """A frozen view of a batch-1 KV cache's first ``t`` positions, repeated ``batch`` times (no copy)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(past_keys=e.past_keys[:, :t].expand(batch, -1, -1, -1),
                                                 past_values=e.past_values[:, :t].expand(batch, -1, -1, -1), frozen=True)
               for e in cache.entries]
    mask = cache.previous_attention_mask[:, :t].expand(batch, -1)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)


def position_jacobians(model, ids: list[int], positions: list[int], layers: list[int], rows_per_pass: int = 0
                       ) -> dict[int, torch.Tensor]:
    """``{layer: sum over positions of d h_final[t] / d h_layer[t]}`` (float64 ``[d, d]``) for one document.

    The same-position Jacobian holds every other position's residual fixed, and in a causal model h_final[t] reads
    earlier positions only through their keys and values: so position t runs alone on the document's KV cache of
    positions < t, as a batch of copies, copy b asking for row i_b (one output coordinate); one backward pass
    gives those rows of every layer's Jacobian."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cfg = model.cfg
    d, final, dev = cfg.d_model, cfg.n_layers - 1, cfg.device
    rows_per_pass = rows_per_pass or d
    prefix = TransformerLensKeyValueCache.init_cache(cfg, dev, 1)
    toks = torch.tensor([ids], device=dev)
    with torch.no_grad():
        model(toks, attention_mask=torch.ones_like(toks), past_kv_cache=prefix, stop_at_layer=cfg.n_layers)
    sums = {x: torch.zeros(d, d, dtype=torch.float64) for x in layers}
    for t in positions:
        for i0 in range(0, d, rows_per_pass):
            batch = min(rows_per_pass, d - i0)
            probes: dict[int, torch.Tensor] = {}
            captured: dict[str, torch.Tensor] = {}

            def probe(layer: int):
                def hook(act, hook):
                    probes[layer] = torch.zeros_like(act, requires_grad=True)
                    return act + probes[layer]
                return hook

            def capture(act, hook):
                captured["final"] = act
                return act

            hooks = [(f"blocks.{x}.hook_resid_post", probe(x)) for x in layers]
            hooks.append((f"blocks.{final}.hook_resid_post", capture))
            step = torch.full((batch, 1), ids[t], device=dev)
            with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
                model(step, attention_mask=torch.ones_like(step), past_kv_cache=_prefix_cache(prefix, t, batch),
                      stop_at_layer=cfg.n_layers)
            out = captured["final"]  # [batch, 1, d]
            cotangent = torch.zeros_like(out)
            cotangent[torch.arange(batch, device=dev), 0, torch.arange(i0, i0 + batch, device=dev)] = 1
            grads = torch.autograd.grad(out, [probes[x] for x in layers], grad_outputs=cotangent)
            for x, g in zip(layers, grads):  # g[b, 0] = d out[t, i0 + b] / d h_x[t, :]
                sums[x][i0:i0 + batch] += g[:, 0].double().cpu()
    return sums


def fit(model, texts: list[str], max_len: int = 64, positions_per_doc: int = 0, seed: int = 0,
        rows_per_pass: int = 0) -> dict:
    """The lens as a dict (the file's contents, without the provenance fields)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.requires_grad_(False)  # gradients with respect to the probes only
    try:
        return _fit(model, texts, max_len, positions_per_doc, seed, rows_per_pass)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _fit(model, texts, max_len, positions_per_doc, seed, rows_per_pass) -> dict:
    layers = list(range(model.cfg.n_layers - 1))
    rng = random.Random(seed)
    total = {x: torch.zeros(model.cfg.d_model, model.cfg.d_model, dtype=torch.float64) for x in layers}
    n_docs = n_pos = 0
    t0 = time.monotonic()
    for text in texts:
        ids = document_tokens(model, text, max_len)
        positions = list(range(1, len(ids)))
        if not positions:
            continue
        if positions_per_doc and len(positions) > positions_per_doc:
            positions = sorted(rng.sample(positions, positions_per_doc))
        for x, s in position_jacobians(model, ids, positions, layers, rows_per_pass).items():
            total[x] += s
        n_docs += 1
        n_pos += len(positions)
        if n_docs % 50 == 0:
            log.info("%d documents, %d positions (%.0f s)", n_docs, n_pos, time.monotonic() - t0)
    if n_pos == 0:
        raise ValueError("the corpus gave no positions to fit on")
    return {"J": {x: (m / n_pos).float() for x, m in total.items()}, "source_layers": layers,
            "d_model": model.cfg.d_model, "n_documents": n_docs, "n_positions": n_pos}


def default_out(model_arg: str, corpus_name: str, model) -> Path:
    pack = local_path(model_arg)
    if pack is None:
        raise SystemExit("--out is needed for a model that is not a local pack")
    name = re.sub(r"[^0-9A-Za-z._-]+", "-", model.cfg.model_name or pack.name).strip("-") or "model"
    return pack / "jlens" / corpus_name / f"{name}_jacobian_lens.pt"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/demo-lm", help="a local pack or a TransformerLens model name")
    p.add_argument("--corpus", help="a text file, documents separated by blank lines (default: the demo pack's corpus)")
    p.add_argument("--out", help="where to write the lens (default for a pack: <pack>/jlens/<corpus>/<name>_jacobian_lens.pt)")
    p.add_argument("--max-docs", type=int, default=256)
    p.add_argument("--max-len", type=int, default=64, help="tokens per document (BOS included)")
    p.add_argument("--positions", type=int, default=16, help="positions sampled per document (0 = all)")
    p.add_argument("--seed", type=int, default=1, help="corpus and position sampling seed (the demo LM trained on seed 0)")
    p.add_argument("--rows-per-pass", type=int, default=0, help="Jacobian rows per backward pass (0 = d_model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(a.seed)
    model = load_model(a.model, a.device, a.dtype)
    if a.corpus:
        texts, corpus_name = read_corpus(a.corpus)[: a.max_docs], Path(a.corpus).stem
    else:
        texts, corpus_name = demo_corpus(a.max_docs, a.seed), "demo-corpus"
    out = Path(a.out) if a.out else default_out(a.model, corpus_name, model)
    lens = fit(model, texts, a.max_len, a.positions, a.seed, a.rows_per_pass)
    lens.update(corpus=corpus_name, model=model.cfg.model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lens, out)
    log.info("wrote %s: layers %s over %d positions of %d documents", out, lens["source_layers"], lens["n_positions"],
             lens["n_documents"])


if __name__ == "__main__":
    main()
