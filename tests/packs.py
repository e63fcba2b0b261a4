"""Small SAEs the tests write themselves (shapes the demo pack does not have)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_hook_z_sae(out: Path, n_heads: int, d_head: int, layer: int = 0, d_sae: int = 96, seed: int = 0,
                     model_name: str = "demo-lm") -> Path:
    """A standard SAE on ``blocks.<layer>.attn.hook_z`` (SAE Lens format, ``reshape_activations="hook_z"``)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    d_in = n_heads * d_head
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, reshape_activations="hook_z")
    cfg.metadata.hook_name = f"blocks.{layer}.attn.hook_z"
    cfg.metadata.model_name = model_name
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 3 + torch.randn(d_in, d_sae) * 0.05)
        sae.b_enc.copy_(-torch.rand(d_sae) * 0.2)
    sae.save_model(out)
    return out


def write_temporal_sae(out: Path, d_in: int, layer: int = 1, d_sae: int = 256, seed: int = 0, model_name: str = "demo-lm",
                       hook: str = "hook_resid_post") -> Path:
    """A temporal SAE (SAE Lens ``TemporalSAE``, tied weights as it defaults to) on ``blocks.<layer>.<hook>``: its
    attention over the context predicts part of each position's code (``encode_with_predictions``), which
    util/similarity-matrix-pred reads. Random weights, scaled so that both the predicted and the novel codes are
    non-trivial on the demo model's activations."""
    from sae_lens.saes.temporal_sae import TemporalSAE, TemporalSAEConfig

    torch.manual_seed(seed)
    cfg = TemporalSAEConfig(d_in=d_in, d_sae=d_sae, n_heads=4, bottleneck_factor=16, sae_diff_type="topk", kval_topk=16,
                            tied_weights=True)
    cfg.metadata.hook_name = f"blocks.{layer}.{hook}"
    cfg.metadata.model_name = model_name
    sae = TemporalSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in) * (4 * d_in) / d_in**0.5)  # undoes the encoder's 1 / (4 d_in) scale
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
        for attn in sae.attn_layers:  # content-dependent predictions: no biases, weights well above SAE Lens's init
            for lin in (attn.k_ctx, attn.q_target, attn.v_ctx, attn.c_proj):
                lin.bias.zero_()
            attn.v_ctx.weight.copy_(torch.randn_like(attn.v_ctx.weight) / 16)
            attn.c_proj.weight.copy_(torch.randn_like(attn.c_proj.weight) / 16)
            attn.k_ctx.weight.mul_(4)
            attn.q_target.weight.mul_(4)
    sae.save_model(out)
    return out
