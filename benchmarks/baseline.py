"""The serialized in-process baseline: the original server's design, one request at a time, no project code.

TransformerLens + SAE Lens called directly (the way ``tests/reference.py`` loads them): tokenize, ``run_with_cache``
up to the deepest needed layer, ``sae.encode``, per-feature max, top-k, Python lists out; steering adds the decoder
row at the SAE's hook during ``model.generate`` (KV cache), STEERED then DEFAULT. Torch keeps its default threads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .shapes import Shape
from . import workloads as W
from .workloads import NUM_RESULTS, TOP_K, Workload, feature_index, sae_layers


class Baseline:
    def __init__(self, pack: Path, shape: Shape, device: str = "cpu", dtype: str = "float32"):
        from safetensors.torch import load_file
        from sae_lens import SAE
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformers import PreTrainedTokenizerFast

        self.shape, self.device = shape, device
        mdir = Path(pack) / "model"
        cfg = HookedTransformerConfig(**{**json.loads((mdir / "config.json").read_text()), "device": device,
                                         "dtype": getattr(torch, dtype)})
        tok = PreTrainedTokenizerFast.from_pretrained(str(mdir))
        tok.name_or_path = str(mdir)
        m = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
        m.load_state_dict(load_file(str(mdir / "model.safetensors")))
        self.model = m.to(device).eval()
        self.saes = {}
        for layer in shape.set_layers or shape.layers:
            s = SAE.load_from_disk(str(Path(pack) / "saes" / shape.set_name / str(layer)), device=device)
            s.fold_W_dec_norm()  # in float32, then cast: as the service does
            self.saes[layer] = s.to(dtype=getattr(torch, dtype)).eval()

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _tokens(self, prompt: str) -> torch.Tensor:
        bos = self.tokenizer.bos_token
        text = prompt if prompt.startswith(bos) else bos + prompt
        return self.model.to_tokens(text, prepend_bos=False, truncate=False)

    def _feats(self, toks: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        hooks = [self.saes[l].cfg.metadata.hook_name for l in layers]
        _, cache = self.model.run_with_cache(toks, names_filter=hooks, stop_at_layer=max(layers) + 1)
        return {l: self.saes[l].encode(cache[h][0]) for l, h in zip(layers, hooks)}

    @torch.inference_mode()
    def run(self, w: Workload, prompt: str, i: int):
        """One request of workload ``w``: what the original server computes and returns (as Python objects)."""
        shape = self.shape
        if w.kind == "steer":
            return self.steer(prompt, shape.single_layer, feature_index(shape, i))
        if w.kind == "tokenize":
            ids = self.model.to_tokens(prompt, prepend_bos=True, truncate=False)[0].tolist()
            return dict(tokens=ids, token_strings=self.model.to_str_tokens(torch.tensor(ids)))
        toks = self._tokens(prompt)
        strs = self.model.to_str_tokens(toks[0])
        if w.kind == "all":
            layers = {"all-1": [shape.single_layer], "all-set": list(shape.set_layers or shape.layers)}.get(
                w.name, sae_layers(shape, 3))
            rows = []
            for l, f in self._feats(toks, layers).items():
                f[0] = 0  # ignore_bos
                mx, _ = f.max(dim=0)
                top = mx.topk(NUM_RESULTS)
                for v, idx in zip(top.values.tolist(), top.indices.tolist()):
                    col = f[:, idx]
                    rows.append(dict(source=shape.sae_id(l), index=idx, max_value=v,
                                     max_value_index=int(col.argmax()), values=col.tolist()))
            rows.sort(key=lambda r: -r["max_value"])
            return dict(activations=rows[:NUM_RESULTS], tokens=strs)
        if w.kind == "single":
            f = self._feats(toks, [shape.single_layer])[shape.single_layer]
            col = f[:, feature_index(shape, i)].clone()
            col[0] = 0
            col = col[1:]
            return dict(values=col.tolist(), max_value=float(col.max()), max_value_index=int(col.argmax()), tokens=strs[1:])
        if w.kind == "topk":
            f = self._feats(toks, [shape.single_layer])[shape.single_layer]
            top = f[1:].topk(TOP_K, dim=1)
            return dict(indices=top.indices.tolist(), values=top.values.tolist(), tokens=strs[1:])
        raise ValueError(w.kind)

    def steer(self, prompt: str, layer: int, index: int) -> dict:
        sae = self.saes[layer]
        vec = sae.W_dec[index].detach() * W.STEER_STRENGTH  # strength x strength_multiplier (1)
        hook = sae.cfg.metadata.hook_name
        toks = self.model.to_tokens(prompt)
        out = {}
        for kind in ("STEERED", "DEFAULT"):
            torch.manual_seed(16)
            hooks = [(hook, lambda a, hook: a + vec)] if kind == "STEERED" else []
            with self.model.hooks(fwd_hooks=hooks):
                gen = self.model.generate(toks, max_new_tokens=W.STEER_TOKENS, temperature=0.5, freq_penalty=0.0,
                                          stop_at_eos=False, use_past_kv_cache=True, verbose=False, return_type="tokens")
            out[kind] = self.tokenizer.decode(gen[0, toks.shape[1]:])
        return out
