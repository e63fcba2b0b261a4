"""Capture through engine.decoder's forward pass (``SlotDecoder.capture``, what ``ModelRunner`` uses where it can)
against TransformerLens's ``run_with_cache`` on the same random weights: every architecture family the decoder
implements, every hook point it offers, prompts of different lengths right-padded into one batch, a stopping layer.

Tolerance: 1e-5 of each hook's largest magnitude in the prompt, as in test_decoder (the same formulas with
differently shaped matmuls and fused norms: float32 reassociation, ~1e-7 relative here). A wrong hook, position,
head layout or mask moves values at the 1e-2 level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine.capture import ModelRunner
from deployments.engine.decoder import SlotDecoder
from deployments.hooks import stop_layer_for
from deployments.protocol import CaptureRequest

from .test_decoder import ARCHS, make

LENGTHS = (9, 4, 7)  # one padded batch: the longest first, the shortest in the middle


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    return make(request.param)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def reference(model, seq: list[int], hooks: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt alone through TransformerLens, no padding."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([seq]), names_filter=lambda n: n in hooks)
    return {h: cache[h][0] for h in hooks}


def assert_close(got: np.ndarray, want: torch.Tensor, what: str):
    want = want.numpy()
    assert got.shape == want.shape, what
    scale = max(float(np.abs(want).max()), 1e-3)
    err = float(np.abs(got - want).max())
    assert err <= 1e-5 * scale, f"{what}: {err:.3g} of scale {scale:.3g}"


def capture_equals_reference(model, runner: ModelRunner, hooks: list[str]) -> None:
    """The prompts captured as one padded batch equal each prompt alone through run_with_cache, at every hook."""
    seqs = prompts(model.cfg.d_vocab)
    got = runner.capture([CaptureRequest(s, hooks) for s in seqs])
    for s, g in zip(seqs, got):
        ref = reference(model, s, hooks)
        for h in hooks:
            assert_close(g[h], ref[h], f"{h} (length {len(s)})")


def test_every_hook_of_every_architecture_equals_run_with_cache(model):
    dec = SlotDecoder(model, 1)
    runner = ModelRunner(model, "cpu", lean=False)
    runner.use_decoder(dec)
    capture_equals_reference(model, runner, sorted(dec.widths))
    assert runner.stats == {"lean_passes": 1, "hooked_passes": 0}


def test_a_stopping_layer_runs_only_the_blocks_before_it(model):
    """Hooks of block 0 alone stop the pass after block 0; their values are the full model's."""
    hooks = ["blocks.0.hook_resid_post", "hook_embed"]
    assert stop_layer_for(hooks, model.cfg.n_layers) == 1
    dec = SlotDecoder(model, 1)
    seqs = prompts(model.cfg.d_vocab)
    batch = torch.zeros((len(seqs), max(LENGTHS)), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = torch.tensor(s)
    calls = []
    handles = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    try:
        out = dec.capture(batch, hooks, 1)
    finally:
        for hnd in handles:
            hnd.remove()
    assert calls == []  # the decoder never calls TransformerLens's modules for a standard block
    for i, s in enumerate(seqs):
        ref = reference(model, s, hooks)
        for h in hooks:
            assert_close(out[h][i, : len(s)].numpy(), ref[h].reshape(len(s), -1), h)


def test_hooks_it_does_not_offer_go_through_transformer_lens(model):
    """An attention pattern (and anything else outside ``widths``) is captured by run_with_cache, equal to it."""
    runner = ModelRunner(model, "cpu")
    assert runner.decoder is not None
    capture_equals_reference(model, runner, ["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"])
    assert runner.stats == {"lean_passes": 0, "hooked_passes": 1}


def test_capture_leaves_the_kv_cache_alone():
    """Capture between decode steps: the slots' keys and values are untouched."""
    model = make("llama")
    dec = SlotDecoder(model, 40)
    dec.ensure_slots(4)
    g = torch.Generator().manual_seed(6)
    dec.kv.copy_(torch.randn(dec.kv.shape, generator=g))
    before = dec.kv.clone()
    dec.capture(torch.tensor([[1, 2, 3, 4, 5]]), ["blocks.1.hook_resid_post"])
    assert torch.equal(dec.kv, before)
