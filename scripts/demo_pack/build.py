"""Rebuild the trained demo pack ``models/demo-lm`` from scratch, deterministically from a seed.

    python -m scripts.demo_pack.build                 # everything (about 10 minutes on an idle CPU core)
    python -m scripts.demo_pack.build --stage saes    # reuse the committed model, retrain the SAEs
    python -m scripts.demo_pack.build --stage show    # only recompute features.json and the README section

Stages: ``lm`` (corpus, tokenizer, language model), ``saes`` (one SAE Lens SAE per layer on
``blocks.<layer>.hook_resid_post``), ``show`` (documented features, steering example, README section).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments.engine.pack import MODEL_SUBDIR, SAES_SUBDIR, load_model_dir, save_model_dir  # noqa: E402
from scripts.demo_pack import corpus as corpus_mod  # noqa: E402
from scripts.demo_pack.tokenizer import train_tokenizer  # noqa: E402

PACK = ROOT / "models" / "demo-lm"
SET_NAME = "res-demo"
N_DOCS = 40000
HELDOUT_FRAC = 0.05
VOCAB_SIZE = 4096


def corpus_split(seed: int):
    docs = corpus_mod.generate(N_DOCS, seed)
    n_test = int(len(docs) * HELDOUT_FRAC)
    return docs[:-n_test], docs[-n_test:]


def tokenize_docs(tok, docs) -> list[list[int]]:
    # no BOS here: pack_sequences puts one at the start of each chunk
    return [tok(d.text, add_special_tokens=False)["input_ids"] for d in docs]


def report_path() -> Path:
    return PACK / "training_report.json"


def load_report() -> dict:
    p = report_path()
    return json.loads(p.read_text()) if p.is_file() else {}


def save_report(rep: dict) -> None:
    report_path().write_text(json.dumps(rep, indent=2) + "\n")


def stage_lm(seed: int, steps: int) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from scripts.demo_pack.train_lm import eval_loss, model_cfg_kwargs, pack_sequences, train_lm, unigram_loss

    train_docs, test_docs = corpus_split(seed)
    tok = train_tokenizer([d.text for d in train_docs], vocab_size=VOCAB_SIZE, name_or_path="demo-lm")
    kwargs = model_cfg_kwargs(len(tok), seed)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    train = pack_sequences(tokenize_docs(tok, train_docs), kwargs["n_ctx"], bos, eos)
    test = pack_sequences(tokenize_docs(tok, test_docs), kwargs["n_ctx"], bos, eos)
    print(f"vocab {len(tok)}; train {tuple(train.shape)} test {tuple(test.shape)}", flush=True)
    torch.manual_seed(seed)
    model = HookedTransformer(HookedTransformerConfig(**kwargs), tokenizer=tok)
    log = train_lm(model, train, test, steps=steps, batch=32, lr=2e-3, seed=seed)
    test_loss = eval_loss(model, test)
    uni = unigram_loss(train, test, len(tok))
    print(f"held-out loss {test_loss:.4f} vs unigram {uni:.4f}", flush=True)
    if PACK.exists():
        shutil.rmtree(PACK)
    save_model_dir(PACK / MODEL_SUBDIR, kwargs, model.state_dict(), tok)
    corpus_bytes = sum(len(d.text.encode()) for d in train_docs + test_docs)
    save_report({
        "seed": seed,
        "corpus": {"n_docs": N_DOCS, "bytes": corpus_bytes, "train_tokens": int(train.numel()),
                   "heldout_tokens": int(test.numel()), "vocab_size": len(tok)},
        "lm": {"config": kwargs, "heldout_loss": round(test_loss, 4), "unigram_baseline_loss": round(uni, 4),
               **log},
    })


def stage_saes(seed: int, samples: int) -> None:
    from scripts.demo_pack.train_saes import train_all_saes

    model = load_model_dir(PACK)
    train_docs, test_docs = corpus_split(seed)
    from scripts.demo_pack.train_lm import pack_sequences

    tok = model.tokenizer
    train = pack_sequences(tokenize_docs(tok, train_docs), model.cfg.n_ctx, tok.bos_token_id, tok.eos_token_id)
    test = pack_sequences(tokenize_docs(tok, test_docs), model.cfg.n_ctx, tok.bos_token_id, tok.eos_token_id)
    out_root = PACK / SAES_SUBDIR / SET_NAME
    if out_root.exists():
        shutil.rmtree(out_root)
    stats = train_all_saes(model, train, test, out_root, seed=seed, total_samples=samples)
    rep = load_report()
    rep["saes"] = stats
    save_report(rep)


def stage_show(seed: int) -> None:
    from scripts.demo_pack.showcase import run_showcase

    _, test_docs = corpus_split(seed)
    run_showcase(PACK, SET_NAME, test_docs, PACK / "README.md", seed=seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "lm", "saes", "show"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-steps", type=int, default=250)
    p.add_argument("--sae-samples", type=int, default=400_000)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("DEMO_PACK_THREADS", "1")))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if a.stage in ("all", "lm"):
        stage_lm(a.seed, a.lm_steps)
    if a.stage in ("all", "saes"):
        stage_saes(a.seed, a.sae_samples)
    if a.stage in ("all", "show"):
        stage_show(a.seed)


if __name__ == "__main__":
    main()
