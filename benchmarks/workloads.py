"""What the benchmark asks: seeded prompts of a shape's length, and per-workload request bodies.

Baseline and service get the same prompts in the same order. Every workload is one HTTP request per prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .shapes import Shape

_WORDS = (
    "the a cat dog bird fish red blue green yellow one two three four five rain sun snow wind bread apple rice "
    "soup city river park house return print if else for in is was and to of it on hello world big small runs "
    "jumps eats sees likes has garden window morning evening quietly under over between music paper number "
    "water stone light dark summer winter letter market teacher student story"
).split()

NUM_RESULTS = 25  # activation/all rows (the client's default)
TOP_K = 5  # topk-by-token features per position
STEER_TOKENS = 32  # new tokens per steered / default completion
STEER_STRENGTH = 10.0


@dataclass(frozen=True)
class Workload:
    name: str  # short key, used by --only
    route: str  # HTTP path
    label: str  # for tables
    kind: str  # tokenize | all | single | topk | steer

    def body(self, shape: Shape, prompt: str, i: int) -> dict:
        model = shape.model_name
        if self.kind == "tokenize":
            return dict(model=model, text=prompt, prepend_bos=True)
        if self.kind == "all":
            selected = {"all-1": [shape.sae_id(shape.single_layer)], "all-set": []}.get(
                self.name, [shape.sae_id(l) for l in sae_layers(shape, 3)])
            return dict(prompt=prompt, model=model, source_set=shape.set_name, selected_sources=selected,
                        sort_by_token_indexes=[], ignore_bos=True, num_results=NUM_RESULTS)
        if self.kind == "single":
            return dict(prompt=prompt, model=model, source=shape.sae_id(shape.single_layer), index=str(feature_index(shape, i)))
        if self.kind == "topk":
            return dict(prompt=prompt, model=model, source=shape.sae_id(shape.single_layer), top_k=TOP_K, ignore_bos=True)
        if self.kind == "steer":
            return dict(prompt=prompt, model=model, steer_method="SIMPLE_ADDITIVE", normalize_steering=False,
                        types=["STEERED", "DEFAULT"],
                        features=[dict(model=model, source=shape.sae_id(shape.single_layer), index=feature_index(shape, i),
                                       strength=STEER_STRENGTH)],
                        n_completion_tokens=STEER_TOKENS, temperature=0.5, strength_multiplier=1.0, freq_penalty=0.0,
                        seed=16)
        raise ValueError(self.kind)

    def units(self, n_prompt_tokens: int) -> int:
        """Tokens a request accounts for: prompt tokens read, or new tokens written (steer: both completions)."""
        return 2 * STEER_TOKENS if self.kind == "steer" else n_prompt_tokens


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("tokenize", "/v1/tokenize", "tokenize (the HTTP path alone)", "tokenize"),
    Workload("all-1", "/v1/activation/all", "activation/all, 1 SAE", "all"),
    Workload("all-3", "/v1/activation/all", "activation/all, 3 SAEs", "all"),
    Workload("all-set", "/v1/activation/all", "activation/all, every SAE of the set", "all"),
    Workload("single", "/v1/activation/single", "activation/single", "single"),
    Workload("topk", "/v1/activation/topk-by-token", "activation/topk-by-token", "topk"),
    Workload("steer", "/v1/steer/completion", f"steer/completion (+{STEER_TOKENS} tok, STEERED+DEFAULT)", "steer"),
)}


def sae_layers(shape: Shape, n: int) -> list[int]:
    return list(shape.layers[-n:]) if len(shape.layers) >= n else list(shape.layers)


def feature_index(shape: Shape, i: int) -> int:
    d_sae = shape.d_sae or 256
    return (i * 7919) % min(d_sae, 256)


def make_prompts(tokenizer, shape: Shape, n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` prompts (text, token count with BOS) whose lengths spread over ``shape.prompt_tokens``."""
    from deployments.engine.tokens import feature_tokens

    rng = random.Random(seed)
    lo, hi = shape.prompt_tokens
    out = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words: list[str] = []
        count = 1
        while count < target:
            words.append(rng.choice(_WORDS))
            text = " ".join(words)
            count = len(feature_tokens(tokenizer, text))
        if count > hi and len(words) > 1:  # a many-token last word overshot: drop it unless that undershoots
            shorter = len(feature_tokens(tokenizer, " ".join(words[:-1])))
            if shorter >= lo:
                words.pop()
                count = shorter
        out.append((" ".join(words), count))
    return out
