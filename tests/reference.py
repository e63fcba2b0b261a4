"""The reference: TransformerLens + SAE Lens called directly on the same weights, no project code.

Differential tests compare the service's answers with these.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def model(pack: str):
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    mdir = Path(pack) / "model"
    cfg = HookedTransformerConfig(**json.loads((mdir / "config.json").read_text()))
    tok = PreTrainedTokenizerFast.from_pretrained(str(mdir))
    m = HookedTransformer(cfg, tokenizer=tok)
    m.load_state_dict(load_file(str(mdir / "model.safetensors")))
    m.eval()
    return m


@lru_cache(maxsize=32)
def sae(pack: str, set_name: str, layer: int):
    from sae_lens import SAE

    s = SAE.load_from_disk(str(Path(pack) / "saes" / set_name / str(layer)))
    s.fold_W_dec_norm()
    s.eval()
    return s


def feature_prompt(m, text: str) -> str:
    bos = m.tokenizer.bos_token
    return text if text.startswith(bos) else bos + text


@torch.no_grad()
def feature_acts(pack: str, text: str, set_name: str, layer: int) -> tuple[list[int], list[str], torch.Tensor]:
    """(token ids, token strings, feature activations [seq, d_sae]) the way the original server computes them."""
    m = model(pack)
    s = sae(pack, set_name, layer)
    prompt = feature_prompt(m, text)
    toks = m.to_tokens(prompt, prepend_bos=False, truncate=False)
    _, cache = m.run_with_cache(toks)
    feats = s.encode(cache[s.cfg.metadata.hook_name][0])
    return toks[0].tolist(), m.to_str_tokens(prompt, prepend_bos=False), feats


@torch.no_grad()
def hook_acts(pack: str, text: str, hook: str, prepend_bos: bool | None = None) -> tuple[list[int], torch.Tensor]:
    m = model(pack)
    toks = m.to_tokens(text) if prepend_bos is None else m.to_tokens(text, prepend_bos=prepend_bos)
    _, cache = m.run_with_cache(toks)
    return toks[0].tolist(), cache[hook][0]


def ranked(feats_by_source: list[torch.Tensor], num_results: int, sort_idx: list[int], ignore_bos: bool):
    """activation/all ranking by brute force: [(source_pos, feature, max, argmax, sum, values)]."""
    rows = []
    for src, f in enumerate(feats_by_source):
        f = f.clone()
        if ignore_bos:
            f[0, :] = 0
        for i in range(f.shape[1]):
            col = f[:, i]
            mx = float(col.max())
            at = int((col == col.max()).nonzero()[0, 0])
            sm = float(col[sort_idx].sum()) if sort_idx else 0.0
            rows.append((src, i, mx, at, sm, col.tolist()))
    key = (lambda r: (-r[4], r[0], r[1])) if sort_idx else (lambda r: (-r[2], r[0], r[1]))
    rows.sort(key=key)
    return rows[:num_results]


# --- the 2026 web app's routes --------------------------------------------------------------------------------


def sparse_attention(pattern: torch.Tensor) -> tuple[list[int], list[float], float]:
    """activation/attention's rule, one row at a time, from a ``[q, k]`` head of ``hook_pattern``: each row's top
    min(8, seq) keys with weight >= 0.005 as ``q * seq + k`` (sorted), values rounded to 4 places; the max
    outside row and column 0."""
    seq = pattern.shape[0]
    if seq < 2:
        return [], [], 0.0
    entries = []
    for q in range(seq):
        row = pattern[q].tolist()
        top = sorted(range(seq), key=lambda k: -row[k])[:min(8, seq)]
        entries += [(q * seq + k, round(row[k], 4)) for k in top if row[k] >= 0.005]
    entries.sort()
    interior = [pattern[q, k].item() for q in range(1, seq) for k in range(1, seq)]
    return [i for i, _ in entries], [v for _, v in entries], round(max(interior), 4)


@torch.no_grad()
def attention(pack: str, text: str, layer: int, head: int) -> tuple[list[str], tuple[list[int], list[float], float]]:
    """(token strings, sparse pattern) for a prompt with BOS first, as the feature routes tokenize."""
    m = model(pack)
    prompt = feature_prompt(m, text)
    _, cache = m.run_with_cache(m.to_tokens(prompt, prepend_bos=False))
    return m.to_str_tokens(prompt, prepend_bos=False), sparse_attention(cache[f"blocks.{layer}.attn.hook_pattern"][0, head])


@torch.no_grad()
def predicted_similarity(temporal_sae, acts: torch.Tensor):
    """util/similarity-matrix-pred's formula in float64, pair by pair, on SAE Lens's ``encode_with_predictions``:
    cosines of the predicted codes centred over positions, row and column 0 dropped. A numpy array."""
    import numpy as np

    pred = temporal_sae.encode_with_predictions(acts.unsqueeze(0))[1][0].double()
    centred = pred - pred.mean(dim=0)
    n = centred.shape[0]
    out = np.zeros((n - 1, n - 1))
    for i in range(1, n):
        for j in range(1, n):
            a, b = centred[i], centred[j]
            out[i - 1, j - 1] = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-12)
    return out


@torch.no_grad()
def similarity(pack: str, sae_dir: str, text: str):
    """(token strings without position 0, the matrix) for a temporal SAE directory: tokenized as TransformerLens
    does by default (``tokenizer_prepends_bos``)."""
    from sae_lens import SAE

    m = model(pack)
    s = SAE.load_from_disk(str(sae_dir))
    toks = m.to_tokens(text, prepend_bos=m.cfg.tokenizer_prepends_bos)
    _, cache = m.run_with_cache(toks)
    strs = m.to_str_tokens(text, prepend_bos=m.cfg.tokenizer_prepends_bos)
    return strs[1:], predicted_similarity(s, cache[s.cfg.metadata.hook_name][0])
