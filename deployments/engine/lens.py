"""Logit and Jacobian lens read-outs over a HookedTransformer, with KV-cached generation and the read-out
interventions (Ray-free: ModelDeployment runs each step on its compute thread; tests run it directly).

    engine = LensEngine(model, JacobianLens.from_file(path, d_model, n_layers))
    run = LensRun(engine, LensRequest(...))      # validates (RequestError) and builds the intervention
    while not run.done:
        chunk = run.step()                        # one unit of model work: a forward pass and/or a read-out

Read-out of r = ``blocks.<l>.hook_resid_post`` at a position:

- LOGIT_LENS: ``unembed(ln_final(r))``;
- JACOBIAN_LENS: ``unembed(ln_final(r @ J_l^T))`` at the lens's fitted layers (the last layer is never mapped);

then the model's final-logit softcap ``c * tanh(x / c)`` if it has one (TransformerLens applies it in ``forward``,
not in ``unembed``), a float32 log-normaliser over the full vocabulary, the top n (non-words masked first when
asked, each type's last-layer argmax always kept), probabilities rounded to 4 places.

A run is a prefill over the whole prompt (hooks capture every read layer; an intervention writes before the
capture), read-outs of the prompt positions from ``reuse_len`` on in chunks, then one decode step per generated
token: sample from the previous step's logits (argmax at temperature 0), feed it back through the KV cache and
read it out, until ``max_new_tokens`` or a stop token (which is emitted).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch

from ..protocol import JACOBIAN_LENS, LENS_TYPES, LensChunk, LensIntervention, LensReadout, LensRequest, LensSteerToken
from .errors import RequestError
from .lens_text import word_flags

LENS_FILE_KEYS = ("J", "source_layers", "d_model")
READOUT_ELEMENTS = 1 << 24  # logits per read-out matmul: 64 MB of float32, whatever the vocabulary
PROMPT_CHUNK = 64  # most prompt positions read out in one step (one compute task)


def _hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


class JacobianLens:
    """Per-layer matrices ``J_l [d_model, d_model]`` (the mean Jacobian of the final residual with respect to layer
    l's residual) and the layers they were fitted on. Held in float32: the read-out is float32, and a lens is
    ``n_layers * d_model^2`` values (3 MB for GPT-2 small's 12 x 768^2 ... 0.55 GB for Gemma-2-2B)."""

    def __init__(self, J: dict[int, torch.Tensor], source_layers: list[int], d_model: int, path: Optional[str] = None):
        self.J = J
        self.source_layers = sorted(set(int(x) for x in source_layers))
        self.d_model = d_model
        self.path = path

    @classmethod
    def from_file(cls, path, d_model: int, n_layers: int, device: str = "cpu") -> "JacobianLens":
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read the Jacobian lens file {path}: {e}") from None
        return cls.from_dict(data, d_model, n_layers, device, path=str(path))

    @classmethod
    def from_dict(cls, data, d_model: int, n_layers: int, device: str = "cpu", path: Optional[str] = None) -> "JacobianLens":
        where = path or "Jacobian lens"
        if not isinstance(data, dict) or any(k not in data for k in LENS_FILE_KEYS):
            raise ValueError(f"{where}: expected a dict with keys {', '.join(LENS_FILE_KEYS)}")
        if int(data["d_model"]) != d_model:
            raise ValueError(f"{where} was fitted for d_model={int(data['d_model'])}, but the model has d_model={d_model}")
        mats: dict[int, torch.Tensor] = {}
        for key, m in dict(data["J"]).items():
            layer = int(key)
            if not 0 <= layer < n_layers:
                raise ValueError(f"{where}: layer {layer} is outside the model's 0..{n_layers - 1}")
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != (d_model, d_model):
                raise ValueError(f"{where}: J[{layer}] must be a [{d_model}, {d_model}] tensor")
            m = m.to(dtype=torch.float32)
            if not torch.isfinite(m).all():
                raise ValueError(f"{where}: J[{layer}] holds NaN or infinite values")
            mats[layer] = m.to(device)
        layers = [int(x) for x in data["source_layers"]]
        missing = [x for x in layers if x not in mats]
        if missing:
            raise ValueError(f"{where}: source_layers {missing} have no matrix in J")
        return cls({x: mats[x] for x in layers}, layers, d_model, path)

    def to_dict(self) -> dict:
        return {"J": {x: m.detach().cpu() for x, m in self.J.items()}, "source_layers": list(self.source_layers),
                "d_model": self.d_model}


def stop_token_ids(model) -> list[int]:
    """The ids that end generation: the tokenizer's EOS and the model's ``generation_config`` EOS ids (read from
    local files only, when there are any)."""
    ids: set[int] = set()

    def add(v) -> None:
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple, set)):
            for x in v:
                add(x)

    tok = model.tokenizer
    if tok is not None:
        add(tok.eos_token_id)
    name = getattr(tok, "name_or_path", None) or getattr(model.cfg, "tokenizer_name", None)
    if name:
        try:
            from transformers import GenerationConfig

            add(GenerationConfig.from_pretrained(name, local_files_only=True).eos_token_id)
        except Exception:  # no generation_config.json (a pack, or a model never downloaded with one)
            pass
    return sorted(i for i in ids if 0 <= i < model.cfg.d_vocab)


class LensEngine:
    """What every lens run on one model shares: the model, its Jacobian lens, the word mask, the stop tokens.

    ``lock`` is held around each forward pass (the run adds hooks to the shared model for its duration)."""

    def __init__(self, model, lens: Optional[JacobianLens] = None, lock=None):
        self.model = model
        self.cfg = model.cfg
        self.lens = lens
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.n_layers = self.cfg.n_layers
        self.final_layer = self.n_layers - 1
        self.vocab = self.cfg.d_vocab
        cap = float(getattr(self.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        self.softcap = cap if cap > 0 else None
        self.stop_tokens = stop_token_ids(model)
        self._word_mask: Optional[torch.Tensor] = None

    @property
    def device(self):
        return self.model.W_U.device

    @property
    def lens_layers(self) -> Optional[list[int]]:
        return list(self.lens.source_layers) if self.lens is not None else None

    def fitted(self, layer: int) -> bool:
        return self.lens is not None and layer != self.final_layer and layer in self.lens.J

    def word_mask(self) -> torch.Tensor:
        """``bool [d_vocab]``: which ids decode to a word (one decode per id, once per engine)."""
        if self._word_mask is None:
            flags = word_flags(self.model.tokenizer, self.vocab)
            self._word_mask = torch.tensor(flags, dtype=torch.bool, device=self.device)
        return self._word_mask

    # --- read-out ------------------------------------------------------------------------------------------

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of residuals ``x [..., d_model]``: ln_final and unembed in the model's dtype (as its own
        forward computes them), then the softcap in float32."""
        x = x.to(self.cfg.dtype)
        if self.cfg.normalization_type is not None:
            x = self.model.ln_final(x)
        out = self.model.unembed(x).float()
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out

    def positions_per_readout(self, rows_per_position: int) -> int:
        return max(1, READOUT_ELEMENTS // max(1, rows_per_position * self.vocab))

    @torch.no_grad()
    def readout(self, resid: dict[int, torch.Tensor], types: list[str], layers_by_type: dict[str, list[int]],
                top_n: int, filter_non_word: bool) -> list[LensReadout]:
        """Each type's read-out of the positions in ``resid`` (``{layer: [positions, d_model]}``)."""
        n_pos = next(iter(resid.values())).shape[0]
        segments, off = [], 0  # (type, first row, n rows)
        for t in types:
            segments.append((t, off, len(layers_by_type[t])))
            off += len(layers_by_type[t])
        step = self.positions_per_readout(off)
        ids_parts: list[torch.Tensor] = []
        prob_parts: list[torch.Tensor] = []
        for p0 in range(0, n_pos, step):
            p1 = min(n_pos, p0 + step)
            rows = []
            for t, _, _ in segments:
                for layer in layers_by_type[t]:
                    r = resid[layer][p0:p1]
                    if t == JACOBIAN_LENS and self.fitted(layer):
                        r = r.float() @ self.lens.J[layer].T
                    rows.append(r.to(self.cfg.dtype))
            logits = self.logits(torch.stack(rows, dim=1))  # [positions, rows, vocab]
            log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
            if filter_non_word:
                n = p1 - p0
                at = torch.arange(n, device=logits.device)
                kept = []
                for _, first, count in segments:
                    last = first + count - 1  # the type's last row is the model's last layer
                    top1 = logits[:, last].argmax(dim=-1)
                    kept.append((last, top1, logits[at, last, top1].clone()))
                logits.masked_fill_(~self.word_mask(), float("-inf"))
                for last, top1, value in kept:
                    logits[at, last, top1] = value
            values, idx = logits.topk(top_n, dim=-1)
            ids_parts.append(idx)
            prob_parts.append(torch.exp(values - log_z))
        ids = torch.cat(ids_parts).cpu().numpy().astype(np.int64)
        probs = np.round(torch.cat(prob_parts).double().cpu().numpy(), 4)
        return [LensReadout(type=t, top_ids=ids[:, first:first + count], top_probs=probs[:, first:first + count])
                for t, first, count in segments]

    # --- interventions -------------------------------------------------------------------------------------

    def directions(self, tokens: list[LensSteerToken], layers: list[int]) -> dict[int, torch.Tensor]:
        """Per layer, the sum of the tokens' unit directions (float32 ``[d_model]``): ``W_U[:, id]``, pulled back
        to ``W_U[:, id] @ J_l`` for a JACOBIAN_LENS token at a fitted layer."""
        W_U = self.model.W_U.detach()
        out = {}
        for layer in layers:
            acc = torch.zeros(self.cfg.d_model, dtype=torch.float32, device=W_U.device)
            for tok in tokens:
                d = W_U[:, tok.token_id].float()
                if tok.type == JACOBIAN_LENS and self.fitted(layer):
                    d = d @ self.lens.J[layer]
                norm = torch.linalg.vector_norm(d)
                if norm > 0:
                    acc = acc + d / norm
            out[layer] = acc
        return out


def _unit(v: torch.Tensor) -> Optional[torch.Tensor]:
    n = torch.linalg.vector_norm(v)
    return v / n if n > 0 else None


def _swap(s_hat: torch.Tensor, t_hat: torch.Tensor):
    def edit(h: torch.Tensor) -> torch.Tensor:
        c = (h * s_hat).sum(-1, keepdim=True)
        return h - c * s_hat + c * t_hat
    return edit


def _ablate(d_hat: torch.Tensor):
    def edit(h: torch.Tensor) -> torch.Tensor:
        return h - (h * d_hat).sum(-1, keepdim=True) * d_hat
    return edit


def _add(d: torch.Tensor, strength: float):
    """``h + s * |h| * d`` with the addition capped at ``|h|``. Its norm relative to ``|h|`` is ``|s| * |d|`` whatever
    ``h`` is, so the cap is a factor on ``s * d`` computed once, in float64: no strength overflows float32."""
    d_norm = float(torch.linalg.vector_norm(d.double()))
    factor = strength * min(1.0, 1.0 / (abs(strength) * d_norm)) if strength != 0 and d_norm > 0 else 0.0
    v = (d.double() * factor).to(d.dtype)

    def edit(h: torch.Tensor) -> torch.Tensor:
        # Steering compounds over layers: each layer's addition is capped at |h| so it cannot blow the stream up.
        return h + torch.linalg.vector_norm(h, dim=-1, keepdim=True) * v
    return edit


def intervention_edits(engine: LensEngine, iv: Optional[LensIntervention]) -> dict[int, object]:
    """``{layer: edit(h float32 [..., d]) -> h}`` for an active intervention (empty when it changes nothing)."""
    if iv is None or not iv.steer or not iv.layers:
        return {}
    swap = iv.swap is not None
    if not (swap or iv.ablate or iv.strength != 0):
        return {}
    layers = sorted(set(iv.layers))
    src = engine.directions(iv.steer, layers)
    tgt = engine.directions([iv.swap], layers) if swap else {}
    edits = {}
    for layer in layers:
        if swap:
            s_hat, t_hat = _unit(src[layer]), _unit(tgt[layer])
            if s_hat is not None and t_hat is not None:
                edits[layer] = _swap(s_hat, t_hat)
        elif iv.ablate:
            d_hat = _unit(src[layer])
            if d_hat is not None:
                edits[layer] = _ablate(d_hat)
        elif torch.linalg.vector_norm(src[layer]) > 0:
            edits[layer] = _add(src[layer], float(iv.strength))
    return edits


def check_request(engine: LensEngine, req: LensRequest) -> None:
    V, L = engine.vocab, engine.n_layers
    if not req.tokens:
        raise RequestError("Cannot run the lens on an empty token list")
    if any(not 0 <= t < V for t in req.tokens):
        raise RequestError(f"token ids must be in 0..{V - 1}")
    if not req.types or len(set(req.types)) != len(req.types) or any(t not in LENS_TYPES for t in req.types):
        raise RequestError(f"types must be distinct lens types out of {', '.join(LENS_TYPES)}")
    if JACOBIAN_LENS in req.types and engine.lens is None:
        raise RequestError("Jacobian lens is not available for this model")
    for t in req.types:
        layers = req.layers_by_type.get(t)
        if not layers or layers != sorted(set(layers)) or layers[-1] != engine.final_layer or layers[0] < 0:
            raise RequestError(f"layers of {t} must ascend, without repeats, to the last layer {engine.final_layer}")
        if t == JACOBIAN_LENS and any(x != engine.final_layer and x not in engine.lens.J for x in layers):
            raise RequestError(f"the Jacobian lens is fitted on layers {engine.lens.source_layers} only")
    if not 1 <= req.top_n <= V:
        raise RequestError(f"top_n must be between 1 and {V}, got {req.top_n}")
    if not 0 <= req.reuse_len <= len(req.tokens):
        raise RequestError("reuse_len must be between 0 and the number of tokens")
    if req.max_new_tokens < 0:
        raise RequestError(f"num_completion_tokens must be at least 0, got {req.max_new_tokens}")
    if len(req.tokens) + req.max_new_tokens > engine.cfg.n_ctx:
        raise RequestError(f"Prompt ({len(req.tokens)} tokens) + {req.max_new_tokens} new tokens is more than the model's "
                           f"context length ({engine.cfg.n_ctx})")
    if not (math.isfinite(req.temperature) and req.temperature >= 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {req.temperature}")
    iv = req.intervention
    if iv is not None:
        if any(not 0 <= x < L for x in iv.layers):
            raise RequestError(f"steer_layers must be in 0..{L - 1}, got {iv.layers}")
        for tok in [*iv.steer, *([iv.swap] if iv.swap is not None else [])]:
            if not 0 <= tok.token_id < V or tok.type not in LENS_TYPES:
                raise RequestError(f"steer token {tok.token_id} ({tok.type}) is not a vocabulary id and lens type")
        if not math.isfinite(iv.strength):
            raise RequestError(f"steer_strength must be finite, got {iv.strength}")


class LensRun:
    """One lens request as a sequence of steps (see the module docstring); ``step()`` returns the next LensChunk,
    or None when a step had nothing to read out (a prefill whose positions are all reused)."""

    def __init__(self, engine: LensEngine, req: LensRequest):
        check_request(engine, req)
        self.e = engine
        self.req = req
        self.tokens = list(req.tokens)
        self.n_prompt = len(self.tokens)
        self.layers = sorted({x for t in req.types for x in req.layers_by_type[t]})
        self.edits = intervention_edits(engine, req.intervention)
        # A cached read-out comes from an unsteered run: with an intervention every position is read out again.
        self.next_pos = 0 if self.edits else req.reuse_len
        self.skip = set(req.intervention.skip_tokens) if req.intervention is not None else set()
        self.steer_generated = bool(req.intervention is not None and req.intervention.generated)
        self.stops = set(engine.stop_tokens)
        self.cache = None
        self.prompt_resid: Optional[dict[int, torch.Tensor]] = None
        self.last_logits: Optional[torch.Tensor] = None
        self.prefilled = False
        self.generated: list[int] = []
        self.finished: Optional[str] = None
        rows = sum(len(req.layers_by_type[t]) for t in req.types)
        self.chunk = min(PROMPT_CHUNK, engine.positions_per_readout(rows))

    @property
    def done(self) -> bool:
        if self.next_pos < self.n_prompt:
            return False
        if self.req.max_new_tokens == 0:
            return True
        return self.prefilled and self.finished is not None

    @torch.no_grad()
    def step(self) -> Optional[LensChunk]:
        if self.done:
            return None
        if not self.prefilled:
            self._prefill()
            return self._prompt_chunk()
        if self.next_pos < self.n_prompt:
            return self._prompt_chunk()
        return self._decode()

    # --- internals -----------------------------------------------------------------------------------------

    def _forward(self, ids: list[int], generated: bool) -> dict[int, torch.Tensor]:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        model, device = self.e.model, self.e.device
        toks = torch.tensor([ids], dtype=torch.long, device=device)
        edits = self.edits if (not generated or self.steer_generated) else {}
        keep = None
        if edits and self.skip:
            keep = torch.tensor([[t in self.skip for t in ids]], dtype=torch.bool, device=device)[..., None]
        store: dict[int, torch.Tensor] = {}
        read = set(self.layers)

        def make(layer: int):
            edit = edits.get(layer)

            def hook(act, hook):
                if edit is not None:
                    h = act.float()
                    out = edit(h)
                    if keep is not None:
                        out = torch.where(keep, h, out)
                    act = out.to(act.dtype)
                if layer in read:
                    store[layer] = act[0]
                return act
            return hook

        hooks = [(_hook(x), make(x)) for x in sorted(read | set(edits))]
        if self.cache is None:
            self.cache = TransformerLensKeyValueCache.init_cache(self.e.cfg, device, 1)
        with self.e.lock:
            with model.hooks(fwd_hooks=hooks):
                logits = model(toks, attention_mask=torch.ones_like(toks), past_kv_cache=self.cache)
        self.last_logits = logits[0, -1].float()
        return store

    def _prefill(self) -> None:
        self.prefilled = True
        store = self._forward(self.tokens, generated=False)
        self.prompt_resid = {x: store[x] for x in self.layers}

    def _readout(self, resid: dict[int, torch.Tensor]) -> list[LensReadout]:
        r = self.req
        return self.e.readout(resid, r.types, r.layers_by_type, r.top_n, r.filter_non_word)

    def _prompt_chunk(self) -> Optional[LensChunk]:
        p0 = self.next_pos
        if p0 >= self.n_prompt:
            return None
        p1 = min(self.n_prompt, p0 + self.chunk)
        results = self._readout({x: v[p0:p1] for x, v in self.prompt_resid.items()})
        self.next_pos = p1
        if p1 >= self.n_prompt:
            self.prompt_resid = None  # generation needs only the KV cache
        return LensChunk(start=p0, tokens=self.tokens[p0:p1], generated=False, results=results)

    def _decode(self) -> LensChunk:
        logits = self.last_logits
        if not torch.isfinite(logits).all():
            raise RequestError("Non-finite logits during generation (NaN/inf): the intervention is too strong; lower "
                               "steer_strength or steer fewer layers")
        if self.req.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            token = int(torch.multinomial(torch.softmax(logits / self.req.temperature, dim=-1), 1))
        store = self._forward([token], generated=True)
        results = self._readout({x: store[x] for x in self.layers})
        self.generated.append(token)
        if token in self.stops:
            self.finished = "eos"
        elif len(self.generated) >= self.req.max_new_tokens:
            self.finished = "length"
        return LensChunk(start=self.n_prompt + len(self.generated) - 1, tokens=[token], generated=True, results=results,
                         finished=self.finished)


def run_lens(engine: LensEngine, req: LensRequest) -> list[LensChunk]:
    """A whole run, synchronously (the Ray-free entry point)."""
    run = LensRun(engine, req)
    out = []
    while not run.done:
        chunk = run.step()
        if chunk is not None:
            out.append(chunk)
    return out
