"""Hostile requests sent beside normal ones, concurrently, to the served app: each hostile one gets a 4xx with a
message (or, where the request is valid mathematics, the right answer), and every normal one answers exactly what it
answers alone (seeded steering bit for bit; activations up to float32 batch drift, tests/compare.py).

Classes: numbers that overflow or vanish in float32 (steering strengths, temperature, frequency penalty, vector
norms, JSON integers beyond float range), vectors whose direction is all that counts at the edges of float32 (in the
same generation wave / capture batch as normal requests), invalid Unicode in every kind of text field, caps on
steering and list sizes, chunked bodies past the size limit, and request headers that never finish."""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from tests.compare import assert_same_answer
from tests.rawhttp import read_until_closed, status_and_body

from .conftest import MODEL_ID, SECRET

D_MODEL = 128  # the demo pack (checked in test_capabilities_list_the_caps)
SOURCE = "0-res-demo"
HOOK = "blocks.0.hook_resid_post"
RNG = np.random.default_rng(15)
V = RNG.standard_normal(D_MODEL)  # a steering / probe direction with entries of ordinary size

STEER_F = {"prompt": "the cat", "model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
           "types": ["STEERED", "DEFAULT"], "features": [{"model": MODEL_ID, "source": SOURCE, "index": 3, "strength": 8}],
           "n_completion_tokens": 6, "temperature": 0.8, "strength_multiplier": 1, "freq_penalty": 0.3, "seed": 11}
STEER_V = {**STEER_F, "features": None, "steer_method": "PROJECTION_CAP", "temperature": 0, "seed": 3,
           "vectors": [{"steering_vector": V.tolist(), "strength": -0.5, "hook": HOOK}]}
ALL = {"prompt": "a frog sat on the log", "model": MODEL_ID, "source_set": "res-demo", "selected_sources": [],
       "sort_by_token_indexes": [], "ignore_bos": True, "num_results": 5}
TOPK = {"prompt": "the goat ran", "model": MODEL_ID, "source": "1-res-demo", "ignore_bos": False, "top_k": 3}


def _post(http, call):
    """Raw JSON as given (numbers Python's json module would not write), or the body with every non-ASCII character
    escaped (a lone surrogate as \\ud800, which no UTF-8 encoder takes)."""
    path, body = call
    text = body if isinstance(body, str) else json.dumps(body)
    return http.post(path, content=text, headers={"content-type": "application/json"})


def concurrently(http, calls: list) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as ex:
        return list(ex.map(lambda c: _post(http, c), calls))


def beside_normal(http, normal: list, hostile: list) -> tuple[list, list]:
    """Each normal call alone, then all of them twice with every hostile call in between, at once. Returns
    (normal answers alone, normal responses under attack) and the hostile responses."""
    alone = []
    for c in normal:
        r = _post(http, c)
        assert r.status_code == 200, r.text
        alone.append(r.json())
    calls = normal + hostile + normal
    out = concurrently(http, calls)
    n = len(normal)
    return alone, out[:n] + out[n + len(hostile):], out[n:n + len(hostile)]


def assert_refused(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, (status, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    assert needle.lower() in r.json()["error"].lower(), r.text[:300]


def raw(body: dict, old: str, new: str) -> str:
    text = json.dumps(body)
    assert old in text
    return text.replace(old, new, 1)


# --- numbers in float32's terms -------------------------------------------------------------------------------

BIG_INT = "1" + "0" * 400  # a JSON integer no float holds

HOSTILE_NUMBERS = [
    ({**STEER_F, "features": [{**STEER_F["features"][0], "strength": 1e39}]}, 400, "beyond float32"),
    ({**STEER_F, "strength_multiplier": 1e30, "features": [{**STEER_F["features"][0], "strength": 1e10}]}, 400,
     "beyond float32"),
    ({**STEER_F, "temperature": 1e-320}, 400, "temperature"),
    ({**STEER_F, "temperature": 1e-39}, 400, "temperature"),
    ({**STEER_F, "freq_penalty": -1e308}, 400, "freq_penalty"),
    ({**STEER_F, "freq_penalty": 1e37}, 400, "freq_penalty"),
    ({**STEER_V, "steer_method": "SIMPLE_ADDITIVE", "vectors": [{**STEER_V["vectors"][0], "steering_vector": [1e19] * D_MODEL,
                                                                "strength": 1}]}, 400, "norm"),
    ({**STEER_V, "vectors": [{**STEER_V["vectors"][0], "strength": 1e20}]}, 400, "norm"),
    ({**STEER_V, "vectors": [{"steering_vector": [1.0], "strength": 1, "hook": "blocks.0.attn.hook_pattern"}]}, 400,
     "attention map"),
    ({**STEER_V, "vectors": [{"steering_vector": [1.0], "strength": 1, "hook": "blocks.1.attn.hook_attn_scores"}]}, 400,
     "attention map"),
    ({**STEER_V, "vectors": [{**STEER_V["vectors"][0], "steering_vector": [0.0] * D_MODEL}]}, 400, "zero vector"),
    ({**STEER_F, "stream": True, "features": [{**STEER_F["features"][0], "strength": -1e39}]}, 400, "beyond float32"),
    (raw(STEER_F, '"seed": 11', f'"seed": {BIG_INT}'), 422, "seed"),
    (raw(STEER_F, '"strength": 8', f'"strength": -{BIG_INT}'), 422, "strength"),
    (raw(STEER_F, '"temperature": 0.8', f'"temperature": {BIG_INT}'), 422, "temperature"),
    (raw(STEER_V, "[" + json.dumps(V[0]), f"[{BIG_INT}"), 422, "steering_vector"),
    (raw(STEER_F, '"strength": 8', '"strength": 1e400'), 400, "finite"),  # Python's JSON reads 1e400 as inf
]


def test_hostile_numbers_beside_seeded_steering(http):
    calls = [("/v1/steer/completion", b) for b, _, _ in HOSTILE_NUMBERS]
    alone, under, hostile = beside_normal(http, [("/v1/steer/completion", STEER_F), ("/v1/steer/completion", STEER_V)],
                                          calls)
    for (_, status, needle), r in zip(HOSTILE_NUMBERS, hostile):
        assert_refused(r, status, needle)
    for a, r in zip(alone * 2, under):
        assert r.status_code == 200, r.text
        assert r.json() == a  # seeded steering: bit for bit, whatever else is in the wave


def test_hostile_integers_everywhere(http):
    """JSON integers beyond float range, or absurdly large, in every kind of numeric field: a 4xx naming the field,
    or (num_results, clamped as documented) the ordinary answer; never a 5xx."""
    calls = [
        (("/v1/activation/single", raw({"prompt": "hi", "model": MODEL_ID, "hook": HOOK, "vector": [0.5] * D_MODEL},
                                       "[0.5", f"[{BIG_INT}")), 422),
        (("/v1/util/sae-topk-by-decoder-cossim", raw({"vector": [0.5] * D_MODEL, "model": MODEL_ID, "source": SOURCE,
                                                      "num_results": 3}, "[0.5", f"[-{BIG_INT}")), 422),
        (("/v1/activation/all", {**ALL, "num_results": 10 ** 400}), 200),
        (("/v1/activation/all", {**ALL, "sort_by_token_indexes": [10 ** 400]}), 400),
        (("/v1/activation/topk-by-token", {**TOPK, "top_k": -10 ** 400}), 400),
        (("/v1/util/sae-vector", {"model": MODEL_ID, "source": SOURCE, "index": 10 ** 400}), 400),
        (("/v1/activation/single", {"prompt": "hi", "model": MODEL_ID, "source": SOURCE, "index": "9" * 5000}), 400),
        (("/v1/steer/completion", {**STEER_F, "n_completion_tokens": 10 ** 400}), 400),
        (("/v1/steer/completion", {**STEER_F, "n_logprobs": -10 ** 400}), 400),
        (("/completion", {"prompt": "hi", "model": MODEL_ID, "secret": SECRET, "seed": 10 ** 400,
                          "features": [{"layer": SOURCE, "index": 3, "strength": 1}]}), 422),
    ]
    normal = [("/v1/activation/all", ALL), ("/v1/activation/topk-by-token", TOPK)]
    alone, under, hostile = beside_normal(http, normal, [c for c, _ in calls])
    for (_, status), r in zip(calls, hostile):
        assert r.status_code == status, r.text[:300]
        assert r.headers["content-type"].startswith("application/json")
        if status >= 400:
            assert r.json()["error"]
    for a, r in zip(alone * 2, under):
        assert r.status_code == 200, r.text
        assert_same_answer(a, r.json())


# --- directions at the edges of float32, in the same batch as normal requests ----------------------------------

SCALES = [2.0 ** -140, 1.0, 2.0 ** 120]  # exact powers of two: the mathematics is the same for each


def _direction_requests() -> list:
    out = []
    for method, strength, normalize, hook in (("ORTHOGONAL_DECOMP", 3.0, False, HOOK),
                                              ("PROJECTION_CAP", -0.5, False, "blocks.1.hook_resid_pre"),
                                              ("SIMPLE_ADDITIVE", 6.0, True, HOOK),
                                              ("ORTHOGONAL_DECOMP", 0.25, False, "blocks.0.attn.hook_z")):
        for scale in SCALES:
            out.append({**STEER_V, "steer_method": method, "normalize_steering": normalize, "temperature": 0.7, "seed": 5,
                        "vectors": [{"steering_vector": (V * scale).tolist(), "strength": strength, "hook": hook}]})
    return out


def test_tiny_and_huge_directions_steer_exactly_like_ordinary_ones(http):
    """ORTHOGONAL_DECOMP, PROJECTION_CAP and normalize_steering use only a vector's direction: 2**-140 and 2**120
    times a vector (underflowing / overflowing float32's squares before) steer exactly like the vector itself, in the
    same wave as normal requests, which are unaffected."""
    bodies = _direction_requests()
    alone, under, hostile = beside_normal(http, [("/v1/steer/completion", STEER_F)],
                                          [("/v1/steer/completion", b) for b in bodies])
    for r in hostile:
        assert r.status_code == 200, r.text
    for k in range(0, len(bodies), len(SCALES)):
        outs = [hostile[k + j].json() for j in range(len(SCALES))]
        assert outs[0] == outs[1] == outs[2], f"{bodies[k]['steer_method']} differs across scales"
    for a, r in zip(alone * 2, under):
        assert r.json() == a


def test_projection_onto_tiny_huge_and_1e38_vectors(http):
    """activation/single's vector path is linear in the vector: 2**k times a vector projects to 2**k times the
    values (up to batch drift, as the two may run in different batches); a vector of +-1e38 (whose dot product
    overflowed float32 into NaN and a 500 before) projects to 1e38 times the projection onto its signs."""
    single = {"prompt": "the fish swam away", "model": MODEL_ID, "hook": HOOK}
    signs = np.where(np.arange(D_MODEL) % 2 == 0, 1.0, -1.0)
    probes = [{**single, "vector": (V * s).tolist()} for s in SCALES] + [
        {**single, "vector": signs.tolist()}, {**single, "vector": (signs * 1e38).tolist()},
        {**single, "hook": "blocks.0.attn.hook_z", "vector": (V * 2.0 ** 130).tolist()},
        {**single, "hook": "blocks.0.attn.hook_z", "vector": V.tolist()}]
    normal = [("/v1/activation/all", ALL), ("/v1/activation/topk-by-token", TOPK)]
    alone, under, hostile = beside_normal(http, normal, [("/v1/activation/single", p) for p in probes])
    for r in hostile:
        assert r.status_code == 200, r.text
    got = [r.json()["activation"] for r in hostile]
    unit = got[1]

    def scaled(act, factor):
        return {**act, "values": [v * factor for v in act["values"]], "max_value": act["max_value"] * factor}

    assert_same_answer(scaled(got[0], 2.0 ** 140), unit)
    assert_same_answer(scaled(got[2], 2.0 ** -120), unit)
    assert_same_answer(scaled(got[4], 1e-38), got[3])
    assert all(np.isfinite(got[4]["values"])) and max(abs(x) for x in got[4]["values"]) > 1e36
    assert_same_answer(scaled(got[5], 2.0 ** -130), got[6])
    for a, r in zip(alone * 2, under):
        assert r.status_code == 200, r.text
        assert_same_answer(a, r.json())


def test_cosine_of_tiny_and_huge_vectors(http):
    base = {"model": MODEL_ID, "source": SOURCE, "num_results": 5}
    rs = concurrently(http, [("/v1/util/sae-topk-by-decoder-cossim", {**base, "vector": (V * s).tolist()}) for s in SCALES])
    answers = [r.json() for r in rs]
    for r in rs:
        assert r.status_code == 200, r.text
    assert answers[0] == answers[1] == answers[2]  # scaled exactly back to the same float32 query


# --- text -----------------------------------------------------------------------------------------------------

LONE = "\ud800"


def _unicode_calls() -> list:
    chat = {**STEER_F, "prompt": [{"role": "user", "content": "hello"}], "steer_special_tokens": True}
    return [
        ("/v1/tokenize", {"model": MODEL_ID, "text": f"ab{LONE}c"}),
        ("/v1/tokenize", {"model": f"demo{LONE}", "text": "abc"}),
        ("/v1/activation/single", {"prompt": f"x{LONE}", "model": MODEL_ID, "source": SOURCE, "index": "1"}),
        ("/v1/activation/single", {"prompt": "x", "model": MODEL_ID, "source": f"0-{LONE}", "index": "1"}),
        ("/v1/activation/single", {"prompt": "x", "model": MODEL_ID, "source": SOURCE, "index": f"1{LONE}"}),
        ("/v1/activation/single", {"prompt": "x", "model": MODEL_ID, "hook": f"blocks.0.{LONE}", "vector": [1.0]}),
        ("/v1/activation/all", {**ALL, "selected_sources": [f"0-res-demo{LONE}"]}),
        ("/v1/activation/all-batch", {**{k: v for k, v in ALL.items() if k != "prompt"}, "prompts": ["ok", "\udfff"]}),
        ("/v1/activation/topk-by-token", {**TOPK, "source": f"{LONE}"}),
        ("/v1/activation/source", {"prompts": [f"a{LONE}"], "model": MODEL_ID, "source": SOURCE}),
        ("/v1/util/sae-topk-by-decoder-cossim", {"feature": {"model": MODEL_ID, "source": f"0-res{LONE}", "index": 1},
                                                 "model": MODEL_ID, "source": SOURCE, "num_results": 3}),
        ("/v1/util/sae-vector", {"model": MODEL_ID, "source": f"{LONE}0-res-demo", "index": 1}),
        ("/v1/steer/completion", {**STEER_F, "prompt": f"the {LONE}cat"}),
        ("/v1/steer/completion", {**STEER_V, "vectors": [{**STEER_V["vectors"][0], "hook": f"{HOOK}{LONE}"}]}),
        ("/v1/steer/completion-chat", {**chat, "prompt": [{"role": "user", "content": f"hi {LONE}"}]}),
        ("/v1/steer/completion-chat", {**chat, "prompt": [{"role": f"us{LONE}er", "content": "hi"}]}),
        ("/activations-test", {"text": f"{LONE}", "model": MODEL_ID, "layer": SOURCE, "index": "1", "secret": SECRET}),
        ("/completion", {"prompt": "hi", "model": MODEL_ID, "secret": SECRET, "types": [f"steered{LONE}"],
                         "features": [{"layer": SOURCE, "index": 3, "strength": 1}]}),
    ]


def test_invalid_unicode_is_a_json_400_beside_normal_requests(http):
    calls = _unicode_calls()
    normal = [("/v1/activation/all", ALL), ("/v1/steer/completion", STEER_F)]
    alone, under, hostile = beside_normal(http, normal, calls)
    for (path, _), r in zip(calls, hostile):
        assert_refused(r, 400, "not valid Unicode")
        json.loads(r.content.decode("utf-8"))  # strict UTF-8 JSON
    for a, r in zip(alone * 2, under):
        assert r.status_code == 200, r.text
        assert_same_answer(a, r.json())


def test_huge_texts_are_refused_before_tokenizing_beside_normal_requests(http):
    """A text far past the token limit (3.5 MB, under max_body_bytes) is refused by the character bound derived from
    token_limit, without tokenizing it; /health and the normal requests beside it are served as usual."""
    big = "word " * 700_000
    chat = {**STEER_F, "steer_special_tokens": True, "prompt": [{"role": "user", "content": big}]}
    calls = [("/v1/tokenize", {"model": MODEL_ID, "text": big}), ("/v1/activation/all", {**ALL, "prompt": big}),
             ("/v1/activation/topk-by-token", {**TOPK, "prompt": big}), ("/v1/steer/completion", {**STEER_F, "prompt": big}),
             ("/v1/steer/completion-chat", chat)]
    normal = [("/v1/activation/all", ALL), ("/v1/steer/completion", STEER_F)]
    alone, under, hostile = beside_normal(http, normal, calls)
    for r in hostile:
        assert_refused(r, 400, "Text too long")
    assert http.get("/health").status_code == 200
    for a, r in zip(alone * 2, under):
        assert r.status_code == 200, r.text
        assert_same_answer(a, r.json())


@pytest.mark.parametrize("text", ["he\x00llo", "\u200fmirror\u202e text\u202c", "\ufeffbom", "e\u0301\U0001F600"])
def test_odd_valid_text_is_served(http, text):
    t = http.post("/v1/tokenize", json={"model": MODEL_ID, "text": text, "prepend_bos": False})
    assert t.status_code == 200, t.text
    r = http.post("/v1/activation/single", json={"prompt": text, "model": MODEL_ID, "source": SOURCE, "index": "1"})
    assert r.status_code == 200, r.text
    assert len(r.json()["activation"]["values"]) == len(r.json()["tokens"])


# --- caps -----------------------------------------------------------------------------------------------------


def test_caps_beside_normal_requests(http):
    lim = http.get("/v1/capabilities").json()["limits"]
    d_sae, token_limit = 1024, lim["token_limit"]
    chat = {**STEER_F, "steer_special_tokens": True}
    calls = [
        (("/v1/steer/completion", {**STEER_F, "types": ["STEERED", "STEERED"]}), 400, "twice"),
        (("/v1/steer/completion", {**STEER_F, "types": ["DEFAULT"] * 20000}), 400, "twice"),
        (("/v1/steer/completion", {**STEER_F, "features": STEER_F["features"] * (lim["max_steer_vectors"] + 1)}), 400,
         "Too many steering features"),
        (("/v1/steer/completion", {**STEER_V, "vectors": STEER_V["vectors"] * (lim["max_steer_vectors"] + 1)}), 400,
         "Too many steering vectors"),
        (("/completion", {"prompt": "hi", "model": MODEL_ID, "secret": SECRET, "types": ["steered"] * 3,
                          "features": [{"layer": SOURCE, "index": 3, "strength": 1}]}), 400, "at most once"),
        (("/v1/steer/completion-chat", {**chat, "prompt": [{"role": "user", "content": "hi"}] * (token_limit + 1)}), 400,
         "Text too long"),
        (("/v1/activation/all", {**ALL, "selected_sources": [SOURCE], "feature_filter": [1] * (d_sae + 1)}), 400,
         "feature_filter"),
        (("/v1/activation/all", {**ALL, "sort_by_token_indexes": [0] * (token_limit + 1)}), 400, "sort_by_token_indexes"),
        (("/v1/activation/single", {"prompt": "x", "model": MODEL_ID, "hook": HOOK, "vector": [0.5] * 500_000}), 400,
         "length"),
    ]
    normal = [("/v1/activation/all", ALL), ("/v1/steer/completion", STEER_V)]
    alone, under, hostile = beside_normal(http, normal, [c for c, _, _ in calls])
    for (_, status, needle), r in zip(calls, hostile):
        assert_refused(r, status, needle)
    for a, r in zip(alone * 2, under):
        assert_same_answer(a, r.json())


def test_cossim_num_results_is_clamped_as_documented(http):
    lim = http.get("/v1/capabilities").json()["limits"]
    r = http.post("/v1/util/sae-topk-by-decoder-cossim", json={"feature": {"model": MODEL_ID, "source": SOURCE, "index": 7},
                                                                "model": MODEL_ID, "source": SOURCE, "num_results": 10_000})
    assert r.status_code == 200
    assert len(r.json()["topk_decoder_cossim_features"]) == lim["max_cossim_results"] == 128


def test_capabilities_list_the_caps(http):
    caps = http.get("/v1/capabilities").json()
    assert caps["d_model"] == D_MODEL
    lim = caps["limits"]
    for name in ("max_steer_vectors", "max_steer_work", "max_steer_types", "max_cossim_results", "max_body_bytes",
                 "token_limit", "max_batch_prompts", "max_completion_tokens"):
        assert isinstance(lim[name], int) and lim[name] > 0, name
    assert lim["max_steer_types"] == 2


# --- the connection: bodies and headers -----------------------------------------------------------------------


def test_chunked_body_over_the_cap_is_413_beside_normal_requests(http, serve_app):
    cap = http.get("/v1/capabilities").json()["limits"]["max_body_bytes"]

    def chunks():
        yield b'{"prompt": "'
        for _ in range(cap // 65536 + 2):
            yield b"a" * 65536
        yield b'", "model": "demo-lm", "source": "0-res-demo", "index": "1"}'

    def big():
        return http.post("/v1/activation/single", content=chunks(), headers={"content-type": "application/json"})

    def unauthenticated():
        return httpx.post(serve_app + "/v1/activation/single", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})

    alone = http.post("/v1/activation/all", json=ALL).json()
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(big), ex.submit(unauthenticated), ex.submit(lambda: http.post("/v1/activation/all", json=ALL))]
        r_big, r_anon, r_ok = (f.result() for f in futs)
    assert_refused(r_big, 413, "too large")
    assert r_anon.status_code == 401  # auth before any body is read
    assert_same_answer(alone, r_ok.json())


def test_slow_headers_time_out_and_others_are_served(http, serve_app):
    """The HTTP proxy gets the header timeout from ingress.header_timeout (the test session sets it to 5 s): HAProxy
    (the default) through scripts/haproxy_header_timeout.py, which answers with HAProxy's own HTML 408 page (HAProxy
    2.8 ignores errorfile/http-error for a request whose headers never completed); Serve's Python proxy through the
    uvicorn callback, with a JSON 408."""
    timeout = float(os.environ["SAESERVE_HEADER_TIMEOUT_S"])
    u = urlparse(serve_app)
    slow = [socket.create_connection((u.hostname, u.port)) for _ in range(8)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/activation/all HTTP/1.1\r\nHost: x\r\nX-SECRET-KEY: " + SECRET.encode() + b"\r\n")
        alone = http.post("/v1/activation/all", json=ALL).json()
        assert_same_answer(alone, http.post("/v1/activation/all", json=ALL).json())  # served while they dangle
        for s in slow:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # still sending: the limit is on the whole header, not on silence
            except OSError:  # already timed out (a loaded machine took that long over the requests above)
                pass
        results = [read_until_closed(s, timeout + 30) for s in slow]
    finally:
        for s in slow:
            s.close()
    for data, closed_after in results:
        assert closed_after < timeout + 30, "a connection with unfinished headers was never closed"
        head = data.partition(b"\r\n\r\n")[0]
        status, body = status_and_body(data)
        assert status == 408, data[:200]
        if b"application/json" in head.lower():  # the Python proxy's; HAProxy's page is its own HTML
            assert "not received within" in json.loads(body)["error"]
