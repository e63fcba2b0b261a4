"""Train the small HookedTransformer language model on the demo corpus (CPU, a few minutes)."""

from __future__ import annotations

import math
import time

import torch

MODEL_NAME = "demo-lm"


def model_cfg_kwargs(d_vocab: int, seed: int) -> dict:
    return dict(
        n_layers=4, d_model=128, n_ctx=128, d_head=32, n_heads=4, d_mlp=512, d_vocab=d_vocab, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="standard", model_name=MODEL_NAME, seed=seed,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=True,
    )


def pack_sequences(doc_ids: list[list[int]], n_ctx: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Chunks of ``n_ctx`` tokens: each starts with BOS at a document start, documents end with EOS.

    Fills each chunk with whole documents (the last one may be cut off), like the service sees text:
    BOS first, then a document, then EOS before the next one.
    """
    chunks, cur = [], [bos_id]
    for ids in doc_ids:
        if len(cur) >= n_ctx:
            chunks.append(cur[:n_ctx])
            cur = [bos_id]
        cur.extend(ids + [eos_id])
    if len(cur) >= n_ctx:
        chunks.append(cur[:n_ctx])
    return torch.tensor(chunks, dtype=torch.long)


def unigram_loss(train: torch.Tensor, test: torch.Tensor, d_vocab: int) -> float:
    """Cross-entropy (nats) on the test targets of a unigram model fit (add-one) on the train targets."""
    counts = torch.bincount(train[:, 1:].reshape(-1), minlength=d_vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[test[:, 1:].reshape(-1)].mean())


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i : i + batch]
        loss = model(x, return_type="loss", loss_per_token=True)
        tot += float(loss.sum())
        n += loss.numel()
    model.train()
    return tot / n


def train_lm(model, train: torch.Tensor, test: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int,
             log_every: int = 100) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    warm = max(1, steps // 20)

    def lr_at(s):
        return lr * min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))

    history = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        idx = torch.randint(0, len(train), (batch,), generator=g)
        loss = model(train[idx], return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step == 0:
            rec = {"step": step + 1, "train_loss": float(loss), "seconds": round(time.time() - t0, 1)}
            if (step + 1) % (log_every * 5) == 0:
                rec["test_loss"] = eval_loss(model, test[:256])
            history.append(rec)
            print(rec, flush=True)
    model.eval()
    return {"history": history, "train_seconds": round(time.time() - t0, 1), "steps": steps, "batch": batch,
            "tokens_seen": steps * batch * train.shape[1]}
