"""scripts/fit_jacobian_lens.py against autograd through TransformerLens's own blocks, and the lens the demo pack
ships: it loads for the pack's model and reads the final layer out better than the plain logit lens does."""

from __future__ import annotations

import torch

from deployments.engine.lens import JacobianLens
from scripts.fit_jacobian_lens import document_tokens, fit, position_jacobians
from tests import reference as R

LENS_FILE = "jlens/demo-corpus/demo-lm_jacobian_lens.pt"


def blockwise_jacobian(m, ids: list[int], layer: int) -> torch.Tensor:
    """d resid_post[final] / d resid_post[layer] over the whole sequence, [T, d, T, d], by running the blocks above."""
    with torch.no_grad():
        _, cache = m.run_with_cache(torch.tensor([ids]))
    h = cache[f"blocks.{layer}.hook_resid_post"].detach()

    def above(x):
        for k in range(layer + 1, m.cfg.n_layers):
            x = m.blocks[k](x)
        return x

    # vectorize: all output rows in one batched backward pass (vmap) rather than one pass per row: same numbers
    return torch.autograd.functional.jacobian(above, h, vectorize=True)[0, :, :, 0]


def test_fit_is_the_mean_same_position_jacobian(pack_dir):
    m = R.model(str(pack_dir))
    texts = ["the cat sat on the mat.", "Tom saw a red bird."]
    lens = fit(m, texts, max_len=16, positions_per_doc=0, rows_per_pass=48)  # rows in 3 passes per position
    assert lens["source_layers"] == list(range(m.cfg.n_layers - 1))
    for layer in lens["source_layers"]:
        total, n = torch.zeros(m.cfg.d_model, m.cfg.d_model, dtype=torch.float64), 0
        for text in texts:
            ids = document_tokens(m, text, 16)
            jac = blockwise_jacobian(m, ids, layer).double()
            for t in range(1, len(ids)):  # BOS left out
                total += jac[t, :, t, :]
                n += 1
        assert lens["n_positions"] == n
        want = total / n
        # float32 backward passes in other shapes: agreement to float32 accumulation over d terms per layer
        assert torch.allclose(lens["J"][layer].double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_positions_are_sampled_per_document(pack_dir):
    m = R.model(str(pack_dir))
    ids = document_tokens(m, "the cat sat on the mat and the dog ran", 32)
    one = position_jacobians(m, ids, [3], [0])[0]
    both = position_jacobians(m, ids, [3, 5], [0])[0]
    assert not torch.allclose(one, both)
    lens = fit(m, ["the cat sat on the mat and the dog ran"], positions_per_doc=2, seed=0)
    assert lens["n_positions"] == 2
    assert all(p.requires_grad for p in m.parameters())  # the model is left as it was


def test_the_demo_packs_lens_fits_its_model(pack_dir):
    m = R.model(str(pack_dir))
    data = torch.load(pack_dir / LENS_FILE, map_location="cpu", weights_only=True)
    lens = JacobianLens.from_dict(data, m.cfg.d_model, m.cfg.n_layers)
    assert lens.source_layers == list(range(m.cfg.n_layers - 1)) and data["n_positions"] >= 1000
    # On held-out text, layer l carried through J_l is closer to the model's output distribution than layer l
    # decoded as it is (the logit lens): what the lens was fitted for.
    from scripts.demo_pack.corpus import generate

    texts = [d.text for d in generate(40, seed=7)]
    kl = {"logit": torch.zeros(len(lens.source_layers)), "jacobian": torch.zeros(len(lens.source_layers))}
    with torch.no_grad():
        for text in texts:
            ids = document_tokens(m, text, 48)
            _, cache = m.run_with_cache(torch.tensor([ids]))
            final = torch.log_softmax(m.unembed(m.ln_final(cache[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"])), -1)[0]
            for k, layer in enumerate(lens.source_layers):
                r = cache[f"blocks.{layer}.hook_resid_post"]
                for name, x in (("logit", r), ("jacobian", r @ lens.J[layer].T)):
                    lp = torch.log_softmax(m.unembed(m.ln_final(x)), -1)[0]
                    kl[name][k] += (final.exp() * (final - lp)).sum(-1)[1:].mean()
    assert (kl["jacobian"] < kl["logit"]).all(), kl
