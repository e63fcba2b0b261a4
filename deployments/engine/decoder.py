"""SlotDecoder: a lean forward pass over a HookedTransformer's own weights, with a preallocated KV cache per row slot.

Why not ``HookedTransformer.forward``: per decode step it runs ~20 Python-level hook points per layer, einops
rearranges, re-made weight layouts (``.T.contiguous()``), a causal mask rebuilt per layer, and a KV cache that
grows with ``torch.cat`` (a reallocation per layer per step); that overhead, not the matmuls, is a decode step's
cost at small batches. This module runs the same arithmetic as TransformerLens's components, op for op where that
matters (the norms, the attention score scaling, masking and softmax, the activation function is TransformerLens's
own ``act_fn``), and the differential tests hold it to TransformerLens's numbers.

The KV cache is one tensor ``[layer, k|v, slot, kv_head, position, d_head]`` sized ``n_positions`` (rounded up to
a multiple of 4) per slot: a row writes its prompt's keys at positions ``0..n-1`` of its slot at prefill and one
more per decode step, in place. Attention always reads the slot's *whole* length with the positions beyond the
row's own masked (weight exactly 0; the engine keeps them finite), so a row's softmax and its ``pattern @ v``
reduce over the same number of entries whatever else is in the batch. Rows are addressed by slot: ``rows`` is a
slice (the engine's packed slots, a view) or an index tensor (a gather).

Steering is applied at named hook points by a :class:`SlotSteering` (per-slot tables), never by adding hooks to the
model, so capture can use the same model between decode steps. Architectures this does not implement raise
:class:`UnsupportedModel` at construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import RequestError

ROW_MULTIPLE = 4  # every matmul's row count is a multiple of this (engine.generate explains why)
SPAN_MULTIPLE = 64  # attention reads a prefix of each slot whose length is a multiple of this


@dataclass
class StreamPhase:
    """Blocks ``start..end-1`` of a shared prefill, run on streams: ``lead [S]`` the batch index of the row each
    stream stands for, ``kv_rows [B]`` each row's stream (its slot gets that stream's keys and values), ``next
    [S']`` each stream of the next phase's source stream here (the residual's hand-over)."""

    start: int
    end: int
    lead: torch.Tensor
    kv_rows: torch.Tensor
    next: torch.Tensor


@dataclass
class SharedPrefix:
    """Prefill rows that share a prompt are computed once, as one stream, until the first block any of them steers
    (each group until its own): the phases before every row is its own (:meth:`SlotDecoder.shared_prefix`)."""

    phases: list


class UnsupportedModel(RequestError):
    def __init__(self, message: str, status: int = 501):
        super().__init__(message, status)

    def __reduce__(self):
        return (UnsupportedModel, (self.message, self.status))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def unsupported_reason(model) -> Optional[str]:
    """Why :class:`SlotDecoder` cannot run this model (None when it can)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if not isinstance(model, HookedTransformer):
        return f"{type(model).__name__} is not a HookedTransformer"
    cfg = model.cfg
    flags = {
        f"positional_embedding_type {cfg.positional_embedding_type}": cfg.positional_embedding_type not in ("standard",
                                                                                                          "rotary"),
        "attention_dir " + str(cfg.attention_dir): cfg.attention_dir != "causal",
        "use_attn_in": cfg.use_attn_in, "use_split_qkv_input": cfg.use_split_qkv_input,
        "post-norm architecture": cfg.original_architecture in POST_NORM_ARCHITECTURES
        or cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"),
        "clip_qkv": getattr(cfg, "clip_qkv", None) is not None, "use_logn_attn": getattr(cfg, "use_logn_attn", False),
        "use_attention_sinks": getattr(cfg, "use_attention_sinks", False),
        "use_dynamic_ntk_rope": getattr(cfg, "use_dynamic_ntk_rope", False),
        "load_in_4bit": getattr(cfg, "load_in_4bit", False), "post_embedding_ln": getattr(cfg, "post_embedding_ln", False),
        "n_devices > 1": getattr(cfg, "n_devices", 1) > 1,
    }
    bad = [k for k, v in flags.items() if v]
    return ", ".join(bad) or None


class _Norm:
    """A TransformerLens norm, re-run with its exact arithmetic (or called as a module when it is another kind)."""

    def __init__(self, module, hook: Optional[str]):
        from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

        self.module = module
        self.hook = hook
        self.kind = {LayerNorm: "LN", LayerNormPre: "LNPre", RMSNorm: "RMS", RMSNormPre: "RMSPre",
                     torch.nn.Identity: "none"}.get(type(module), "module")
        self.eps = getattr(module, "eps", None)
        self.w = getattr(module, "w", None)
        self.b = getattr(module, "b", None)
        if self.kind == "module":
            self.hook = None
        self.centre = self.kind in ("LN", "LNPre")


class _Block:
    def __init__(self, i: int, block, cfg):
        from transformer_lens.components import GroupedQueryAttention
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
        from transformer_lens.components.mlps.mlp import MLP

        p = f"blocks.{i}."
        self.p = p
        attn = block.attn
        self.attn = attn
        self.ln1 = _Norm(block.ln1, p + "ln1.hook_normalized")
        self.ln1_post = _Norm(block.ln1_post, None) if cfg.use_normalization_before_and_after else None
        self.ln2 = _Norm(block.ln2, p + "ln2.hook_normalized") if not cfg.attn_only else None
        self.ln2_post = _Norm(block.ln2_post, None) if cfg.use_normalization_before_and_after and not cfg.attn_only else None
        H, dh = cfg.n_heads, cfg.d_head
        grouped = isinstance(attn, GroupedQueryAttention) and not cfg.ungroup_grouped_query_attention
        if grouped:  # the kv heads themselves, not TransformerLens's repeated view of them
            W_K, b_K, W_V, b_V = attn._W_K, attn._b_K, attn._W_V, attn._b_V
        else:
            W_K, b_K, W_V, b_V = attn.W_K, attn.b_K, attn.W_V, attn.b_V
        self.Hkv = W_K.shape[0]
        self.G = H // self.Hkv
        with torch.no_grad():
            # Q, K and V in one matmul: TransformerLens keeps them per head and re-lays them out on every forward
            # pass; this copy is made once. Without grouped heads, stacked [3, d_model, H d_head] for one bmm whose
            # three outputs are each contiguous; with them, side by side [d_model, (H + 2 Hkv) d_head].
            flat = lambda W: W.permute(1, 0, 2).reshape(W.shape[1], -1)
            parts, biases = [flat(attn.W_Q), flat(W_K), flat(W_V)], [attn.b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1)]
            self.stacked = self.Hkv == H
            if self.stacked:
                self.W_qkv = torch.stack(parts).contiguous()
                self.b_qkv = torch.stack(biases)[:, None, :].contiguous()
            else:
                self.W_qkv = torch.cat(parts, dim=1).contiguous()
                self.b_qkv = torch.cat(biases).contiguous()
        self.q_end, self.k_end = H * dh, (H + self.Hkv) * dh
        self.W_O = attn.W_O.reshape(H * dh, -1)  # a view: [head, d_head, d_model] -> [(head d_head), d_model]
        self.b_O = attn.b_O
        self.scale = attn.attn_scale
        self.softcap = cfg.attn_scores_soft_cap if (cfg.attn_scores_soft_cap or 0) > 0 else None
        self.local = attn.attn_type == "local"
        self.window = cfg.window_size
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.qk_norm = (attn.q_norm, attn.k_norm) if cfg.use_qk_norm else None
        self.mlp = None if cfg.attn_only else block.mlp
        self.mlp_kind = None
        if self.mlp is not None:
            layer_norm_act = cfg.is_layer_norm_activation()
            self.mlp_kind = ("gated" if type(self.mlp) is GatedMLP else "mlp" if type(self.mlp) is MLP else "module")
            if layer_norm_act:
                self.mlp_kind = "module"


class SlotDecoder:
    """Prefill and decode for rows living in KV-cache slots; see the module docstring."""

    def __init__(self, model, n_positions: int):
        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModel(f"Generation is not implemented for this model's architecture ({reason})")
        self.model = model
        cfg = self.cfg = model.cfg
        self.dtype = cfg.dtype
        self.low_precision = self.dtype not in (torch.float32, torch.float64)
        self.device = model.embed.W_E.device
        self.n_ctx = cfg.n_ctx
        self.L = round_up(min(n_positions, cfg.n_ctx), SPAN_MULTIPLE)
        self.n_positions = min(n_positions, cfg.n_ctx)
        self.blocks = [_Block(i, b, cfg) for i, b in enumerate(model.blocks)]
        self.d_head = cfg.d_head
        self.Hkv = self.blocks[0].Hkv
        self.vocab = model.unembed.W_U.shape[-1]
        self.W_E = model.embed.W_E
        self.W_pos = model.pos_embed.W_pos if cfg.positional_embedding_type == "standard" else None
        self.ln_final = _Norm(model.ln_final, "ln_final.hook_normalized") if cfg.normalization_type is not None else None
        self.W_U, self.b_U = model.unembed.W_U, model.unembed.b_U
        self.out_softcap = cfg.output_logits_soft_cap if (cfg.output_logits_soft_cap or 0) > 0 else None
        if self.blocks[0].rotary:
            for b in self.blocks:
                if b.attn.rotary_cos.shape[0] < self.L:
                    b.attn._extend_rotary_embeddings(self.L)
        self.key_pos = torch.arange(self.L, device=self.device)
        self.widths = self._steerable(cfg)
        self.kv: Optional[torch.Tensor] = None
        self.n_slots = 0

    # --- hooks ------------------------------------------------------------------------------------------------

    def _steerable(self, cfg) -> dict[str, int]:
        """The hook points this forward pass can steer, with their per-position widths."""
        dm, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        out = {"hook_embed": dm}
        if self.W_pos is not None:
            out["hook_pos_embed"] = dm
        for b in self.blocks:
            p = b.p
            out[p + "hook_resid_pre"] = dm
            for ln in (b.ln1, b.ln2):
                if ln is not None and ln.hook:
                    out[ln.hook] = dm
            out.update({p + "attn.hook_q": H * dh, p + "attn.hook_k": b.Hkv * dh, p + "attn.hook_v": b.Hkv * dh,
                        p + "attn.hook_z": H * dh, p + "hook_attn_out": dm, p + "hook_resid_post": dm})
            if b.rotary:
                out.update({p + "attn.hook_rot_q": H * dh, p + "attn.hook_rot_k": b.Hkv * dh})
            if b.mlp is not None:
                out[p + "hook_mlp_out"] = dm
                if not cfg.parallel_attn_mlp:
                    out[p + "hook_resid_mid"] = dm
                if cfg.use_hook_mlp_in:
                    out[p + "hook_mlp_in"] = dm
                if b.mlp_kind in ("mlp", "gated"):
                    out[p + "mlp.hook_pre"] = out[p + "mlp.hook_post"] = cfg.d_mlp
                if b.mlp_kind == "gated":
                    out[p + "mlp.hook_pre_linear"] = cfg.d_mlp
        if self.ln_final is not None and self.ln_final.hook:
            out["ln_final.hook_normalized"] = dm
        return out

    def block_of(self, hook: str) -> int:
        """The first block whose output a steering vector at ``hook`` changes: N for ``blocks.N.*``, 0 for the
        embeddings, the number of blocks for the final norm."""
        m = re.match(r"blocks\.(\d+)\.", hook)
        if m:
            return int(m.group(1))
        return len(self.blocks) if hook.startswith("ln_final") else 0

    def shared_prefix(self, prompts: list, steered_hooks: list) -> Optional[SharedPrefix]:
        """How a prefill of rows ``prompts`` (token lists; ``steered_hooks`` each row's steering hooks) shares
        work: rows of one prompt form a group, which runs as one stream until the first block any of its rows
        steers. None when nothing is shared."""
        first: dict[tuple, int] = {}
        group = [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]  # each row's group: its first row
        n = len(self.blocks)
        until = {g: n for g in set(group)}
        for g, hooks in zip(group, steered_hooks):
            until[g] = min([until[g], *(self.block_of(h) for h in hooks)])
        size = {g: group.count(g) for g in until}
        splits = sorted({until[g] for g in until if size[g] > 1 and until[g] > 0})
        if not splits:
            return None
        dev = self.device

        def leads_at(block: int) -> list[int]:  # the row each row is computed as, from ``block`` on
            return [g if size[g] > 1 and until[g] > block else i for i, g in enumerate(group)]

        def t(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=dev)

        phases, start = [], 0
        for end in splits:  # after the last split every row is its own stream
            lead = leads_at(start)
            streams = sorted(set(lead))
            at = {r: k for k, r in enumerate(streams)}
            nxt = [at[lead[r]] for r in sorted(set(leads_at(end)))]
            phases.append(StreamPhase(start, end, t(streams), t([at[x] for x in lead]), t(nxt)))
            start = end
        return SharedPrefix(phases)

    def check_steerable(self, hook: str, width: int, what: str) -> None:
        if hook not in self.widths:
            raise RequestError(f"Steering at {hook} is not supported: steer a per-position activation such as "
                               "blocks.N.hook_resid_post, blocks.N.attn.hook_z or blocks.N.mlp.hook_post")
        if width != self.widths[hook]:
            raise RequestError(f"{what} has length {width} but {hook} has width {self.widths[hook]}")

    # --- slots ------------------------------------------------------------------------------------------------

    def slot_bytes(self) -> int:
        return len(self.blocks) * 2 * self.Hkv * self.L * self.d_head * torch.finfo(self.dtype).bits // 8

    def ensure_slots(self, n: int) -> None:
        """Grow the cache to ``n`` slots (a reallocation only when it grows; raises on out-of-memory)."""
        if n <= self.n_slots:
            return
        kv = torch.zeros((len(self.blocks), 2, n, self.Hkv, self.L, self.d_head), dtype=self.dtype, device=self.device)
        if self.kv is not None:
            kv[:, :, : self.n_slots] = self.kv
        self.kv, self.n_slots = kv, n
        dh = self.d_head
        # per layer: the cache [slot, kv_head, position, d_head] and its rows [*, d_head] (for the in-place writes)
        self._layer_kv = [(kv[i, 0], kv[i, 1], kv[i, 0].view(-1, dh), kv[i, 1].view(-1, dh))
                          for i in range(len(self.blocks))]
        self._read_views: dict = {}

    def _reads(self, li: int, rows, span: int, B: int):
        """Layer ``li``'s keys and values of slots ``rows``, first ``span`` positions, as [B * Hkv, span, d_head]:
        views, kept per (slice, span), for the packed slots a decode step reads; a gather for an index."""
        keys, values = self._layer_kv[li][:2]
        if isinstance(rows, slice):
            key = (rows.start, rows.stop, span)
            views = self._read_views.get(key)
            if views is None:
                views = self._read_views[key] = [
                    (k[rows, :, :span].reshape(B * self.Hkv, span, self.d_head),
                     v[rows, :, :span].reshape(B * self.Hkv, span, self.d_head)) for k, v, _, _ in self._layer_kv]
            return views[li]
        return (keys[:, :, :span][rows].reshape(B * self.Hkv, span, self.d_head),
                values[:, :, :span][rows].reshape(B * self.Hkv, span, self.d_head))

    def zero(self, slot: int, start: int = 0, end: Optional[int] = None) -> None:
        self.kv[:, :, slot, :, start:end] = 0

    def move_slot(self, src: int, dst: int) -> None:
        self.kv[:, :, dst] = self.kv[:, :, src]

    # --- forward ----------------------------------------------------------------------------------------------

    def span_for(self, n_positions: int) -> int:
        """The attention span covering positions ``0..n_positions-1``: a multiple of SPAN_MULTIPLE, at most L."""
        return min(self.L, round_up(max(n_positions, 1), SPAN_MULTIPLE))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows, write_rows: torch.Tensor, steering=None,
                steer_pos: Optional[torch.Tensor] = None, bad: Optional[torch.Tensor] = None,
                last: Optional[torch.Tensor] = None, span: Optional[int] = None,
                share: Optional["SharedPrefix"] = None) -> torch.Tensor:
        """Run ``tokens [B, T]`` at ``positions [B, T]`` for the slots ``rows`` (slice or index, B of them; their
        index tensor ``write_rows``), writing their keys and values; float32 logits ``[B, vocab]`` at each row's
        position ``last [B]`` (default the last). ``bad [B]`` collects non-finite steering (see SlotSteering).

        Attention reads the first ``span`` positions of each slot (default all; it must cover every position in
        ``positions``). A row's positions past its own are masked to weight exactly 0, so a longer span only adds
        exact zeros at the end of its softmax and ``pattern @ v`` sums, in whole multiples of SPAN_MULTIPLE: the
        same result (the engine's startup check covers it).

        ``share`` (prefill, :meth:`shared_prefix`): rows with the same prompt are computed once, as one *stream*,
        through the blocks before the first one any of them steers, and written to every one of their slots. A
        row's arithmetic is the same either way (rows are independent, engine.generate), so sharing only saves the
        duplicates' work.

        The residual stream stays ``[B * T, d_model]`` throughout (per-position ops do not care), and is seen as
        ``[B, T, ...]`` only by attention and by a hook that steers."""
        span = self.L if span is None else span
        B, T = tokens.shape
        hooks = steering.active_hooks if steering is not None else ()
        if bad is None:
            bad = torch.zeros(B, dtype=torch.long, device=self.device)

        def hook(name: str, h: torch.Tensor, where: Optional[torch.Tensor] = steer_pos, n_pos: int = T) -> torch.Tensor:
            if name in hooks:
                return steering.apply(name, h.view(h.shape[0] // n_pos, n_pos, -1), rows, where, bad).view(h.shape)
            return h

        pos_c = positions.clamp(max=self.n_ctx - 1)  # pad positions past the context only carry garbage
        # Where this step's keys and values go: [slot, kv_head, position] flattened, for every kv head of each
        # (row, position) pair -- one index shared by every layer's in-place write.
        Hkv, L = self.Hkv, self.L
        heads = torch.arange(Hkv, device=self.device)
        if T == 1:  # in (row, head) order: a decode step's keys are laid out so
            where_kv = ((write_rows[:, None] * Hkv + heads[None, :]) * L + positions).reshape(-1)
        else:  # in (row, head, position) order
            where_kv = ((write_rows[:, None, None] * Hkv + heads[None, :, None]) * L + positions[:, None, :]).reshape(-1)
        split = 0
        if share is not None and share.phases:  # streams first: a stream's lead row stands for it
            s_bad = torch.zeros(share.phases[0].lead.shape[0], dtype=bad.dtype, device=self.device)
            for k, ph in enumerate(share.phases):
                Bs, lead = ph.lead.shape[0], ph.lead
                s_rows, s_pos = rows[lead], None if steer_pos is None else steer_pos[lead]

                def s_hook(name: str, h: torch.Tensor, Bs=Bs, s_rows=s_rows, s_pos=s_pos, s_bad=s_bad) -> torch.Tensor:
                    if name in hooks:  # a row steered here is a stream of its own
                        return steering.apply(name, h.view(Bs, T, -1), s_rows, s_pos, s_bad).view(h.shape)
                    return h

                ctx = (Bs, T, pos_c[lead], s_rows, where_kv, ph.kv_rows, s_hook)
                if k == 0:
                    resid = self._embed(tokens[lead], pos_c[lead], s_hook)
                masks = {}
                for li in range(ph.start, ph.end):
                    b = self.blocks[li]
                    if b.local not in masks:
                        masks[b.local] = self._mask(b, positions[lead], span)
                    resid = self._block(li, b, resid, masks[b.local], ctx)
                resid = resid.view(Bs, T, -1)[ph.next].view(ph.next.shape[0] * T, -1)
                s_bad = s_bad[ph.next]
                split = ph.end
            bad.copy_(torch.where(bad == 0, s_bad, bad))  # the last phase hands over to every row
        else:
            resid = self._embed(tokens, pos_c, hook)
        masks = {}
        ctx = (B, T, pos_c, rows, where_kv, None, hook)
        for li, b in enumerate(self.blocks[split:], start=split):
            if b.local not in masks:
                masks[b.local] = self._mask(b, positions, span)
            resid = self._block(li, b, resid, masks[b.local], ctx)
        if T > 1 or last is not None:
            if last is None:
                last = torch.full((B,), T - 1, dtype=torch.long, device=self.device)
            x = resid[torch.arange(B, device=self.device) * T + last]  # [B, d_model]: only the positions we sample from
            where = None if steer_pos is None else steer_pos[torch.arange(B, device=self.device), last][:, None]
        else:
            x, where = resid, steer_pos
        if self.ln_final is not None:
            x = self._norm(self.ln_final, x, lambda name, h: hook(name, h, where, 1))
        pad = round_up(B, ROW_MULTIPLE) - B
        if pad:  # the unembed's row count a multiple of ROW_MULTIPLE too
            x = torch.cat([x, x[-1:].expand(pad, -1)])
        logits = torch.addmm(self.b_U, x, self.W_U)
        if self.out_softcap is not None:
            logits = self.out_softcap * torch.tanh(logits / self.out_softcap)
        return logits[:B].float()

    def can_capture(self, hooks) -> bool:
        """Whether :meth:`capture` produces every one of ``hooks`` (the per-position hook points of ``widths``)."""
        return all(h in self.widths for h in hooks)

    @torch.no_grad()
    def capture(self, tokens: torch.Tensor, hooks, stop_layer: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Activations ``{hook: [B, T, width]}`` (the model's dtype, on its device) of right-padded prompts
        ``tokens [B, T]`` at positions ``0..T-1``, running blocks ``0..stop_layer-1`` (None: all, and the final
        norm when its hook is asked for). Every hook must be in ``widths`` (:meth:`can_capture`).

        The same arithmetic as a prefill, with each row attending over its own keys and values rather than a KV
        cache (the cache is not touched, so capture can run between decode steps): TransformerLens's
        ``run_with_cache`` numbers to float32 rounding, without its per-hook-point Python. A causal model's real
        positions never attend to the padding after them."""
        B, T = tokens.shape
        want = set(hooks)
        out: dict[str, torch.Tensor] = {}

        def hook(name: str, h: torch.Tensor) -> torch.Tensor:
            if name in want:
                out[name] = h  # no op after this one writes in place into a hook's value
            return h

        positions = torch.arange(T, device=self.device).expand(B, T)
        pos_c = positions.clamp(max=self.n_ctx - 1)
        resid = self._embed(tokens, pos_c, hook)
        ctx = (B, T, pos_c, None, None, None, hook)
        n = len(self.blocks) if stop_layer is None else min(stop_layer, len(self.blocks))
        masks = {}
        for li, b in enumerate(self.blocks[:n]):
            if b.local not in masks:
                masks[b.local] = self._mask(b, positions, T)
            resid = self._block(li, b, resid, masks[b.local], ctx)
        if stop_layer is None and self.ln_final is not None and self.ln_final.hook in want:
            self._norm(self.ln_final, resid, hook)
        missing = want - out.keys()
        if missing:
            raise RequestError(f"Cannot capture {sorted(missing)} with this forward pass", 500)
        return {h: out[h].view(B, T, -1) for h in hooks}

    def _embed(self, tokens: torch.Tensor, pos_c: torch.Tensor, hook) -> torch.Tensor:
        resid = hook("hook_embed", self.W_E[tokens.reshape(-1)])
        if self.W_pos is not None:
            resid = resid + hook("hook_pos_embed", self.W_pos[pos_c.reshape(-1)])
        return resid

    def _norm(self, n: _Norm, x: torch.Tensor, hook) -> torch.Tensor:
        """TransformerLens's norms: normalise in float32 (hook_normalized), back to the model dtype, then the affine
        part. One fused normalisation op instead of TransformerLens's seven; the same formula, so the results agree
        to float32 rounding. The affine part stays separate whether or not anything steers at the hook, so a row's
        arithmetic does not depend on its neighbours' steering."""
        if n.kind == "none":
            return x
        if n.kind == "module":
            return n.module(x)
        low = self.low_precision
        if low:
            x = x.to(torch.float32)
        if n.centre:
            x = torch.layer_norm(x, x.shape[-1:], None, None, n.eps)
        else:
            x = torch.rms_norm(x, x.shape[-1:], None, n.eps)
        if n.hook:
            x = hook(n.hook, x)
        if low:
            x = x.to(self.dtype)
        if n.kind == "LN":
            return x * n.w + n.b
        if n.kind == "RMS":
            return x * n.w
        return x

    def _mask(self, b: _Block, positions: torch.Tensor, span: int) -> torch.Tensor:
        """Each (row, query) may attend to its slot's keys at positions <= its own (and within the window of a
        local layer). Additive (0 / -inf) and laid out [B * Hkv, G * T, L] for ``baddbmm``, or boolean
        [B, 1, 1, T, L] for a soft-capped layer, which masks after the cap."""
        keys = self.key_pos[:span] if span <= self.L else torch.arange(span, device=self.device)
        allowed = keys[None, None, :] <= positions[:, :, None]  # [B, T, span]
        if b.local:
            allowed = allowed & (keys[None, None, :] > positions[:, :, None] - b.window)
        if b.softcap is not None:
            return allowed[:, None, None]
        B, T, L = allowed.shape
        add = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
        return add[:, None, None].expand(B, b.Hkv, b.G, T, L).reshape(B * b.Hkv, b.G * T, L)

    def _block(self, li, b: _Block, resid, mask, ctx):
        p = b.p
        cfg = self.cfg
        hook = ctx[-1]
        resid = hook(p + "hook_resid_pre", resid)
        attn_out = self._attention(li, b, self._norm(b.ln1, resid, hook), mask, ctx)
        if b.ln1_post is not None:
            attn_out = self._norm(b.ln1_post, attn_out, hook)
        attn_out = hook(p + "hook_attn_out", attn_out)
        if b.mlp is None:
            return hook(p + "hook_resid_post", resid + attn_out)
        if cfg.parallel_attn_mlp:
            mlp_in = hook(p + "hook_mlp_in", resid.clone()) if cfg.use_hook_mlp_in else resid
            mlp_out = self._mlp(b, self._norm(b.ln2, mlp_in, hook), ctx)
            return hook(p + "hook_resid_post", resid + attn_out + mlp_out)
        mid = hook(p + "hook_resid_mid", resid + attn_out)
        mlp_in = hook(p + "hook_mlp_in", mid.clone()) if cfg.use_hook_mlp_in else mid
        mlp_out = self._mlp(b, self._norm(b.ln2, mlp_in, hook), ctx)
        return hook(p + "hook_resid_post", mid + mlp_out)

    def _mlp(self, b: _Block, x, ctx):
        p = b.p
        B, T, hook = ctx[0], ctx[1], ctx[-1]
        if b.mlp_kind == "module":
            out = b.mlp(x.view(B, T, -1)).reshape(B * T, -1)
        else:
            m = b.mlp
            if b.mlp_kind == "mlp":
                pre = hook(p + "mlp.hook_pre", torch.addmm(m.b_in, x, m.W_in))
                post = hook(p + "mlp.hook_post", m.act_fn(pre))
            else:
                pre = hook(p + "mlp.hook_pre", torch.mm(x, m.W_gate))
                lin = hook(p + "mlp.hook_pre_linear", torch.mm(x, m.W_in))
                post = hook(p + "mlp.hook_post", m.act_fn(pre) * lin + m.b_in)
            out = torch.addmm(m.b_out, post, m.W_out)
        if b.ln2_post is not None:
            out = self._norm(b.ln2_post, out, hook)
        return hook(p + "hook_mlp_out", out)

    def _rotate(self, b: _Block, x, pos_c):
        """TransformerLens's ``apply_rotary`` at explicit positions ``pos_c [B, T]``."""
        attn, cfg = b.attn, self.cfg
        rd = cfg.rotary_dim
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        if cfg.rotary_adjacent_pairs:
            flip = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
        else:
            n = rd // 2
            flip = torch.cat([-x_rot[..., n:], x_rot[..., :n]], dim=-1)
        cos = attn.rotary_cos[pos_c][:, :, None, :]
        sin = attn.rotary_sin[pos_c][:, :, None, :]
        return torch.cat([x_rot * cos + flip * sin, x_pass], dim=-1)

    def _attention(self, li, b: _Block, x, mask, ctx):
        p = b.p + "attn."
        B, T, pos_c, rows, where_kv, expand, hook = ctx
        H, dh, Hkv, G = self.cfg.n_heads, self.d_head, b.Hkv, b.G
        N = B * T
        if b.stacked:
            q, k, v = torch.baddbmm(b.b_qkv, x.expand(3, N, x.shape[-1]), b.W_qkv)
        else:
            qkv = torch.addmm(b.b_qkv, x, b.W_qkv)
            q, k, v = qkv[:, : b.q_end], qkv[:, b.q_end: b.k_end], qkv[:, b.k_end:]
        # [B * T, heads * d_head]; hooks and norms see them per head
        q, k, v = hook(p + "hook_q", q), hook(p + "hook_k", k), hook(p + "hook_v", v)
        if b.qk_norm is not None:
            qn, kn = b.qk_norm
            q = qn(q.reshape(-1, dh)).reshape(N, -1)
            k = kn(k.reshape(-1, dh)).reshape(N, -1)
        if b.rotary:
            q = hook(p + "hook_rot_q", self._rotate(b, q.view(B, T, H, dh), pos_c).reshape(N, -1))
            k = hook(p + "hook_rot_k", self._rotate(b, k.view(B, T, Hkv, dh), pos_c).reshape(N, -1))
        L = mask.shape[-1]  # the span
        if where_kv is None:  # capture: the prompts' own keys and values, no cache
            K = k.view(B, T, Hkv, dh).transpose(1, 2).reshape(B * Hkv, T, dh)
            V = v.view(B, T, Hkv, dh).transpose(1, 2).reshape(B * Hkv, T, dh)
            qh = q.view(B, T, Hkv, G, dh).permute(0, 2, 3, 1, 4).reshape(B * Hkv, G * T, dh)
        else:
            # in place: this step's keys and values at each row's own positions (rows never share a slot position)
            _, _, key_rows, value_rows = self._layer_kv[li]
            if T == 1:
                key_rows.index_copy_(0, where_kv, k.reshape(-1, dh))
                value_rows.index_copy_(0, where_kv, v.reshape(-1, dh))
                qh = q.reshape(B * Hkv, G, dh)
            else:
                kw, vw = k.view(B, T, Hkv, dh).transpose(1, 2), v.view(B, T, Hkv, dh).transpose(1, 2)
                if expand is not None:  # streams: into the slot of every row of each
                    kw, vw = kw[expand], vw[expand]
                key_rows.index_copy_(0, where_kv, kw.reshape(-1, dh))
                value_rows.index_copy_(0, where_kv, vw.reshape(-1, dh))
                qh = q.view(B, T, Hkv, G, dh).permute(0, 2, 3, 1, 4).reshape(B * Hkv, G * T, dh)
            K, V = self._reads(li, rows, L, B)
        if b.softcap is None:  # scale, mask and q.k in one op (the mask adds 0 or -inf)
            scores = torch.baddbmm(mask, qh, K.transpose(1, 2), alpha=1.0 / b.scale)
        else:
            scores = torch.bmm(qh, K.transpose(1, 2)) / b.scale
            scores = b.softcap * torch.tanh(scores / b.softcap)
            scores = scores.view(B, Hkv, G, T, L).masked_fill(~mask, float("-inf")).view(B * Hkv, G * T, L)
        # every query sees at least its own key, so no row of the softmax is all -inf (no NaN to clean up)
        pattern = torch.softmax(scores, dim=-1)
        z = torch.bmm(pattern, V)  # [B * Hkv, G * T, d_head]
        if T == 1:
            z = z.view(N, H * dh)
        else:
            z = z.view(B, Hkv, G, T, dh).permute(0, 3, 1, 2, 4).reshape(N, H * dh)
        z = hook(p + "hook_z", z)
        return torch.addmm(b.b_O, z, b.W_O)
