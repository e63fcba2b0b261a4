"""SlotDecoder against HookedTransformer on the same (random) weights, for each architecture family it implements:
prefill and cached decode logits, and steering at every hook point it offers against a TransformerLens hook.

Tolerance: 1e-5 of the logit scale. The two compute the same formulas in float32 but with differently shaped
matmuls (fused QKV, GQA grouped instead of repeated heads, keys over the slot's full length) and fused norms, so
they differ by float32 reassociation (~1e-7 relative here); a misplaced hook, a wrong position or mask changes
logits at the 1e-2 level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine.decoder import SlotDecoder, UnsupportedModel
from deployments.engine.steering import SlotSteering, SteerVector

BASE = dict(n_layers=2, d_model=32, n_ctx=48, d_head=8, n_heads=4, d_vocab=97, act_fn="gelu_new", normalization_type="LN",
            d_mlp=64, seed=0)
ARCHS = {
    "gpt2": {},
    "llama": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                  gated_mlp=True, act_fn="silu", final_rms=True),
    "neox": dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu"),
    "gptj": dict(positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=True, parallel_attn_mlp=True),
    "gemma2": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=1,
                   gated_mlp=True, act_fn="gelu_pytorch_tanh", use_local_attn=True, attn_types=["local", "global"],
                   window_size=5, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0,
                   use_normalization_before_and_after=True),
    "qwen3": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                  gated_mlp=True, act_fn="silu", use_qk_norm=True),
    "attn-only": dict(attn_only=True, normalization_type="LNPre"),
    "mixtral": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                    gated_mlp=True, act_fn="silu", num_experts=4, experts_per_token=2),  # the MoE block as a module
}


def make(arch: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**{**BASE, **ARCHS[arch]})
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # norm scales near 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    return make(request.param)


def run(dec: SlotDecoder, seq: list[int], steering=None, slot: int = 1) -> list[torch.Tensor]:
    """Prefill seq[:7] in ``slot`` (batched with a neighbour in slot 0), then decode the rest one token at a time;
    the logits after each position from 6 on."""
    n = 7
    nq = 8
    toks = torch.tensor([seq[:n] + [0] * (nq - n), seq[2:2 + n] + [0] * (nq - n)])
    rows = torch.tensor([slot, 0])
    pos = torch.arange(nq).expand(2, nq)
    out = [dec.forward(toks, pos, rows, rows, steering, None, None, torch.tensor([n - 1, n - 1]))[0]]
    for t in range(n, len(seq)):
        toks = torch.tensor([[seq[t]], [seq[t]]])
        pos = torch.tensor([[t], [t]])
        out.append(dec.forward(toks, pos, rows, rows, steering)[0])
    return out


def assert_close(ours: list[torch.Tensor], ref: torch.Tensor):
    scale = float(ref.abs().max())
    for k, logits in enumerate(ours):
        assert torch.allclose(logits, ref[6 + k], rtol=0, atol=1e-5 * max(scale, 1.0)), k


def test_prefill_and_decode_equal_transformer_lens(model):
    dec = SlotDecoder(model, 40)
    dec.ensure_slots(4)
    seq = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0]
    assert_close(run(dec, seq), ref)


def test_steering_at_every_hook_equals_a_transformer_lens_hook(model):
    dec = SlotDecoder(model, 40)
    dec.ensure_slots(4)
    seq = torch.randint(0, 97, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    rng = np.random.RandomState(4)
    for hook, width in dec.widths.items():
        v = rng.randn(width).astype(np.float32)
        st = SlotSteering(4, dec.widths, "cpu")
        st.set_row(1, [SteerVector(hook, v, 0.7)])
        vt = torch.as_tensor(v)

        def add(act, hook=None):
            return act + 0.7 * vt.view(act.shape[2:])

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook, add)]):
            ref = model(torch.tensor([seq]))[0]
        with torch.no_grad():
            plain = model(torch.tensor([seq]))[0]
        if not hook.endswith(("hook_k", "hook_rot_k")):  # the same vector on every key shifts scores uniformly
            assert not torch.allclose(ref, plain, atol=1e-3), hook  # the hook matters here
        assert_close(run(dec, seq, st), ref)


def test_unsupported_architectures_are_refused():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**{**BASE, "positional_embedding_type": "alibi"})
    with pytest.raises(UnsupportedModel, match="alibi") as e:
        SlotDecoder(HookedTransformer(cfg), 40)
    assert e.value.status == 501
