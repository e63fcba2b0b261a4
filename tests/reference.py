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
