"""ModelRunner: the TransformerLens model, and activation capture at the hooks a request needs.

Capture is batched: prompts of different lengths are right-padded into one forward pass. In a causal
model a position never attends to later ones, so right padding leaves every real position's activations
as they would be alone; we slice each prompt back to its own length.

The forward pass is engine.decoder's (``SlotDecoder.capture``) wherever it implements the architecture and every
hook asked for: TransformerLens's ``run_with_cache`` costs milliseconds of Python per call whatever the batch
(hook points, einops re-layouts, per-forward weight re-layouts), which on a GPU or a small model is most of a
capture's time. Other hooks (attention patterns, norm scales) and architectures go through ``run_with_cache``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..hooks import is_attention_map, stop_layer_for
from ..protocol import CaptureRequest, ModelInfo
from .errors import RequestError


class ModelRunner:
    """``lean``: capture through engine.decoder's forward pass where it can (a SlotDecoder of its own; a replica
    that also generates hands over its generation engine's with :meth:`use_decoder`, to share its weight copies)."""

    def __init__(self, model, device: str | None = None, lean: bool = True):
        self.model = model
        self.model.eval()
        self.device = device or str(model.cfg.device)
        self.tokenizer = model.tokenizer
        self.pad_id = self._pad_id()
        self._hook_shapes = self._probe_hook_shapes()
        self.decoder = None
        self.stats = {"lean_passes": 0, "hooked_passes": 0}  # forward passes by path
        if lean:
            from .decoder import SlotDecoder, unsupported_reason

            if unsupported_reason(model) is None:
                self.use_decoder(SlotDecoder(model, 1))

    def use_decoder(self, decoder) -> None:
        """Capture through ``decoder`` (a SlotDecoder over this very model; None: TransformerLens only)."""
        assert decoder is None or decoder.model is self.model
        self.decoder = decoder

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok is None:  # a model built without one (token ids only)
            return 0
        for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    @torch.no_grad()
    def _probe_hook_shapes(self) -> dict[str, list[int]]:
        """Per-position shapes of every hook point, from one tiny forward pass."""
        shapes: dict[str, list[int]] = {}

        def record(act, hook):
            if act.dim() >= 2:
                shapes[hook.name] = list(act.shape[2:])
            return act

        toks = torch.tensor([[self.pad_id]], device=self.device)
        self.model.run_with_hooks(toks, fwd_hooks=[(lambda name: True, record)])
        return shapes

    def info(self) -> ModelInfo:
        c = self.model.cfg
        return ModelInfo(n_layers=c.n_layers, n_ctx=c.n_ctx, d_model=c.d_model, d_vocab=c.d_vocab,
                         hook_shapes=dict(self._hook_shapes))

    def check_hook(self, hook: str) -> None:
        if hook not in self._hook_shapes:
            raise RequestError(f"Unknown hook: {hook}. Hooks look like blocks.0.hook_resid_post")

    def thread_safe(self, requests: list[CaptureRequest]) -> bool:
        """Whether these requests' capture may run on several threads at once: engine.decoder's forward pass only
        reads shared state; TransformerLens's hooks are registered on the model for the duration of a pass."""
        return self.decoder is not None and self.decoder.can_capture(sorted({h for r in requests for h in r.hooks}))

    def capture(self, requests: list[CaptureRequest]) -> list[dict[str, np.ndarray]]:
        """Activations at each request's hooks, ``{hook: float32 [len, ...]}`` per request.

        Requests are grouped by how deep they need the model to run; each group is one padded forward pass,
        so a request for layer 0 does not pay for a neighbour's layer 11.
        """
        groups: dict[int | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(stop_layer_for(r.hooks, self.model.cfg.n_layers), []).append(i)
        out: list[dict[str, np.ndarray]] = [{} for _ in requests]
        for idxs in groups.values():
            for i, res in zip(idxs, self._capture_group([requests[i] for i in idxs])):
                out[i] = res
        return out

    @torch.no_grad()
    def _capture_group(self, requests: list[CaptureRequest]) -> list[dict[str, np.ndarray]]:
        if not requests:
            return []
        hooks = sorted({h for r in requests for h in r.hooks})
        for h in hooks:
            self.check_hook(h)
        lengths = [len(r.tokens) for r in requests]
        if min(lengths) == 0:
            raise RequestError("Cannot run the model on an empty token list")
        batch = torch.full((len(requests), max(lengths)), self.pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            batch[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        stop = stop_layer_for(hooks, self.model.cfg.n_layers)
        if self.decoder is not None and self.decoder.can_capture(hooks):
            self.stats["lean_passes"] += 1
            acts = self.decoder.capture(batch.to(self.device), hooks, stop)
            cache = {h: a.view(*a.shape[:2], *self._hook_shapes[h]) for h, a in acts.items()}
        else:
            self.stats["hooked_passes"] += 1
            _, cache = self.model.run_with_cache(
                batch.to(self.device),
                names_filter=lambda name: name in hooks,
                stop_at_layer=stop,
                return_cache_object=False,
                return_type=None,  # hooks only: never the [batch, pos, d_vocab] unembed (a third of GPT-2's FLOPs)
            )
        host = {h: cache[h].float().cpu().numpy() for h in hooks}
        return [{h: _unpad(h, host[h][i], n) for h in r.hooks} for i, (r, n) in enumerate(zip(requests, lengths))]


def lane_parts(lengths: list[int], lanes: int) -> list[list[int]]:
    """Indexes of prompts of ``lengths`` in at most ``lanes`` parts, for one padded capture each on its own thread:
    the prompts sorted by length and cut into runs so that the costliest part (its prompts times its longest, the
    positions its forward pass computes) is as cheap as it can be."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    w = max(1, min(lanes, len(order)))

    def pack(bound: int) -> list[list[int]]:  # greedy runs of cost <= bound (optimal for sorted lengths)
        parts: list[list[int]] = [[]]
        for i in order:
            if parts[-1] and (len(parts[-1]) + 1) * lengths[i] > bound:
                parts.append([])
            parts[-1].append(i)
        return parts

    lo, hi = max(lengths, default=0), len(order) * max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pack(mid)) <= w:
            hi = mid
        else:
            lo = mid + 1
    return pack(lo)


def _unpad(hook: str, act: np.ndarray, n: int) -> np.ndarray:
    if is_attention_map(hook):
        return np.ascontiguousarray(act[:, :n, :n])
    return np.ascontiguousarray(act[:n])
