"""lens/prompt on the shared app: the web app's bodies under /neuronpedia (camelCase requests validated against the
2026 spec, NDJSON frames in snake_case), the same route at /v1 in snake_case, ``stream: false`` and the handle
method; the numbers against TransformerLens called directly (logit lens = unembed(ln_final(resid_post)), the
Jacobian lens = the pack's own lens file applied first). The engine's finer cases (softcap, interventions against
plain TL hooks, chunking, bfloat16) are in tests/engine/test_lens.py."""

from __future__ import annotations

import json
import time

import pytest
import torch

from deployments.engine.lens_text import decode_one, is_word_like
from tests import reference as R

from .conftest import MODEL_ID
from .np2026 import validate_reply, validate_request

PATH = "/v1/lens/prompt"
LENS_FILE = "jlens/demo-corpus/demo-lm_jacobian_lens.pt"
BOTH_TYPES = ["LOGIT_LENS", "JACOBIAN_LENS"]
# Probabilities come rounded to 4 places (half a unit of the 4th place), computed in another shape than the reference
# (the service's prefill / KV-cached decode step vs one whole-sequence forward: ~1e-6 relative).
PROB_ATOL = 1.5e-4
SPAN_KEYS = {"message_index", "role", "channel", "section"}
TOKEN_KEYS = {"position", "token", "id", "is_generated", "is_char_continuation"} | SPAN_KEYS
FRAME_KEYS = {
    "meta": {"kind", "model", "types", "layers_by_type", "top_n", "prompt_len", "num_completion_tokens", "temperature",
             "prepend_bos", "reuse_len"},
    "prompt": {"kind", "tokens"},
    "token": {"kind", "results"} | TOKEN_KEYS,
    "done": {"kind", "seq_len", "prompt_len", "vocab_size", "completion"},
    "error": {"kind", "error"},
}


def web_body(**kw) -> dict:
    """The web app's lens request: every field it sends (camelCase), both lens types."""
    body = {"model": MODEL_ID, "type": BOTH_TYPES, "prompt": "The cat sat on the mat.", "topN": 5, "temperature": 0,
            "numCompletionTokens": 0, "prependBos": True, "enableThinking": False, "cachedTokenIds": [],
            "steerTokens": [], "steerLayers": [], "steerStrength": 0, "steerAblate": False, "swapToken": None,
            "steerGeneratedTokens": False, "filterNonWordTokens": False, "stream": True, "failIfBusy": False}
    body.update(kw)
    return body


def snake(body: dict) -> dict:
    import re

    return {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): v for k, v in body.items()}


def frames_of(resp) -> list[dict]:
    assert resp.headers["content-type"].startswith("application/x-ndjson"), resp.headers
    out = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    for f in out:
        assert set(f) == FRAME_KEYS[f["kind"]], f
        for t in f.get("tokens", []):
            assert set(t) == TOKEN_KEYS
    return out


def lens_stream(client, body: dict, dialect: str = "neuronpedia") -> list[dict]:
    if dialect == "neuronpedia":
        validate_request(PATH, body)
    with client.stream("POST", PATH, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        return frames_of(resp)


def lens_error(client, body: dict, status: int, dialect: str = "neuronpedia") -> dict:
    r = client.post(PATH, json=body)
    assert r.status_code == status, r.text
    if dialect == "neuronpedia":
        validate_reply(PATH, status, r.json())
    return r.json()


@pytest.fixture(scope="module")
def ref(pack_dir):
    return R.model(str(pack_dir))


@pytest.fixture(scope="module")
def J(pack_dir):
    data = torch.load(pack_dir / LENS_FILE, map_location="cpu", weights_only=True)
    return {int(k): v.float() for k, v in data["J"].items()}


@torch.no_grad()
def reference_probs(ref, J, ids: list[int]) -> dict[str, dict[int, torch.Tensor]]:
    """``{type: {layer: float64 [positions, vocab]}}``: each lens's full-vocabulary distribution, from one TL forward."""
    _, cache = ref.run_with_cache(torch.tensor([ids]))
    last = ref.cfg.n_layers - 1
    out = {t: {} for t in BOTH_TYPES}
    for layer in range(ref.cfg.n_layers):
        r = cache[f"blocks.{layer}.hook_resid_post"][0]
        for t in BOTH_TYPES:
            x = r @ J[layer].T if (t == "JACOBIAN_LENS" and layer != last) else r
            out[t][layer] = torch.softmax(ref.unembed(ref.ln_final(x[None]))[0].double(), dim=-1)
    return out


def assert_token_frame(ref, f: dict, probs, layers_by_type: dict, top_n: int, word_mask=None):
    """A token frame's read-outs: its probabilities are the reference top-n's, and its strings those of the
    reference's top ids wherever the ranking is not a near-tie."""
    last = ref.cfg.n_layers - 1
    assert [r["type"] for r in f["results"]] == list(layers_by_type)
    for r in f["results"]:
        assert len(r["top_tokens"]) == len(layers_by_type[r["type"]]) == len(r["top_probs"])
        for k, layer in enumerate(layers_by_type[r["type"]]):
            p = probs[r["type"]][layer][f["position"]]
            pool = p
            if word_mask is not None:
                mask = word_mask.clone()
                if layer == last:
                    mask[int(p.argmax())] = True
                pool = torch.where(mask, p, torch.zeros_like(p))
            want = torch.topk(pool, top_n)
            got = torch.tensor(r["top_probs"][k], dtype=torch.float64)
            assert torch.allclose(got, want.values, atol=PROB_ATOL, rtol=0), (f["position"], r["type"], layer, got, want)
            v = want.values.tolist()
            for j, t in enumerate(want.indices.tolist()):
                gap = min([abs(v[j] - v[i]) for i in range(top_n) if i != j] + [abs(v[j] - float(pool.topk(top_n + 1).values[-1]))])
                if gap > 2 * PROB_ATOL:
                    assert r["top_tokens"][k][j] == decode_one(ref.tokenizer, t), (f["position"], layer, j)


def assert_same_frames(a: list[dict], b: list[dict]):
    """Token frames of two runs of the same request: equal but for float32 drift between read-out shapes."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "results"} == {k: v for k, v in y.items() if k != "results"}
        for rx, ry in zip(x["results"], y["results"]):
            assert rx["type"] == ry["type"]
            assert torch.allclose(torch.tensor(rx["top_probs"]), torch.tensor(ry["top_probs"]), atol=PROB_ATOL, rtol=0)


def split(frames: list[dict]):
    kinds = [f["kind"] for f in frames]
    assert kinds[0] == "meta" and kinds[1] == "prompt" and kinds[-1] == "done", kinds
    assert set(kinds[2:-1]) <= {"token"}, kinds
    return frames[0], frames[1], frames[2:-1], frames[-1]


# --- read-outs --------------------------------------------------------------------------------------------------


def test_web_app_stream_reads_every_layer_of_both_lenses_and_generates(np_web, ref, J):
    L = ref.cfg.n_layers
    n_new = 6
    frames = lens_stream(np_web, web_body(numCompletionTokens=n_new))
    meta, prompt, tokens, done = split(frames)
    ids = [ref.tokenizer.bos_token_id, *ref.tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]]
    assert meta == {"kind": "meta", "model": MODEL_ID, "types": BOTH_TYPES,
                    "layers_by_type": {"LOGIT_LENS": list(range(L)), "JACOBIAN_LENS": list(range(L))}, "top_n": 5,
                    "prompt_len": len(ids), "num_completion_tokens": n_new, "temperature": 0.0, "prepend_bos": True,
                    "reuse_len": 0}
    assert [t["id"] for t in prompt["tokens"]] == ids
    assert [t["token"] for t in prompt["tokens"]] == [decode_one(ref.tokenizer, t) for t in ids]
    assert all(t["message_index"] is None and t["section"] is None and not t["is_generated"] for t in prompt["tokens"])
    # greedy generation = TransformerLens's own (its stop tokens: the tokenizer's EOS, emitted when reached)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, stop_at_eos=True,
                            eos_token_id=ref.tokenizer.eos_token_id, verbose=False)[0, len(ids):].tolist()
    gen = [t["id"] for t in tokens if t["is_generated"]]
    assert gen == want[: len(gen)] and (len(gen) == n_new or gen[-1] == ref.tokenizer.eos_token_id)
    assert [t["position"] for t in tokens] == list(range(len(ids) + len(gen)))
    probs = reference_probs(ref, J, ids + gen)
    for f in tokens:
        assert_token_frame(ref, f, probs, meta["layers_by_type"], 5)
    assert done == {"kind": "done", "seq_len": len(ids) + len(gen), "prompt_len": len(ids), "vocab_size": ref.cfg.d_vocab,
                    "completion": ref.tokenizer.decode(gen, clean_up_tokenization_spaces=False)}


def test_v1_snake_case_stream_false_and_the_handle_agree_with_the_stream(np_web, http, ref, J, serve_app):
    from ray import serve

    from ingress import schemas as S

    body = web_body(prompt="Tom saw a red bird", topN=3, layers=[1], numCompletionTokens=2)
    meta, _, tokens, done = split(lens_stream(np_web, body))
    L = ref.cfg.n_layers
    assert meta["layers_by_type"] == {"LOGIT_LENS": [1, L - 1], "JACOBIAN_LENS": [1, L - 1]}  # + the last layer
    plain = http.post(PATH, json={**snake(body), "stream": False})
    assert plain.status_code == 200, plain.text
    reply = plain.json()
    assert set(reply) == {"meta", "tokens", "done"}
    assert reply["meta"] == meta and reply["done"] == done
    ids = [t["id"] for t in reply["tokens"]]
    assert ids == [t["id"] for t in tokens]
    probs = reference_probs(ref, J, ids)
    for f in reply["tokens"]:
        assert set(f) == FRAME_KEYS["token"]
        assert_token_frame(ref, f, probs, meta["layers_by_type"], 3)
    h = serve.get_app_handle("saeserve")
    got = h.lens_prompt.remote(S.LensPromptRequest.model_validate(snake(body))).result(timeout_s=120)
    assert isinstance(got, S.LensPromptResponse)
    got = got.model_dump(mode="json")
    assert got["meta"] == reply["meta"] and got["done"] == reply["done"]
    assert_same_frames(got["tokens"], reply["tokens"])


def test_input_token_ids_verbatim_without_generation(np_web, ref, J):
    tok = ref.tokenizer
    ids = tok("the dog ran", add_special_tokens=False)["input_ids"]  # no BOS: taken as given
    body = web_body(prompt=None, inputTokenIds=ids, numCompletionTokens=5, topN=4)
    meta, prompt, tokens, done = split(lens_stream(np_web, body))
    assert meta["prompt_len"] == len(ids) and meta["num_completion_tokens"] == 0
    assert [t["id"] for t in prompt["tokens"]] == ids and [t["id"] for t in tokens] == ids
    assert done["completion"] == "" and done["seq_len"] == len(ids)
    probs = reference_probs(ref, J, ids)
    for f in tokens:
        assert_token_frame(ref, f, probs, meta["layers_by_type"], 4)


def test_cached_token_ids_reuse_the_common_prefix(np_web, ref):
    first = lens_stream(np_web, web_body(prompt="The cat sat on the mat."))
    ids = [t["id"] for t in first[1]["tokens"]]
    cached = ids[:5] + [ids[5] + 1]  # the prompt's first five, then a different one
    frames = lens_stream(np_web, web_body(prompt="The cat sat on the mat.", cachedTokenIds=cached))
    meta, prompt, tokens, _ = split(frames)
    assert meta["reuse_len"] == 5 and len(prompt["tokens"]) == len(ids)
    assert [t["position"] for t in tokens] == list(range(5, len(ids)))
    assert_same_frames(tokens, first[2 + 5:-1])


def test_filter_non_word_tokens(np_web, ref, J):
    body = web_body(prompt="the cat , sat ; on the mat .", filterNonWordTokens=True, topN=8)
    meta, prompt, tokens, _ = split(lens_stream(np_web, body))
    words = torch.tensor([is_word_like(decode_one(ref.tokenizer, t)) for t in range(ref.cfg.d_vocab)])
    probs = reference_probs(ref, J, [t["id"] for t in prompt["tokens"]])
    for f in tokens:
        assert_token_frame(ref, f, probs, meta["layers_by_type"], 8, word_mask=words)


def test_chat_spans_and_prefill(np_web, ref):
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the cat"}]
    meta, prompt, tokens, done = split(lens_stream(np_web, web_body(prompt=None, chat=chat, numCompletionTokens=3)))
    toks = prompt["tokens"]
    text = ref.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert [t["id"] for t in toks] == ref.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t["message_index"] for t in toks] == sorted(t["message_index"] for t in toks)  # message blocks in order
    assert {t["role"] for t in toks if t["message_index"] == 0} == {"user"}
    user = [t["section"] for t in toks if t["message_index"] == 0]
    assert user[0] == "header" and "content" in user and user[-1] == "footer"
    last = [t for t in toks if t["message_index"] == 1]
    assert last[0]["section"] == "header" and last[-1]["section"] == "content"  # a prefill: the turn stays open
    gen = [t for t in tokens if t["is_generated"]]
    assert gen and all(t["role"] == "assistant" and t["message_index"] == 1 for t in gen)
    no_prefill = split(lens_stream(np_web, web_body(prompt=None, chat=chat[:1], numCompletionTokens=0)))[1]["tokens"]
    assert no_prefill[-1]["message_index"] is None and no_prefill[-1]["section"] == "header"  # the generation prompt


def test_steering_changes_the_read_out_and_drops_reuse(np_web, ref):
    plain = lens_stream(np_web, web_body(prompt="Tom saw a red bird"))
    ids = [t["id"] for t in plain[1]["tokens"]]
    steered = lens_stream(np_web, web_body(prompt="Tom saw a red bird", cachedTokenIds=ids, steerLayers=[1, 2],
                                           steerTokens=[{"token": " cat", "type": "LOGIT_LENS"}], steerStrength=0.8))
    meta, _, tokens, _ = split(steered)
    assert meta["reuse_len"] == 0 and len(tokens) == len(ids)  # cached read-outs came from an unsteered run
    assert_same_frames(tokens[:1], plain[2:3])  # BOS is left alone
    assert [t["results"] for t in tokens[1:]] != [t["results"] for t in plain[3:-1]]
    for kind in ({"steerAblate": True}, {"swapToken": {"token": " dog", "type": "JACOBIAN_LENS"}}):
        frames = lens_stream(np_web, web_body(prompt="Tom saw a red bird", steerLayers=[0],
                                              steerTokens=[{"token": "cat", "type": "JACOBIAN_LENS"}], **kind))
        assert frames[-1]["kind"] == "done"


# --- errors, busy, disconnect ------------------------------------------------------------------------------------


def test_bad_lens_requests(np_web, http):
    for client, dialect in ((np_web, "neuronpedia"), (http, "v1")):
        conv = (lambda b: b) if dialect == "neuronpedia" else snake
        assert "exactly one of" in lens_error(client, conv(web_body(prompt=None)), 400, dialect)["error"]
        assert "too long" in lens_error(client, conv(web_body(prompt="cat " * 300)), 400, dialect)["error"].lower()
        assert "top_n" in lens_error(client, conv(web_body(topN=0)), 400, dialect)["error"]
        assert "zero tokens" in lens_error(client, conv(web_body(prompt="", prependBos=False)), 400, dialect)["error"]
        err = lens_error(client, conv(web_body(steerLayers=[1], steerStrength=1,
                                               steerTokens=[{"token": "zzqx-not-a-token", "type": "LOGIT_LENS"}])), 400,
                         dialect)["error"]
        assert "steer token" in err
        assert "steer_layers" in lens_error(client, conv(web_body(steerLayers=[99], steerStrength=1,
                                                                  steerTokens=[{"token": " cat", "type": "LOGIT_LENS"}])),
                                            400, dialect)["error"]
        assert lens_error(client, conv(web_body(type=["NOPE"])), 422, dialect)["detail"]
    assert lens_error(http, snake(web_body(model="gpt2-small")), 400, "v1") == {"error": "Unsupported model"}


def _model_handle():
    from ray import serve

    return serve.get_deployment_handle("ModelDeployment", app_name="saeserve")


def _wait_idle(model, deadline_s: float = 30) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        s = model.lens_stats.remote().result()
        if s["active"] == 0 or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_disconnect_stops_the_run_and_fail_if_busy_is_429(np_web, ref):
    model = _model_handle()
    # Steered greedy generation that repeats " cat" to the end of the context (no EOS): a long, deterministic run.
    long_run = web_body(prompt="the cat", numCompletionTokens=1024, steerTokens=[{"token": " cat", "type": "LOGIT_LENS"}],
                        steerLayers=[0, 1, 2, 3], steerStrength=0.5, steerGeneratedTokens=True, topN=1)
    whole = np_web.post(PATH, json={**long_run, "stream": False}).json()
    room = whole["meta"]["num_completion_tokens"]
    assert room == ref.cfg.n_ctx - whole["meta"]["prompt_len"] and whole["done"]["seq_len"] == ref.cfg.n_ctx
    before = _wait_idle(model)
    with np_web.stream("POST", PATH, json=long_run) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert json.loads(next(lines))["kind"] == "meta"
        # While that run is under way on the replica, a failIfBusy request is refused at once, as busy (checked
        # only while the replica reports it active; tests/engine/test_lens_replica.py checks it deterministically).
        if model.lens_stats.remote().result()["active"] > 0:
            r = np_web.post(PATH, json=web_body(failIfBusy=True))
            assert r.status_code == 429, r.text
            assert r.json()["busy"] is True and isinstance(r.json()["error"], str)
    after = _wait_idle(model)
    # the connection closed after one line: the run was cancelled long before its tokens were all generated
    assert after["active"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["generated"] - before["generated"] < room
    assert np_web.post(PATH, json=web_body(failIfBusy=True, stream=False)).status_code == 200  # idle again


def test_capabilities_list_the_lens(http):
    c = http.get("/v1/capabilities").json()
    assert {"/v1/lens/prompt", "/neuronpedia/v1/lens/prompt"} <= set(c["routes"])
    assert c["limits"]["lens_token_limit"] == min(1024, c["n_ctx"])
