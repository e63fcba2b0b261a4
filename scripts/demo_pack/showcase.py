"""Find documented features in the trained pack, show their top contexts and a steering example.

Writes ``models/demo-lm/features.json`` (machine-readable, read by tests/engine/test_demo_pack.py) and the
``models/demo-lm/README.md`` section between ``<!-- demo-pack:begin -->`` and ``<!-- demo-pack:end -->`` (or ``REPORT.md`` in the pack
when the markers are missing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from scripts.demo_pack.corpus import SENTENCE_FNS, TOPIC_WORDS, TOPICS

BEGIN, END = "<!-- demo-pack:begin -->", "<!-- demo-pack:end -->"
STEER_PROMPT = "I think"
N_COMPLETIONS = 20
MAX_NEW_TOKENS = 16
STRENGTH_MULTIPLES = (3.0, 6.0)
WORD_RE = re.compile(r"[A-Za-z]+")


def word_rate(texts: list[str], words: set[str]) -> float:
    ws = [w for t in texts for w in WORD_RE.findall(t)]
    return sum(w in words for w in ws) / max(1, len(ws))


@torch.no_grad()
def sample(model, prompt: str, *, n: int, max_new_tokens: int, seed: int, hooks=(), temperature: float = 1.0):
    """``n`` seeded completions of ``prompt`` (cut at EOS), with ``hooks`` active on every forward pass."""
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]] * n)
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = model.run_with_hooks(ids, fwd_hooks=list(hooks))[:, -1] / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    plen = len(tok(prompt)["input_ids"])
    outs = []
    for row in ids[:, plen:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        outs.append(tok.decode(row, skip_special_tokens=True))
    return outs


def steer_hook(vec: torch.Tensor):
    def hook(x, hook):
        return x + vec

    return hook


@torch.no_grad()
def doc_activations(model, saes: dict, docs, batch: int = 32):
    """Per token (BOS dropped): SAE feature acts per sae id ``[n_tok, d_sae]``, topic index, token ids, doc idx."""
    tok = model.tokenizer
    seqs = [tok(d.text)["input_ids"][: model.cfg.n_ctx] for d in docs]
    feats = {k: [] for k in saes}
    topics, token_ids, where = [], [], []
    names = sorted({s.cfg.metadata.hook_name for s in saes.values()})
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        L = max(map(len, chunk))
        x = torch.full((len(chunk), L), tok.pad_token_id)
        mask = torch.zeros(len(chunk), L, dtype=torch.bool)
        for j, s in enumerate(chunk):
            x[j, : len(s)] = torch.tensor(s)
            mask[j, 1 : len(s)] = True
        _, cache = model.run_with_cache(x, names_filter=names)
        for k, sae in saes.items():
            feats[k].append(sae.encode(cache[sae.cfg.metadata.hook_name][mask]))
        for j, s in enumerate(chunk):
            topics += [TOPICS.index(docs[i + j].topic)] * (len(s) - 1)
            token_ids += s[1:]
            where += [(i + j, p) for p in range(1, len(s))]
    return {k: torch.cat(v) for k, v in feats.items()}, torch.tensor(topics), torch.tensor(token_ids), where, seqs


def topic_scores(acts: torch.Tensor, topics: torch.Tensor) -> torch.Tensor:
    """``[n_topics, d_sae]``: precision (share of the feature's activation mass inside the topic) times recall
    (share of the topic's tokens where it fires). High for features that fire throughout documents of one topic."""
    mass = torch.stack([acts[topics == t].sum(0) for t in range(len(TOPICS))])
    fires = torch.stack([(acts[topics == t] > 0).float().mean(0) for t in range(len(TOPICS))])
    precision = mass / mass.sum(0).clamp_min(1e-9)
    return precision * fires


@torch.no_grad()
def top_feature(model, sae, text: str) -> tuple[int, float]:
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=[sae.cfg.metadata.hook_name])
    f = sae.encode(cache[sae.cfg.metadata.hook_name][0, 1:]).max(0).values
    return int(f.argmax()), float(f.max())


def context_of(tok, seqs, where, idx: int, left: int = 8) -> str:
    d, p = where[idx]
    s = seqs[d]
    before = tok.decode(s[max(1, p - left) : p])
    return f"{before}[[{tok.decode([s[p]])}]]".replace("\n", "\\n")


def run_showcase(pack: Path, set_name: str, test_docs, readme: Path, *, seed: int = 0) -> dict:
    import random

    from sae_lens import SAE

    from deployments.engine.pack import load_model_dir, local_sae_set_dirs

    model = load_model_dir(pack)
    tok = model.tokenizer
    saes = {k: SAE.load_from_disk(str(d), device="cpu") for k, d in local_sae_set_dirs(pack, set_name).items()}
    plain_docs = [d for d in test_docs if not d.chat][:400]
    acts, topics, token_ids, where, seqs = doc_activations(model, saes, plain_docs)
    rng = random.Random(seed + 1234)
    examples = {t: [SENTENCE_FNS[t](rng) for _ in range(40)] for t in TOPICS}
    base = sample(model, STEER_PROMPT, n=N_COMPLETIONS, max_new_tokens=MAX_NEW_TOKENS, seed=seed)

    topics_out, steer_all = {}, {}
    for ti, topic in enumerate(TOPICS):
        words = set(TOPIC_WORDS[topic])
        base_rate = word_rate(base, words)
        best = None
        for sae_id, sae in saes.items():
            sc = topic_scores(acts[sae_id], topics)[ti]
            for f in sc.topk(2).indices.tolist():
                ex = next((e for e in examples[topic] if top_feature(model, sae, e)[0] == f), None)
                if ex is None:
                    continue
                max_act = float(acts[sae_id][:, f].max())
                for mult in STRENGTH_MULTIPLES:
                    vec = mult * max_act * sae.W_dec[f].detach()
                    outs = sample(model, STEER_PROMPT, n=N_COMPLETIONS, max_new_tokens=MAX_NEW_TOKENS, seed=seed,
                                  hooks=[(sae.cfg.metadata.hook_name, steer_hook(vec))])
                    rate = word_rate(outs, words)
                    cand = dict(sae_id=sae_id, feature=f, score=float(sc[f]), example=ex, max_act=max_act,
                                strength=round(mult * max_act, 3), rate=rate, outs=outs)
                    # prefer the lift, then the topic score; the smallest strength wins ties
                    key = (round(rate - base_rate, 2), float(sc[f]))
                    if best is None or key > best[0]:
                        best = (key, cand)
        if best is None:
            print(f"{topic}: no feature found")
            continue
        c = best[1]
        a = acts[c["sae_id"]][:, c["feature"]]
        top_idx = a.topk(8).indices.tolist()
        top_tok_counts: dict[str, float] = {}
        for i in a.topk(200).indices.tolist():
            w = tok.decode([int(token_ids[i])]).strip()
            top_tok_counts[w] = top_tok_counts.get(w, 0) + 1
        sae = saes[c["sae_id"]]
        topics_out[topic] = {
            "sae_id": c["sae_id"], "hook_name": sae.cfg.metadata.hook_name, "feature": c["feature"],
            "topic_score": round(c["score"], 4), "max_activation": round(c["max_act"], 3),
            "fires_on_topic_tokens": round(float((a[topics == ti] > 0).float().mean()), 3),
            "fires_on_other_tokens": round(float((a[topics != ti] > 0).float().mean()), 3),
            "words": TOPIC_WORDS[topic], "example": c["example"],
            "top_tokens": [w for w, _ in sorted(top_tok_counts.items(), key=lambda kv: -kv[1])[:10]],
            "top_contexts": [{"context": context_of(tok, seqs, where, i), "activation": round(float(a[i]), 3)}
                             for i in top_idx],
        }
        steer_all[topic] = {"sae_id": c["sae_id"], "feature": c["feature"], "strength": c["strength"],
                            "word_rate_unsteered": round(base_rate, 4), "word_rate_steered": round(c["rate"], 4),
                            "completions": c["outs"][:5]}
        print(topic, topics_out[topic]["sae_id"], c["feature"], steer_all[topic]["word_rate_unsteered"],
              steer_all[topic]["word_rate_steered"], flush=True)

    # the headline steering example: the topic with the largest lift
    head = max(steer_all, key=lambda t: steer_all[t]["word_rate_steered"] - steer_all[t]["word_rate_unsteered"])
    hs = steer_all[head]
    steering = {
        "topic": head, "sae_id": hs["sae_id"], "hook_name": saes[hs["sae_id"]].cfg.metadata.hook_name,
        "feature": hs["feature"], "strength": hs["strength"], "prompt": STEER_PROMPT,
        "method": "add strength * W_dec[feature] to the hook's output at every position (incl. BOS)",
        "n_completions": N_COMPLETIONS, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "seed": seed,
        "word_rate_unsteered": hs["word_rate_unsteered"], "word_rate_steered": hs["word_rate_steered"],
        "completions_unsteered": base[:5], "completions_steered": hs["completions"],
    }
    out = {"model": model.cfg.model_name, "sae_set": set_name, "prompt_note": "the tokenizer prepends BOS",
           "topics": topics_out, "steering": steering, "steering_by_topic": steer_all}
    (pack / "features.json").write_text(json.dumps(out, indent=2) + "\n")
    write_readme(readme, pack, render_markdown(out, pack))
    return out


def render_markdown(feat: dict, pack: Path) -> str:
    rep = json.loads((pack / "training_report.json").read_text())
    lm, corpus = rep["lm"], rep["corpus"]
    cfg = lm["config"]
    size = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    L = [
        "## What is in it (written by the pack build)",
        "",
        "A small model trained here, offline, so the API has something real to show. Rebuild it with "
        "`make demo-pack` (seeded, single-threaded for bit-reproducibility; about 10 minutes on an idle CPU core). This section is written by "
        "`scripts/demo_pack/showcase.py`; the numbers are in `models/demo-lm/training_report.json` and "
        "`models/demo-lm/features.json`.",
        "",
        f"- **Corpus**: {corpus['n_docs']} generated documents ({corpus['bytes'] / 1e6:.1f} MB) of short English "
        f"sentences on seven topics ({', '.join(TOPICS)}), some as ChatML exchanges; 5% held out.",
        f"- **Tokenizer**: byte-level BPE, {corpus['vocab_size']} tokens (the corpus' words fit well under the 4096 "
        "asked for), BOS `<|bos|>` prepended, EOS `<|eos|>`, PAD `<|pad|>`, ChatML chat template.",
        f"- **Model** `demo-lm`: HookedTransformer, {cfg['n_layers']} layers, d_model {cfg['d_model']}, "
        f"{cfg['n_heads']} heads, n_ctx {cfg['n_ctx']}; {lm['tokens_seen'] / 1e6:.1f}M training tokens in "
        f"{lm['train_seconds'] / 60:.0f} min on CPU. Held-out loss **{lm['heldout_loss']:.3f}** nats/token vs "
        f"{lm['unigram_baseline_loss']:.3f} for a unigram baseline.",
        f"- **SAEs** `res-demo`: SAE Lens standard (ReLU) SAEs trained with `sae_lens.SAETrainer`, one per layer "
        f"on `blocks.<layer>.hook_resid_post`. Pack size {size / 1e6:.1f} MB.",
        "",
        "| SAE | d_sae | L0 | explained variance | dead features | CE loss clean / with SAE / zero-ablated |",
        "|---|---|---|---|---|---|",
    ]
    for sid, s in rep["saes"].items():
        L.append(f"| `{sid}` | {s['d_sae']} | {s['l0']:.1f} | {s['explained_variance']:.3f} | "
                 f"{s['dead_fraction']:.1%} | {s['ce_loss_clean']:.3f} / {s['ce_loss_with_sae']:.3f} / "
                 f"{s['ce_loss_zero_ablation']:.3f} |")
    L += ["", "**Documented features** (top activations over held-out text; `[[token]]` is where it fires):", ""]
    for topic, t in feat["topics"].items():
        L.append(f"- **{topic}**: `{t['sae_id']}` feature **{t['feature']}** — fires on "
                 f"{t['fires_on_topic_tokens']:.0%} of {topic} tokens vs {t['fires_on_other_tokens']:.0%} of others; "
                 f"top tokens: {', '.join('`' + w + '`' for w in t['top_tokens'][:8])}")
        for c in t["top_contexts"][:3]:
            L.append(f"  - `{c['context']}` ({c['activation']:.2f})")
    s = feat["steering"]
    L += [
        "",
        f"**Steering**: prompt `{s['prompt']}`, {s['n_completions']} seeded completions of {s['max_new_tokens']} "
        f"tokens. Adding {s['strength']} × `W_dec[{s['feature']}]` of `{s['sae_id']}` (the {s['topic']} feature) at "
        f"`{s['hook_name']}` raises the share of {s['topic']} words from {s['word_rate_unsteered']:.0%} to "
        f"{s['word_rate_steered']:.0%}.",
        "",
        "| unsteered | steered |",
        "|---|---|",
    ]
    for a, b in zip(s["completions_unsteered"][:4], s["completions_steered"][:4]):
        L.append(f"| {s['prompt']}{a.replace('|', '/').replace(chr(10), ' ')} | "
                 f"{s['prompt']}{b.replace('|', '/').replace(chr(10), ' ')} |")
    L += ["", "Per topic (word share unsteered → steered): " + ", ".join(
        f"{t} {v['word_rate_unsteered']:.0%} → {v['word_rate_steered']:.0%}" for t, v in feat["steering_by_topic"].items()
    ) + "."]
    return "\n".join(L)


def write_readme(readme: Path, pack: Path, section: str) -> None:
    text = readme.read_text() if readme.is_file() else ""
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")
        print(f"updated {readme}")
    else:
        (pack / "REPORT.md").write_text(section + "\n")
        print(f"markers missing in {readme}: wrote {pack / 'REPORT.md'}")
