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
