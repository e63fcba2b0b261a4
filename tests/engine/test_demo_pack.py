"""The committed trained demo pack (models/demo-lm) loads with plain library calls and means something.

Reads ``models/demo-lm/features.json`` (written by ``scripts/demo_pack/showcase.py``) for the documented
topic features and the steering example, and checks them with plain TransformerLens / SAE Lens calls.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

PACK = Path(__file__).resolve().parents[2] / "models" / "demo-lm"
if not (PACK / "features.json").is_file():
    pytest.skip("models/demo-lm is not the trained pack (no features.json): run `make demo-pack`",
                allow_module_level=True)
FEATURES = json.loads((PACK / "features.json").read_text())
WORD_RE = re.compile(r"[A-Za-z]+")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(PACK / "model"))
    tok.name_or_path = str(PACK / "model")
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**json.loads((PACK / "model" / "config.json").read_text()))
    m = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    m.load_state_dict(load_file(str(PACK / "model" / "model.safetensors")), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def saes():
    from sae_lens import SAE

    root = PACK / "saes" / "res-demo"
    return {f"{d.name}-res-demo": SAE.load_from_disk(str(d), device="cpu") for d in sorted(root.iterdir())}


def test_tokenizer_specials_and_chat_template(tokenizer):
    ids = tokenizer("the dog")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token == "<|bos|>"
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1


def test_pack_loads_and_is_consistent(model, saes):
    assert model.cfg.model_name == "demo-lm"
    assert set(saes) == {f"{i}-res-demo" for i in range(model.cfg.n_layers)}
    for sid, sae in saes.items():
        layer = int(sid.split("-")[0])
        md = sae.cfg.metadata
        assert md.hook_name == f"blocks.{layer}.hook_resid_post"
        assert md.model_name == "demo-lm" and md.prepend_bos is True
        assert sae.cfg.d_in == model.cfg.d_model
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    assert size <= 25e6


def test_model_learned_the_corpus(model):
    rep = json.loads((PACK / "training_report.json").read_text())
    assert rep["lm"]["heldout_loss"] < rep["lm"]["unigram_baseline_loss"] - 1.0
    loss = float(model(model.to_tokens("The dog chased the cat. The cat has four paws and a long tail."),
                       return_type="loss"))
    assert loss < 3.0
    for s in rep["saes"].values():
        assert s["explained_variance"] > 0.7 and s["dead_fraction"] < 0.5


@pytest.mark.parametrize("topic", sorted(FEATURES["topics"]))
def test_documented_feature_is_top_on_its_example(model, saes, topic):
    t = FEATURES["topics"][topic]
    sae = saes[t["sae_id"]]
    _, cache = model.run_with_cache(model.to_tokens(t["example"]), names_filter=[t["hook_name"]])
    acts = sae.encode(cache[t["hook_name"]][0, 1:])  # ignore BOS
    assert int(acts.max(0).values.argmax()) == t["feature"]


def _complete(model, prompt, n, max_new, seed, hooks=()):
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]] * n)
    plen = ids.shape[1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model.run_with_hooks(ids, fwd_hooks=list(hooks))[:, -1]
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], 1)
    outs = []
    for row in ids[:, plen:].tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        outs.append(tok.decode(row, skip_special_tokens=True))
    return outs


def _rate(texts, words):
    ws = [w for t in texts for w in WORD_RE.findall(t)]
    return sum(w in words for w in ws) / max(1, len(ws))


def test_steering_the_topic_feature_talks_about_the_topic(model, saes):
    s = FEATURES["steering"]
    words = set(FEATURES["topics"][s["topic"]]["words"])
    vec = s["strength"] * saes[s["sae_id"]].W_dec[s["feature"]].detach()

    def add(x, hook):
        return x + vec

    kw = dict(n=s["n_completions"], max_new=s["max_new_tokens"], seed=s["seed"])
    base = _rate(_complete(model, s["prompt"], **kw), words)
    steered = _rate(_complete(model, s["prompt"], hooks=[(s["hook_name"], add)], **kw), words)
    assert steered >= base + 0.2, (base, steered)
    assert steered >= 2 * base, (base, steered)
