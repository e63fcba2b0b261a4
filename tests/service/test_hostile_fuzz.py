"""Hypothesis over numeric extremes and hostile Unicode, for every route: a valid request with one to three of its
values replaced (+-1e308, float32's edges, subnormals, integers beyond float range, NaN and infinities as JSON
literals; lone surrogates, NUL, bidi controls, BOMs, noncharacters), sent as raw JSON. Never a 5xx, and every body
is JSON (an error in the one shape). Example counts are bounded: this suite stays fast."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .conftest import MODEL_ID, SECRET

EXAMPLES_PER_ROUTE = 12

D = 128  # the demo pack's d_model
F = {"model": MODEL_ID, "source": "0-res-demo", "index": 3, "strength": 4}
STEER = {"model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False, "types": ["STEERED", "DEFAULT"],
         "n_completion_tokens": 2, "temperature": 0.5, "strength_multiplier": 1, "freq_penalty": 0.1, "seed": 1}
ALL = {"model": MODEL_ID, "source_set": "res-demo", "selected_sources": ["0-res-demo"], "sort_by_token_indexes": [1],
       "ignore_bos": True, "num_results": 3, "feature_filter": [1, 2, 3]}
VEC = [0.25] * 6 + [-0.5] * (D - 6)
NP = "/neuronpedia"

ROUTES = [
    ("/v1/tokenize", {"model": MODEL_ID, "text": "hello there", "prepend_bos": True}),
    ("/v1/activation/single", {"prompt": "hello", "model": MODEL_ID, "source": "0-res-demo", "index": "5"}),
    ("/v1/activation/single", {"prompt": "hello", "model": MODEL_ID, "hook": "blocks.1.hook_resid_pre", "vector": VEC}),
    ("/v1/activation/single-batch", {"prompts": ["a b", "c"], "model": MODEL_ID, "source": "0-att-demo", "index": "2"}),
    ("/v1/activation/all", {"prompt": "the cat sat", **ALL}),
    ("/v1/activation/all-batch", {"prompts": ["the cat", "a dog"], **ALL}),
    ("/v1/activation/topk-by-token", {"prompt": "one two", "model": MODEL_ID, "source": "1-res-demo", "top_k": 2,
                                      "ignore_bos": False}),
    ("/v1/activation/topk-by-token-batch", {"prompts": ["x", "y z"], "model": MODEL_ID, "source": "2-res-demo", "top_k": 2,
                                            "ignore_bos": True}),
    ("/v1/activation/source", {"prompts": ["hello world"], "model": MODEL_ID, "source": "3-res-demo"}),
    ("/v1/util/sae-topk-by-decoder-cossim", {"feature": {"model": MODEL_ID, "source": "0-res-demo", "index": 9},
                                             "model": MODEL_ID, "source": "1-res-demo", "num_results": 4}),
    ("/v1/util/sae-topk-by-decoder-cossim", {"vector": VEC, "model": MODEL_ID, "source": "0-res-demo", "num_results": 4}),
    ("/v1/util/sae-vector", {"model": MODEL_ID, "source": "0-res-demo", "index": 11}),
    ("/v1/steer/completion", {**STEER, "prompt": "the cat", "features": [F]}),
    ("/v1/steer/completion", {**STEER, "prompt": "the cat", "steer_method": "ORTHOGONAL_DECOMP",
                              "vectors": [{"steering_vector": VEC, "strength": 2, "hook": "blocks.0.hook_resid_post"}]}),
    ("/v1/steer/completion", {**STEER, "prompt": "the cat", "stream": True, "steer_method": "PROJECTION_CAP",
                              "vectors": [{"steering_vector": VEC, "strength": 0.5, "hook": "blocks.1.hook_resid_post"}]}),
    ("/v1/steer/completion-chat", {**STEER, "prompt": [{"role": "user", "content": "hi"}], "steer_special_tokens": False,
                                   "features": [F], "normalize_steering": True}),
    ("/activations-test", {"text": "hi", "model": MODEL_ID, "layer": "0-res-demo", "index": "1", "secret": SECRET}),
    ("/activations-all", {"text": "hi there", "model": MODEL_ID, "source_set": "res-demo", "selected_layers": [],
                          "secret": SECRET, "sort_indexes": [1]}),
    ("/top-k-by-decoder-cosine-similarity", {"sae_id": "0-res-demo", "feature_id": 5, "model": MODEL_ID, "k": 3,
                                             "secret": SECRET}),
    ("/completion", {"prompt": "hi", "model": MODEL_ID, "secret": SECRET, "types": ["steered", "default"],
                     "features": [{"layer": "0-res-demo", "index": 3, "strength": 2}], "n_completion_tokens": 2,
                     "temperature": 0.5, "strength_multiplier": 1, "freq_penalty": 0, "seed": 2}),
    # Neuronpedia's 2026 web-app dialect (camelCase bodies, its own limits) on the same handlers.
    (NP + "/v1/activation/all", {"prompt": "the cat sat", "model": MODEL_ID, "selectedSources": ["0-res-demo"],
                                 "sortByTokenIndexes": [1], "sourceSet": "res-demo", "ignoreBos": True, "numResults": 3}),
    (NP + "/v1/steer/completion", {"types": ["STEERED", "DEFAULT"], "prompt": "the cat", "model": MODEL_ID,
                                   "vectors": [{"hook": "blocks.0.hook_resid_post", "steeringVector": VEC, "strength": 2}],
                                   "strengthMultiplier": 1, "nCompletionTokens": 2, "temperature": 0.5, "freqPenalty": 0.1,
                                   "seed": 1, "steerMethod": "PROJECTION_CAP", "normalizeSteering": False, "stream": False,
                                   "nLogprobs": 2}),
    (NP + "/v1/lens/prompt", {"model": MODEL_ID, "type": ["LOGIT_LENS", "JACOBIAN_LENS"], "prompt": "the cat", "topN": 3,
                              "numCompletionTokens": 2, "temperature": 0.5, "steerTokens": [{"token": " cat",
                              "type": "JACOBIAN_LENS"}], "steerLayers": [1], "steerStrength": 0.5, "stream": False,
                              "cachedTokenIds": [1, 2], "layers": [0, 2]}),
]

# Raw JSON number literals (written as they are: Python's json module cannot write most of them).
NUMBERS = ["1e308", "-1e308", "1.7976931348623157e308", "5e-324", "-5e-324", "1.4e-45", "1e-39", "3.4028235e38",
           "3.5e38", "-3.5e38", "65504", "65520", "0", "-0.0", "1" + "0" * 400, "-" + "9" * 330, "18446744073709551617",
           "-9223372036854775809", "NaN", "Infinity", "-Infinity", "1e400", "1e-400", "2.5", "-1"]
HOSTILE_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x1b", "\u200f", "\u202e", "\u2066", "\ufeff",
                 "\ufffe", "\uffff", "\U0010ffff", "\u0301", "a", " ", "<|bos|>"]


def _leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(x, list) and x:
        for i in sorted({0, len(x) - 1}):
            yield from _leaves(x[i], path + (i,))
    elif not isinstance(x, bool) and x is not None:
        yield path, x


MARK = "\u0000@@{}@@"  # placeholders, replaced by raw JSON literals after json.dumps


@st.composite
def hostile_body(draw, base: dict) -> str:
    body = json.loads(json.dumps(base))
    leaves = list(_leaves(body))
    picks = draw(st.lists(st.sampled_from(range(len(leaves))), min_size=1, max_size=3, unique=True))
    literals = {}
    for n, i in enumerate(picks):
        path, value = leaves[i]
        as_text = isinstance(value, str)
        if draw(st.integers(0, 9)) == 0:  # now and then the other JSON type (a schema error, 422)
            as_text = not as_text
        if as_text:
            new = "".join(draw(st.lists(st.sampled_from(HOSTILE_CHARS), min_size=1, max_size=6)))
            new = value + new if isinstance(value, str) and draw(st.booleans()) else new
        else:
            literals[n] = draw(st.sampled_from(NUMBERS))
            new = MARK.format(n)
        parent = body
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = new
    text = json.dumps(body)  # escapes every non-ASCII character: a lone surrogate arrives as \\ud800
    for n, lit in literals.items():
        text = text.replace(json.dumps(MARK.format(n)), lit)
    return text


@pytest.mark.parametrize("route,base", ROUTES, ids=[f"{r}#{i}" for i, (r, _) in enumerate(ROUTES)])
def test_numeric_extremes_and_hostile_unicode(http, route, base):
    ok = http.post(route, json=base)
    assert ok.status_code == 200, f"the base request must be valid: {ok.text[:300]}"
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(text=hostile_body(base))
    def run(text):
        r = http.post(route, content=text, headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{route} -> {r.status_code} {r.text[:300]} for {text[:400]}"
        ctype = r.headers.get("content-type", "")
        if r.status_code == 200 and ctype.startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events and all(json.loads(e) for e in events)
            assert "error" not in json.loads(events[-1]), events[-1]
            return
        assert ctype.startswith("application/json"), ctype
        got = json.loads(r.content.decode("utf-8"))  # strict UTF-8 JSON
        if r.status_code >= 400:
            assert isinstance(got.get("error"), str) and got["error"], got

    run()
    print(f"{route}: {seen}")
