"""The lens engine (Ray-free) against TransformerLens called directly on the same weights: logit lens =
unembed(ln_final(resid_post)), Jacobian lens = the file's J applied first, the softcap, the non-word filter, greedy
generation = TransformerLens generate, the interventions = the same edits written as plain TL hooks, reuse,
chunking, bad requests, the lens file's checks, bfloat16."""

from __future__ import annotations

import math

import pytest
import torch

from deployments.engine import lens as EL
from deployments.engine.errors import RequestError
from deployments.engine.lens import JacobianLens, LensEngine, LensRun, run_lens
from deployments.engine.lens_text import decode_one, is_word_like
from deployments.engine.pack import load_model_dir
from deployments.protocol import JACOBIAN_LENS, LOGIT_LENS, LensIntervention, LensRequest, LensSteerToken
from tests import reference as R

LENS_FILE = "jlens/demo-corpus/demo-lm_jacobian_lens.pt"
PROMPTS = ["the cat sat on the mat", "Tom saw a red bird in the park. It was", "def add(x, y):\n    return"]
# Read-out probabilities are rounded to 4 places: ours and the reference's may differ by half a unit of the 4th place
# plus float32 noise; computed in a different shape (KV-cached step vs whole-sequence forward) add ~1e-6 relative.
ROUNDED = 6e-5
RESHAPED = 1.5e-4


@pytest.fixture(scope="module")
def ref(pack_dir):
    return R.model(str(pack_dir))


@pytest.fixture(scope="module")
def lens_data(pack_dir):
    return torch.load(pack_dir / LENS_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def engine(pack_dir):
    m = load_model_dir(pack_dir)
    lens = JacobianLens.from_file(pack_dir / LENS_FILE, m.cfg.d_model, m.cfg.n_layers)
    return LensEngine(m, lens)


def ids_of(ref, text: str) -> list[int]:
    return [ref.tokenizer.bos_token_id, *ref.tokenizer(text, add_special_tokens=False)["input_ids"]]


def all_layers(ref) -> list[int]:
    return list(range(ref.cfg.n_layers))


def request(ref, ids, types=(LOGIT_LENS,), layers=None, **kw) -> LensRequest:
    L = ref.cfg.n_layers
    by_type = {t: (layers or {}).get(t, list(range(L))) for t in types}
    return LensRequest(tokens=ids, types=list(types), layers_by_type=by_type, top_n=kw.pop("top_n", 8),
                       filter_non_word=kw.pop("filter_non_word", False), **kw)


@torch.no_grad()
def reference_resid(ref, ids, hooks=()) -> dict[int, torch.Tensor]:
    """``{layer: resid_post [pos, d]}`` from a plain TL forward, after ``hooks`` (edits) at the same points."""
    got = {}

    def capture(layer):
        def fn(act, hook):
            got[layer] = act[0].clone()
        return fn

    cap = [(f"blocks.{x}.hook_resid_post", capture(x)) for x in all_layers(ref)]
    with ref.hooks(fwd_hooks=[*hooks, *cap]):
        ref(torch.tensor([ids]))
    return got


@torch.no_grad()
def reference_logits(ref, resid: torch.Tensor, J=None, softcap=None) -> torch.Tensor:
    r = resid if J is None else resid @ J.T
    logits = ref.unembed(ref.ln_final(r[None]))[0].double()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def assert_readout(ids, probs, logits, atol=ROUNDED, mask=None):
    """One position and layer: ``ids`` are a top-n of ``logits`` (among ``mask`` when given; ties may come in any
    order), and ``probs`` their full-vocabulary probabilities."""
    p = torch.softmax(logits, dim=-1)
    pool = p if mask is None else torch.where(mask, p, torch.zeros_like(p))
    top = torch.topk(pool, len(ids)).values
    at = p[torch.tensor(ids)]
    assert torch.allclose(torch.sort(at, descending=True).values, top, atol=atol, rtol=0), (ids, at, top)
    assert torch.allclose(torch.tensor(probs, dtype=torch.float64), at, atol=atol, rtol=0)


def assert_chunks(ref, chunks, resid_of, types_layers, J=None, atol=ROUNDED, first=0):
    """Every position's read-out in ``chunks`` against the reference residuals ``resid_of(position) -> {layer: r}``."""
    pos = first
    for c in chunks:
        assert c.start == pos
        for i in range(len(c.tokens)):
            resid = resid_of(pos + i)
            for r in c.results:
                for k, layer in enumerate(types_layers[r.type]):
                    mapped = J if (r.type == JACOBIAN_LENS and layer != ref.cfg.n_layers - 1) else None
                    logits = reference_logits(ref, resid[layer][None], None if mapped is None else mapped[layer])[0]
                    assert_readout(r.top_ids[i, k].tolist(), r.top_probs[i, k].tolist(), logits, atol)
        pos += len(c.tokens)
    return pos


# --- read-outs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_logit_and_jacobian_lens_match_transformer_lens(ref, engine, lens_data, text):
    ids = ids_of(ref, text)
    L = ref.cfg.n_layers
    jl = sorted(lens_data["source_layers"]) + [L - 1]
    req = request(ref, ids, types=(LOGIT_LENS, JACOBIAN_LENS), layers={JACOBIAN_LENS: jl})
    chunks = run_lens(engine, req)
    resid = reference_resid(ref, ids)
    J = {int(k): v.float() for k, v in lens_data["J"].items()}
    n = assert_chunks(ref, chunks, lambda p: {x: resid[x][p] for x in resid}, req.layers_by_type, J=J)
    assert n == len(ids)
    assert [r.type for r in chunks[0].results] == [LOGIT_LENS, JACOBIAN_LENS]
    assert chunks[0].results[1].top_ids.shape == (len(ids), len(jl), 8)
    # the last layer is never mapped: both types read the model's own output there
    for c in chunks:
        assert (c.results[0].top_ids[:, -1] == c.results[1].top_ids[:, -1]).all()


def test_last_layer_readout_is_the_models_own_output(ref, engine):
    ids = ids_of(ref, PROMPTS[0])
    chunks = run_lens(engine, request(ref, ids, layers={LOGIT_LENS: [ref.cfg.n_layers - 1]}, top_n=5))
    with torch.no_grad():
        logits = ref(torch.tensor([ids]))[0].double()
    for i in range(len(ids)):
        assert_readout(chunks[0].results[0].top_ids[i, 0].tolist(), chunks[0].results[0].top_probs[i, 0].tolist(), logits[i])


def test_softcap_of_a_model_that_has_one(ref, engine, monkeypatch):
    """Gemma-2 style: TransformerLens caps in forward, not in unembed; the read-out caps too."""
    monkeypatch.setattr(engine.model.cfg, "output_logits_soft_cap", 2.0)
    capped = LensEngine(engine.model, engine.lens)
    assert capped.softcap == 2.0
    ids = ids_of(ref, PROMPTS[1])
    chunks = run_lens(capped, request(ref, ids, top_n=4))
    resid = reference_resid(ref, ids)
    for i in range(len(ids)):
        for k in all_layers(ref):
            logits = reference_logits(ref, resid[k][i][None], softcap=2.0)[0]
            assert_readout(chunks[0].results[0].top_ids[i, k].tolist(), chunks[0].results[0].top_probs[i, k].tolist(), logits)


def test_filter_non_word_tokens_keeps_words_and_the_last_layers_argmax(ref, engine):
    ids = ids_of(ref, "the cat , sat ; on the mat . ! ?")
    chunks = run_lens(engine, request(ref, ids, filter_non_word=True))
    words = torch.tensor([is_word_like(decode_one(ref.tokenizer, t)) for t in range(ref.cfg.d_vocab)])
    resid = reference_resid(ref, ids)
    L = ref.cfg.n_layers
    kept_non_word = 0
    for i in range(len(ids)):
        for k in range(L):
            got = chunks[0].results[0].top_ids[i, k].tolist()
            logits = reference_logits(ref, resid[k][i][None])[0]
            mask = words.clone()
            if k == L - 1:  # the model's own prediction survives the filter
                mask[int(logits.argmax())] = True
                kept_non_word += not bool(words[int(logits.argmax())])
            assert_readout(got, chunks[0].results[0].top_probs[i, k].tolist(), logits, mask=mask)
            assert all(mask[t] for t in got)
    assert kept_non_word > 0  # the prompt has predictable punctuation: the exception was exercised


# --- generation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_generation_equals_transformer_lens_generate(ref, engine, text):
    ids = ids_of(ref, text)
    n = 12
    chunks = run_lens(engine, request(ref, ids, max_new_tokens=n, temperature=0))
    gen = [t for c in chunks if c.generated for t in c.tokens]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, stop_at_eos=True,
                            eos_token_id=engine.stop_tokens, verbose=False, use_past_kv_cache=True)[0, len(ids):].tolist()
    assert gen == want[: len(gen)] and (len(gen) == n or gen[-1] in engine.stop_tokens)
    assert chunks[-1].finished in ("eos", "length")
    # each generated token is read out from the forward pass that has it as input: the whole sequence's forward
    resid = reference_resid(ref, ids + gen)
    assert_chunks(ref, [c for c in chunks if c.generated], lambda p: {x: resid[x][p] for x in resid},
                  {LOGIT_LENS: all_layers(ref)}, atol=RESHAPED, first=len(ids))


def test_generation_stops_at_a_stop_token_and_emits_it(ref, engine, monkeypatch):
    ids = ids_of(ref, PROMPTS[0])
    free = [t for c in run_lens(engine, request(ref, ids, max_new_tokens=6, temperature=0)) if c.generated for t in c.tokens]
    assert len(free) == 6
    monkeypatch.setattr(engine, "stop_tokens", [free[2]])
    chunks = run_lens(engine, request(ref, ids, max_new_tokens=6, temperature=0))
    gen = [t for c in chunks if c.generated for t in c.tokens]
    assert gen == free[: free.index(free[2]) + 1] and chunks[-1].finished == "eos"


def test_sampled_tokens_are_read_out(ref, engine):
    ids = ids_of(ref, PROMPTS[1])
    chunks = run_lens(engine, request(ref, ids, max_new_tokens=8, temperature=1.0))
    gen = [t for c in chunks if c.generated for t in c.tokens]
    assert len(gen) == 8 or gen[-1] in engine.stop_tokens
    resid = reference_resid(ref, ids + gen)
    assert_chunks(ref, [c for c in chunks if c.generated], lambda p: {x: resid[x][p] for x in resid},
                  {LOGIT_LENS: all_layers(ref)}, atol=RESHAPED, first=len(ids))


# --- interventions --------------------------------------------------------------------------------------------


def unit(v):
    return v / v.norm()


def reference_direction(ref, J, tokens, layer):
    acc = torch.zeros(ref.cfg.d_model, dtype=torch.float64)
    for t, kind in tokens:
        w = ref.W_U[:, t].detach().double()
        if kind == JACOBIAN_LENS and layer in J and layer != ref.cfg.n_layers - 1:
            w = w @ J[layer].double()
        acc += unit(w)
    return acc


def reference_edit(kind, strength, src, tgt, bos_first: bool, only_prefill: bool = False):
    """The contract's edits as a plain TL hook (float64), leaving the BOS position alone."""
    def fn(act, hook):
        if only_prefill and act.shape[1] == 1:
            return act
        h = act.double()
        if kind == "swap":
            s, t = unit(src), unit(tgt)
            c = (h * s).sum(-1, keepdim=True)
            out = h - c * s + c * t
        elif kind == "ablate":
            d = unit(src)
            out = h - (h * d).sum(-1, keepdim=True) * d
        else:
            norm = h.norm(dim=-1, keepdim=True)
            inj = strength * norm * src
            inj = inj * torch.clamp(norm / inj.norm(dim=-1, keepdim=True), max=1.0)
            out = h + inj
        if bos_first and act.shape[1] > 1:
            out[:, 0] = h[:, 0]
        return out.to(act.dtype)
    return fn


INTERVENTIONS = [("add", 0.3, LOGIT_LENS), ("add", -0.4, JACOBIAN_LENS), ("add", 5.0, LOGIT_LENS),  # 5.0: capped at |h|
                 ("ablate", 0.0, JACOBIAN_LENS), ("swap", 0.0, LOGIT_LENS), ("swap", 0.0, JACOBIAN_LENS)]


@pytest.mark.parametrize("kind,strength,lens_type", INTERVENTIONS)
def test_interventions_match_a_direct_hooked_computation(ref, engine, lens_data, kind, strength, lens_type):
    tok = ref.tokenizer
    ids = ids_of(ref, PROMPTS[1])
    cat, dog, red = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" cat", " dog", " red"))
    steer = [LensSteerToken(cat, lens_type), LensSteerToken(red, LOGIT_LENS)]
    swap = LensSteerToken(dog, lens_type) if kind == "swap" else None
    layers = [0, 2]
    iv = LensIntervention(steer=steer, layers=layers, strength=strength, ablate=kind == "ablate", swap=swap,
                          skip_tokens=[tok.bos_token_id])
    req = request(ref, ids, types=(LOGIT_LENS, JACOBIAN_LENS), reuse_len=3, intervention=iv,
                  layers={JACOBIAN_LENS: all_layers(ref)})
    chunks = run_lens(engine, req)
    assert chunks[0].start == 0  # an intervention reads every position out again
    J = {int(k): v.float() for k, v in lens_data["J"].items()}
    hooks = []
    for x in layers:
        src = reference_direction(ref, J, [(cat, lens_type), (red, LOGIT_LENS)], x)
        tgt = reference_direction(ref, J, [(dog, lens_type)], x)
        hooks.append((f"blocks.{x}.hook_resid_post", reference_edit(kind, strength, src, tgt, bos_first=True)))
    resid = reference_resid(ref, ids, hooks)
    plain = reference_resid(ref, ids)
    assert torch.equal(resid[3][0], plain[3][0])  # BOS is left alone
    assert not torch.allclose(resid[3][1:], plain[3][1:], atol=1e-3)  # and the rest did change
    # float64 edits in the reference, float32 in ours: the same residuals to ~1e-6 relative
    assert_chunks(ref, chunks, lambda p: {x: resid[x][p] for x in resid}, req.layers_by_type, J=J, atol=RESHAPED)


@pytest.mark.parametrize("on_generated", [False, True])
def test_steered_generation_equals_transformer_lens_generate_with_the_hook(ref, engine, on_generated):
    tok = ref.tokenizer
    ids = ids_of(ref, PROMPTS[0])
    bird = tok(" bird", add_special_tokens=False)["input_ids"][0]
    iv = LensIntervention(steer=[LensSteerToken(bird)], layers=[1, 2], strength=0.8, generated=on_generated,
                          skip_tokens=[tok.bos_token_id])
    n = 10
    chunks = run_lens(engine, request(ref, ids, max_new_tokens=n, intervention=iv))
    gen = [t for c in chunks if c.generated for t in c.tokens]
    hooks = [(f"blocks.{x}.hook_resid_post", reference_edit("add", 0.8, reference_direction(ref, {}, [(bird, LOGIT_LENS)], x),
                                                            None, bos_first=True, only_prefill=not on_generated))
             for x in (1, 2)]
    with torch.no_grad(), ref.hooks(fwd_hooks=hooks):
        want = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, stop_at_eos=True,
                            eos_token_id=engine.stop_tokens, verbose=False, use_past_kv_cache=True)[0, len(ids):].tolist()
    assert gen == want[: len(gen)]
    plain = [t for c in run_lens(engine, request(ref, ids, max_new_tokens=n)) if c.generated for t in c.tokens]
    assert gen != plain  # the steering did something


def test_intervention_with_no_layers_changes_nothing_and_keeps_reuse(ref, engine):
    ids = ids_of(ref, PROMPTS[0])
    iv = LensIntervention(steer=[LensSteerToken(5)], layers=[], strength=1.0)
    a = run_lens(engine, request(ref, ids, reuse_len=4, intervention=iv))
    b = run_lens(engine, request(ref, ids, reuse_len=4))
    assert a[0].start == 4 and [c.results[0].top_ids.tolist() for c in a] == [c.results[0].top_ids.tolist() for c in b]


def test_jacobian_directions_are_pulled_back_through_the_lens(ref, engine):
    t = 840
    d = engine.directions([LensSteerToken(t, JACOBIAN_LENS)], all_layers(ref))
    w = ref.W_U[:, t].detach().float()
    for x in all_layers(ref):
        want = unit(w @ engine.lens.J[x]) if x != ref.cfg.n_layers - 1 else unit(w)
        assert torch.allclose(d[x], want, atol=1e-6)


# --- reuse, chunks, checks ----------------------------------------------------------------------------------


def test_reuse_reads_out_only_the_new_positions(ref, engine):
    ids = ids_of(ref, PROMPTS[1])
    full = run_lens(engine, request(ref, ids))
    part = run_lens(engine, request(ref, ids, reuse_len=5))
    assert part[0].start == 5 and sum(len(c.tokens) for c in part) == len(ids) - 5
    assert part[0].results[0].top_ids.tolist() == full[0].results[0].top_ids[5:].tolist()
    none = run_lens(engine, request(ref, ids, reuse_len=len(ids)))
    assert none == []
    gen_only = run_lens(engine, request(ref, ids, reuse_len=len(ids), max_new_tokens=3))
    assert [c.generated for c in gen_only] == [True] * len(gen_only) and gen_only[0].start == len(ids)


def test_prompt_read_out_in_chunks_is_the_same(ref, engine, monkeypatch):
    ids = ids_of(ref, PROMPTS[1])
    whole = run_lens(engine, request(ref, ids))
    monkeypatch.setattr(EL, "PROMPT_CHUNK", 3)
    parts = run_lens(engine, request(ref, ids))
    assert [c.start for c in parts] == list(range(0, len(ids), 3))
    resid = reference_resid(ref, ids)
    # another matmul shape: the same numbers to float32 reassociation, so ties may swap
    assert_chunks(ref, parts, lambda p: {x: resid[x][p] for x in resid}, {LOGIT_LENS: all_layers(ref)}, atol=RESHAPED)
    assert len(whole) == 1


def test_bad_requests_are_request_errors(ref, engine):
    ids = ids_of(ref, PROMPTS[0])
    L, V = ref.cfg.n_layers, ref.cfg.d_vocab
    bad = [
        request(ref, []),
        request(ref, [V]),
        request(ref, ids, layers={LOGIT_LENS: [0, 1]}),  # without the last layer
        request(ref, ids, layers={LOGIT_LENS: [2, 1, L - 1]}),
        request(ref, ids, top_n=0),
        request(ref, ids, top_n=V + 1),
        request(ref, ids, max_new_tokens=ref.cfg.n_ctx),
        request(ref, ids, temperature=-1.0),
        request(ref, ids, temperature=math.nan),
        request(ref, ids, reuse_len=len(ids) + 1),
        request(ref, ids, intervention=LensIntervention(steer=[LensSteerToken(V)], layers=[0], strength=1.0)),
        request(ref, ids, intervention=LensIntervention(steer=[LensSteerToken(1)], layers=[L], strength=1.0)),
        LensRequest(tokens=ids, types=["NOPE"], layers_by_type={"NOPE": [L - 1]}, top_n=3),
    ]
    for req in bad:
        with pytest.raises(RequestError):
            LensRun(engine, req)
    no_lens = LensEngine(engine.model, None)
    with pytest.raises(RequestError, match="Jacobian lens is not available"):
        LensRun(no_lens, request(ref, ids, types=(JACOBIAN_LENS,)))


def test_lens_file_is_checked(tmp_path, lens_data, ref):
    d, L = ref.cfg.d_model, ref.cfg.n_layers
    ok = JacobianLens.from_dict(lens_data, d, L)
    assert ok.source_layers == [0, 1, 2] and ok.J[0].dtype == torch.float32
    cases = [
        ({k: v for k, v in lens_data.items() if k != "J"}, "keys"),
        ({**lens_data, "d_model": d + 1}, "d_model"),
        ({**lens_data, "J": {0: torch.zeros(d, d + 1)}, "source_layers": [0]}, "tensor"),
        ({**lens_data, "J": {0: torch.full((d, d), float("nan"))}, "source_layers": [0]}, "NaN"),
        ({**lens_data, "J": {L: torch.zeros(d, d)}, "source_layers": [L]}, "outside"),
        ({**lens_data, "source_layers": [0, 1, 2, 5]}, "no matrix"),
    ]
    for data, what in cases:
        with pytest.raises(ValueError, match=what):
            JacobianLens.from_dict(data, d, L)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        JacobianLens.from_file(bad, d, L)


def test_bfloat16_model_reads_out_its_own_logits(pack_dir):
    """In bfloat16, ln_final and unembed run in the model's dtype as its forward does; the softmax in float32."""
    m = load_model_dir(pack_dir, dtype=torch.bfloat16)
    eng = LensEngine(m, None)
    ids = [m.tokenizer.bos_token_id, *m.tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]]
    L = m.cfg.n_layers
    chunks = run_lens(eng, LensRequest(tokens=ids, types=[LOGIT_LENS], layers_by_type={LOGIT_LENS: list(range(L))},
                                       top_n=5, filter_non_word=False, max_new_tokens=3))
    with torch.no_grad():
        own = m(torch.tensor([ids]))[0].float().double()
    r = chunks[0].results[0]
    for i in range(len(ids)):
        assert_readout(r.top_ids[i, -1].tolist(), r.top_probs[i, -1].tolist(), own[i])
    assert all(torch.isfinite(torch.tensor(c.results[0].top_probs)).all() for c in chunks)
