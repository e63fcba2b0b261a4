"""Train one SAE per layer on ``blocks.<layer>.hook_resid_post`` with SAE Lens's own trainer.

The activation source is an in-memory tensor of the model's residual stream over the training corpus
(BOS positions left out, as the service ignores them), served to ``sae_lens.SAETrainer`` as its
``DataProvider`` (an iterator of ``[batch, d_in]`` tensors).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@torch.no_grad()
def collect_acts(model, tokens: torch.Tensor, layer: int, batch: int = 64) -> torch.Tensor:
    """``[n_tokens, d_model]`` residual activations at ``layer``, BOS positions dropped."""
    name = hook_name(layer)
    out = []
    for i in range(0, len(tokens), batch):
        _, cache = model.run_with_cache(tokens[i : i + batch], names_filter=[name], stop_at_layer=layer + 1)
        out.append(cache[name][:, 1:].reshape(-1, model.cfg.d_model))
    return torch.cat(out)


def batches(acts: torch.Tensor, batch_size: int, seed: int):
    """Endless seeded shuffled batches: the trainer's DataProvider."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


@torch.no_grad()
def sae_stats(sae, model, acts: torch.Tensor, test_tokens: torch.Tensor, layer: int) -> dict:
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    resid = ((acts - recon) ** 2).sum()
    total = ((acts - acts.mean(0)) ** 2).sum()
    fired = (feats > 0).any(0)
    name = hook_name(layer)

    def splice(x, hook):
        return sae.decode(sae.encode(x))

    toks = test_tokens[:32]
    clean = float(model(toks, return_type="loss"))
    spliced = float(model.run_with_hooks(toks, return_type="loss", fwd_hooks=[(name, splice)]))

    def zero(x, hook):
        return torch.zeros_like(x)

    zeroed = float(model.run_with_hooks(toks, return_type="loss", fwd_hooks=[(name, zero)]))
    return {
        "l0": round(float((feats > 0).float().sum(-1).mean()), 2),
        "explained_variance": round(float(1 - resid / total), 4),
        "dead_fraction": round(float(1 - fired.float().mean()), 4),
        "heldout_tokens": len(acts),
        "ce_loss_clean": round(clean, 4),
        "ce_loss_with_sae": round(spliced, 4),
        "ce_loss_zero_ablation": round(zeroed, 4),
    }


def train_one(acts: torch.Tensor, *, d_sae: int, l1: float, lr: float, samples: int, batch: int, seed: int):
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(seed)
    steps = samples // batch
    cfg = StandardTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=d_sae, l1_coefficient=l1, l1_warm_up_steps=steps // 10,
        normalize_activations="expected_average_only_in", apply_b_dec_to_input=False, decoder_init_norm=0.1,
    )
    sae = StandardTrainingSAE(cfg)
    tcfg = SAETrainerConfig(
        total_training_samples=samples, train_batch_size_samples=batch, lr=lr, lr_scheduler_name="constant",
        lr_warm_up_steps=steps // 20, lr_decay_steps=steps // 5, lr_end=lr / 10, device="cpu",
        dead_feature_window=200, feature_sampling_window=500, n_batches_for_norm_estimate=20,
    )
    trainer = SAETrainer(tcfg, sae, batches(acts, batch, seed))
    return trainer.fit()


def train_all_saes(model, train_tokens: torch.Tensor, test_tokens: torch.Tensor, out_root: Path, *, seed: int,
                   total_samples: int, d_sae: int = 1024, l1: float = 1.5, lr: float = 1e-3, batch: int = 2048,
                   max_train_seqs: int = 1000) -> dict:
    stats = {}
    for layer in range(model.cfg.n_layers):
        t0 = time.time()
        acts = collect_acts(model, train_tokens[:max_train_seqs], layer)
        sae = train_one(acts, d_sae=d_sae, l1=l1, lr=lr, samples=total_samples, batch=batch, seed=seed + layer)
        md = sae.cfg.metadata
        md.hook_name = hook_name(layer)
        md.hook_head_index = None
        md.model_name = model.cfg.model_name
        md.prepend_bos = True
        md.context_size = model.cfg.n_ctx
        md.exclude_special_tokens = True
        md.dataset_path = "scripts/demo_pack/corpus.py"
        md.model_from_pretrained_kwargs = {}
        sae.eval()
        out = out_root / str(layer)
        sae.save_inference_model(out)
        from sae_lens import SAE

        loaded = SAE.load_from_disk(str(out), device="cpu")
        test_acts = collect_acts(model, test_tokens[:200], layer)
        s = sae_stats(loaded, model, test_acts, test_tokens, layer)
        s.update({"d_sae": d_sae, "l1_coefficient": l1, "lr": lr, "training_samples": total_samples,
                  "train_tokens_in_buffer": len(acts), "seconds": round(time.time() - t0, 1)})
        stats[f"{layer}-res-demo"] = s
        print(f"layer {layer}: {s}", flush=True)
    return stats
