"""Write a seeded, deterministic model pack with random weights (any shape).

Used for tests and benchmark shapes (e.g. a GPT-2-small-shaped model with 24,576-wide SAEs): time depends
on shape, not on the weights' values. The trained demo pack is built by ``scripts/demo_pack``.

    python scripts/make_random_pack.py --out /tmp/pack --n-layers 2 --d-model 64 --d-sae 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.pack import MODEL_SUBDIR, SAES_SUBDIR, save_model_dir  # noqa: E402

_WORDS = (
    "the a cat dog bird fish red blue green yellow one two three four five rain sun snow wind bread "
    "apple rice soup city river park house def return print if else for in is was and to of it on "
    "hello world big small runs jumps eats sees likes has"
).split()


def build_tokenizer(vocab_size: int, seed: int):
    """A real byte-level BPE tokenizer trained offline on a seeded word-salad corpus."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        add_bos_token=True, name_or_path="random-lm", model_max_length=1 << 20,
    )


def write_random_pack(
    out: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int = 128,
    d_sae: int = 256,
    vocab_size: int = 600,
    set_name: str = "res-demo",
    model_name: str = "demo-lm",
    seed: int = 0,
    tokenizer=None,
) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = tokenizer or build_tokenizer(vocab_size, seed)
    cfg_kwargs = dict(
        n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, d_head=d_model // n_heads, n_heads=n_heads,
        d_mlp=d_mlp or 4 * d_model, d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN",
        positional_embedding_type="standard", model_name=model_name, seed=seed, original_architecture="GPT2LMHeadModel",
    )
    tokenizer.name_or_path = model_name
    model = HookedTransformer(HookedTransformerConfig(**cfg_kwargs), tokenizer=tokenizer)
    save_model_dir(out / MODEL_SUBDIR, cfg_kwargs, model.state_dict(), tokenizer)
    for layer in range(n_layers):
        scfg = StandardSAEConfig(d_in=d_model, d_sae=d_sae)
        scfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        scfg.metadata.hook_head_index = None
        scfg.metadata.model_name = model_name
        scfg.metadata.prepend_bos = True
        sae = StandardSAE(scfg)
        with torch.no_grad():
            # Random but not degenerate: decoder rows of varied norm, encoder near their transpose, a bias
            # that leaves a few features firing per token.
            sae.W_dec.copy_(torch.randn(d_sae, d_model) * (0.5 + torch.rand(d_sae, 1)) / d_model**0.5)
            sae.W_enc.copy_(sae.W_dec.T * 4 + torch.randn(d_model, d_sae) * 0.05)
            sae.b_enc.copy_(-torch.rand(d_sae) * 2.0)
            sae.b_dec.copy_(torch.randn(d_model) * 0.01)
        sae.save_model(out / SAES_SUBDIR / set_name / str(layer))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=600)
    p.add_argument("--set-name", default="res-demo")
    p.add_argument("--model-name", default="demo-lm")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_random_pack(a.out, n_layers=a.n_layers, d_model=a.d_model, n_heads=a.n_heads, n_ctx=a.n_ctx, d_sae=a.d_sae,
                      vocab_size=a.vocab_size, set_name=a.set_name, model_name=a.model_name, seed=a.seed)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
