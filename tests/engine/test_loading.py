"""Loading, Ray-free: SAE Lens pretrained sets from an offline Hugging Face cache, a TransformerLens model by name
from the same cache, every SAE architecture from local SAE Lens directories, SAE config files, include/exclude,
dtypes, and bad inputs.

The pretrained path is proven offline by laying out a Hugging Face cache (``models--<org>--<repo>/snapshots/<commit>``
+ ``refs/main``) that holds small random weights under a real release's repo and file names, then loading it
through the real ``SAE.from_pretrained`` / ``HookedTransformer.from_pretrained_no_processing`` with
HF_HUB_OFFLINE=1. The cache location is read by huggingface_hub at import time, so those checks run in a fresh
interpreter with HF_HUB_CACHE pointing at the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from deployments.engine.loading import load_model, load_sae, load_saes, parse_dtype, sae_nbytes
from deployments.specs import SAESpec, check_model, list_pretrained_models, neuronpedia_set_of, pretrained_sets, read_sae_config, resolve_sae_specs
from tests import background

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RELEASE = "gpt2-small-res-jb"
D_MODEL = 64

REPO_PACK = Path(__file__).resolve().parents[2] / "models" / "demo-lm"


# --- a Hugging Face cache with a real release's names --------------------------------------------


def _snapshot(hub: Path, repo_id: str) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def _write_release(hub: Path, d_sae: int = 96) -> dict[str, str]:
    """Every SAE of gpt2-small-res-jb, as the release's repo lays them out: ``<path>/cfg.json`` (a pre-6.0 SAE Lens
    config, like the real files), ``<path>/sae_weights.safetensors``, ``<path>/sparsity.safetensors``."""
    from safetensors.torch import save_file
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()[RELEASE]
    snap = _snapshot(hub, lookup.repo_id)
    g = torch.Generator().manual_seed(0)
    for i, (sae_id, path) in enumerate(lookup.saes_map.items()):
        d = snap / path
        d.mkdir(parents=True, exist_ok=True)
        layer = int(sae_id.split(".")[1])
        cfg = {
            "model_name": "gpt2-small", "hook_point": sae_id, "hook_point_layer": layer, "hook_point_head_index": None,
            "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False, "context_size": 128,
            "d_in": D_MODEL, "d_sae": d_sae, "expansion_factor": d_sae // D_MODEL, "b_dec_init_method": "geometric_median",
            "device": "mps", "dtype": "torch.float32", "seed": 42, "l1_coefficient": 8e-05, "lr": 0.0004,
        }
        (d / "cfg.json").write_text(json.dumps(cfg))
        W_dec = torch.randn(d_sae, D_MODEL, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g)) / D_MODEL**0.5
        save_file({
            "W_dec": W_dec, "W_enc": (W_dec.T * 3 + torch.randn(D_MODEL, d_sae, generator=g) * 0.05).contiguous(),
            "b_enc": -torch.rand(d_sae, generator=g) * 0.5 - 0.01 * i, "b_dec": torch.randn(D_MODEL, generator=g) * 0.01,
        }, str(d / "sae_weights.safetensors"))
        save_file({"sparsity": -torch.rand(d_sae, generator=g) * 5}, str(d / "sparsity.safetensors"))
    return dict(lookup.saes_map)


def _tiny_gpt2(hub: Path, repo_id: str, n_layer: int, seed: int) -> None:
    """A GPT-2-architecture repo (config.json, model.safetensors, tokenizer) of a tiny size, under a real name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    snap = _snapshot(hub, repo_id)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, the cat sat on the mat and the dog ran in the park"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                          unk_token="<|endoftext|>", model_max_length=128)
    t.save_pretrained(str(snap))
    cfg = GPT2Config(n_layer=n_layer, n_embd=D_MODEL, n_head=4, n_positions=128, n_ctx=128, vocab_size=len(t),
                     bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(str(snap))


def hf_hub() -> Path:
    """The cache, in a temp dir of its own; built in the session's main thread (it seeds torch's global RNG)."""
    hub = Path(tempfile.mkdtemp(prefix="hf-")) / "hub"
    _write_release(hub)
    _tiny_gpt2(hub, "gpt2", n_layer=12, seed=0)  # TransformerLens: gpt2-small -> official "gpt2" -> repo "gpt2"
    _tiny_gpt2(hub, "distilgpt2", n_layer=2, seed=1)  # another name, for override_model_id
    return hub


def _run_offline(hub: Path, code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(hub.parent),
           "HF_HUB_CACHE": str(hub), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    prog = "import json, sys\nsys.path.insert(0, %r)\n" % str(REPO) + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_directory_names_map_like_neuronpedia():
    assert neuronpedia_set_of("gpt2-small/0-res-jb") == ("gpt2-small", "0-res-jb", "res-jb")
    assert neuronpedia_set_of("gemma-2-2b/20-gemmascope-res-16k") == ("gemma-2-2b", "20-gemmascope-res-16k", "gemmascope-res-16k")
    rows = pretrained_sets("gpt2-small")["res-jb"]
    assert [r.id for r in rows][:3] == ["0-res-jb", "1-res-jb", "2-res-jb"]
    assert {r.release for r in rows} == {RELEASE} and rows[5].release_sae_id == "blocks.5.hook_resid_pre"
    models = list_pretrained_models()
    assert models["gpt2-small"]["res-jb"] == len(rows)
    # an -it model falls back to its base model's sets when SAE Lens has none of its own
    assert "res-jb" in pretrained_sets("gpt2-small-it")


# A fresh interpreter importing SAE Lens and TransformerLens: ~15 s on one core, in the session's background.
@background.check("hf-cache-offline", order=3, prepare=hf_hub)
def load_offline_from_hf_cache(hub: Path) -> dict:
    try:
        return _run_offline(hub, OFFLINE_PROGRAM)
    finally:
        shutil.rmtree(hub.parent, ignore_errors=True)


OFFLINE_PROGRAM = """
        import torch
        from sae_lens import SAE
        from safetensors.torch import load_file
        from huggingface_hub import hf_hub_download
        from deployments.engine.loading import load_sae, load_model
        from deployments.specs import resolve_sae_specs

        specs = resolve_sae_specs("gpt2-small", ["res-jb"])
        picked = resolve_sae_specs("gpt2-small", ["res-jb"], include=[r"^(3|12)-"])
        model = load_model("gpt2-small", "cpu", "float32")
        tokens = model.to_tokens("hello world, the cat sat on the mat")
        res = {"ids": [s.id for s in specs], "hooks": [s.hook_name for s in specs], "picked": [s.to_dict() for s in picked],
               "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "encode": {}}
        for s in picked:
            sae = load_sae(s, "cpu", "float32")
            _, cache = model.run_with_cache(tokens, names_filter=s.hook_name)
            acts = cache[s.hook_name][0]
            ours = sae.encode(acts)
            direct = SAE.from_pretrained(s.release, s.release_sae_id, fold_W_dec_norm=True).encode(acts)
            w = load_file(hf_hub_download("jbloom/GPT2-Small-SAEs-Reformatted", s.release_sae_id + "/sae_weights.safetensors"))
            by_hand = torch.relu((acts - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * w["W_dec"].norm(dim=-1)
            res["encode"][s.id] = [float((ours - direct).abs().max()), float((ours - by_hand).abs().max()),
                                   int((ours > 0).sum())]
        bf16 = load_sae(picked[0], "cpu", "bfloat16")
        res["bf16"] = str(bf16.W_enc.dtype)
        over = load_model("gpt2-small", "cpu", "float32", override_model_id="distilgpt2")
        res["override_layers"] = over.cfg.n_layers
        half = load_model("gpt2-small", "cpu", "float16")
        res["half"] = str(half.W_E.dtype)
        # offline with an empty cache, a spec cannot be known, and the message says why
        import tempfile, huggingface_hub.constants as C
        C.HF_HUB_CACHE = tempfile.mkdtemp()
        try:
            resolve_sae_specs("gpt2-small", ["res-jb"], include=["^5-"])
            res["no_cache"] = None
        except ValueError as e:
            res["no_cache"] = str(e)
        print(json.dumps(res))
"""


@pytest.mark.background("hf-cache-offline")
def test_pretrained_release_offline_from_hf_cache():
    """Resolve set res-jb for gpt2-small (configs only), then load two SAEs through the real SAE.from_pretrained,
    and the model through HookedTransformer.from_pretrained_no_processing, all offline from the cache; with an
    empty cache, resolving fails with a message that says why."""
    out = background.result("hf-cache-offline")
    assert out["ids"] == [f"{i}-res-jb" for i in range(13)]  # "gpt2-small/12-res-jb" is blocks.11.hook_resid_post
    assert out["hooks"][:2] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert out["hooks"][12] == "blocks.11.hook_resid_post"
    assert [p["id"] for p in out["picked"]] == ["3-res-jb", "12-res-jb"]
    p = out["picked"][0]
    assert (p["release"], p["release_sae_id"], p["d_in"], p["d_sae"], p["architecture"], p["path"]) == \
        (RELEASE, "blocks.3.hook_resid_pre", D_MODEL, 96, "standard", None)
    assert out["n_layers"] == 12 and out["d_model"] == D_MODEL
    for sae_id, (vs_direct, vs_hand, n_active) in out["encode"].items():
        assert vs_direct == 0.0, sae_id
        assert vs_hand < 1e-4, sae_id
        assert n_active > 0, sae_id  # the comparison is not vacuous
    assert out["bf16"] == "torch.bfloat16"
    assert out["override_layers"] == 2  # the override's weights, served under the base id
    assert out["half"] == "torch.float16"
    assert out["no_cache"] and "5-res-jb" in out["no_cache"] and "cache" in out["no_cache"]


# --- every architecture from local SAE Lens directories, through a config file ---------------------


def _write_arch_sae(out: Path, arch: str, d_in: int = 32, d_sae: int = 80, seed: int = 0) -> Path:
    import sae_lens as sl

    g = torch.Generator().manual_seed(seed)
    classes = {"standard": (sl.StandardSAE, sl.StandardSAEConfig, {}), "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {}),
               "topk": (sl.TopKSAE, sl.TopKSAEConfig, {"k": 7}), "gated": (sl.GatedSAE, sl.GatedSAEConfig, {})}
    cls, cfg_cls, kw = classes[arch]
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, **kw)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    cfg.metadata.model_name = "demo-lm"
    sae = cls(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_dec":
                p.copy_(torch.randn(d_sae, d_in, generator=g) * (0.3 + torch.rand(d_sae, 1, generator=g)))
            elif name == "threshold":
                p.copy_(torch.rand(d_sae, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sae.save_model(out)
    return out


ARCHS = ["standard", "jumprelu", "topk", "gated"]


@pytest.fixture(scope="module")
def arch_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archs")
    for i, arch in enumerate(ARCHS):
        _write_arch_sae(root / "saes" / arch, arch, seed=i)
    cfg = root / "saes.yaml"
    cfg.write_text("# SAEs outside SAE Lens's directory\nsets:\n  arch:\n" +
                   "".join(f"    {i}-{arch}: saes/{arch}\n" for i, arch in enumerate(ARCHS)))
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_and_encodes_like_sae_lens(arch_config, arch):
    from sae_lens import SAE

    specs = {s.architecture: s for s in resolve_sae_specs("models/demo-lm", [], sae_config=str(arch_config))}
    spec = specs[arch]
    assert (spec.set_name, spec.hook_name, spec.d_in, spec.d_sae) == ("arch", "blocks.1.hook_resid_post", 32, 80)
    ours = load_sae(spec)
    direct = SAE.load_from_disk(spec.path)
    try:
        direct.fold_W_dec_norm()  # what the service does, where SAE Lens defines it (not for topk without rescaling)
    except NotImplementedError:
        assert arch == "topk"
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(9)) * 2
    a, b = ours.encode(x), direct.encode(x)
    assert type(ours).__name__ == type(direct).__name__
    assert (a > 0).any(), "vacuous: nothing fires"
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if arch == "topk":
        assert int((a[0] != 0).sum()) <= 7


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_columns_per_architecture(arch_config, arch):
    """activation/single encodes only its feature's column where features are computed apart (standard, JumpReLU,
    gated: SAE Lens's own encode on the sliced parameters) and not for TopK, whose features compete (the shard then
    encodes them all); a subclass (which may change the activation) is not trusted either."""
    from deployments.engine import features as F

    spec = {s.architecture: s for s in resolve_sae_specs("models/demo-lm", [], sae_config=str(arch_config))}[arch]
    sae = load_sae(spec)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4)) * 2
    cols = [79, 0, 33, 34, 33]  # any order, repeats
    if arch == "topk":
        assert not F.separable(sae)
        with pytest.raises(ValueError, match="cannot be encoded apart"):
            F.encode_columns(sae, x.numpy(), cols)
        return
    assert F.separable(sae)
    got = F.encode_columns(sae, x.numpy(), cols)
    full = sae.encode(x)
    assert (full[:, cols] > 0).any(), "vacuous: nothing fires"
    # a JumpReLU value whose pre-activation lies within rounding of its threshold may fall either side
    pre = x @ sae.W_enc + sae.b_enc if arch == "jumprelu" else None
    clear = torch.ones_like(full[:, cols], dtype=torch.bool) if pre is None else \
        (pre[:, cols] - sae.threshold[cols]).abs() > 1e-4
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(got[clear], full[:, cols][clear], rtol=1e-5, atol=1e-5)
    sub = type("Sub" + type(sae).__name__, (type(sae),), {})  # a registered variant of the class
    sae.__class__ = sub
    assert not F.separable(sae)
    with pytest.raises(ValueError, match="cannot be encoded apart"):
        F.encode_columns(sae, x.numpy(), cols)


def test_config_file_forms_and_paths(tmp_path, arch_config):
    src = arch_config.parent / "saes"
    (tmp_path / "dirset").mkdir()
    for i, arch in enumerate(["standard", "gated"]):
        os.symlink(src / arch, tmp_path / "dirset" / str(i * 4))
    cfg = {
        "model": str(REPO / "models" / "demo-lm"), "model_id": "my-lm",
        "sets": {
            "mine": {"0-mine": str(src / "standard"), "1-mine": {"path": str(src / "jumprelu")}},
            "folder": str(tmp_path / "dirset"),
            "picked": {"5-picked": {"release": RELEASE, "sae_id": "blocks.5.hook_resid_pre"}},
        },
    }
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    parsed = read_sae_config(str(p))
    assert parsed.model == cfg["model"] and parsed.model_id == "my-lm"
    assert parsed.sets["picked"]["5-picked"] == {"release": RELEASE, "sae_id": "blocks.5.hook_resid_pre"}
    specs = resolve_sae_specs("models/demo-lm", ["folder", "mine"], sae_config=str(p))
    assert [s.id for s in specs] == ["0-folder", "4-folder", "0-mine", "1-mine"]
    assert specs[1].architecture == "gated" and specs[3].architecture == "jumprelu"
    # a config's set name wins over the pack's; the pack's other sets still resolve
    both = resolve_sae_specs("models/demo-lm", ["res-demo", "mine"], sae_config=str(p))
    n_layers = json.loads((REPO_PACK / "model" / "config.json").read_text())["n_layers"]
    assert [s.set_name for s in both] == ["res-demo"] * n_layers + ["mine", "mine"]
    # AppArgs takes model and model_id from the file unless given
    from ingress.args import AppArgs

    a = AppArgs(sae_config=str(p))
    assert a.model.name == cfg["model"] and a.served_model_id == "my-lm"
    b = AppArgs(sae_config=str(p), model="models/demo-lm", model_id="other")
    assert b.served_model_id == "other"
    assert AppArgs.model_validate(a.model_dump()).model == a.model  # nested sections round-trip


def test_demo_pack_still_resolves_and_loads():
    n_layers = json.loads((REPO_PACK / "model" / "config.json").read_text())["n_layers"]
    ids = [f"{i}-res-demo" for i in range(n_layers)]
    specs = resolve_sae_specs("models/demo-lm", ["res-demo"])
    assert [s.id for s in specs] == ids and all(s.path for s in specs)
    loaded = list(load_saes(specs, "cpu", "float16"))
    assert [s.id for s, _ in loaded] == ids
    assert loaded[0][1].W_enc.dtype == torch.float16
    assert sae_nbytes(loaded[0][1]) == sum(p.numel() * 2 for p in loaded[0][1].parameters())
    m = load_model("models/demo-lm", "auto", "bfloat16")
    assert m.W_E.dtype == torch.bfloat16
    assert SAESpec(**specs[0].to_dict()) == specs[0]


def test_include_exclude(arch_config):
    kw = dict(sae_config=str(arch_config))
    ids = lambda **f: [s.id for s in resolve_sae_specs("models/demo-lm", [], **kw, **f)]  # noqa: E731
    assert ids() == ["0-standard", "1-jumprelu", "2-topk", "3-gated"]
    assert ids(include=["topk", "^0-"]) == ["0-standard", "2-topk"]
    assert ids(exclude=["gated"]) == ["0-standard", "1-jumprelu", "2-topk"]
    assert ids(include=["-(standard|gated)$"], exclude=["^0"]) == ["3-gated"]
    assert ids(include=["nothing-matches"]) == []


def test_bad_inputs(tmp_path, arch_config):
    with pytest.raises(ValueError, match="not found for model"):
        resolve_sae_specs("models/demo-lm", ["no-such-set"])
    with pytest.raises(ValueError, match="known sets for it: .*res-jb"):
        resolve_sae_specs("gpt2-small", ["res-nope"])
    with pytest.raises(ValueError, match="Bad include/exclude SAE regex"):
        resolve_sae_specs("models/demo-lm", ["res-demo"], include=["(unclosed"])
    with pytest.raises(ValueError, match="not found"):
        resolve_sae_specs("models/demo-lm", [], sae_dirs=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="not found"):
        read_sae_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    for text, msg in [("sets: [1, 2]\n", "`sets` must map"), ("sets: {a: {0-a: 3}}\n", "path string"),
                      ("sets: {a: {0-a: {release: x}}}\n", "release, sae_id"), ("model: x\nsetz: {}\n", "unknown keys"),
                      ("sets: {a: {0-a: nowhere}}\n", None), (": : :\n", "not valid YAML")]:
        bad.write_text(text)
        if msg is None:  # parses, but the directory is missing when resolved
            with pytest.raises(ValueError, match="not found"):
                resolve_sae_specs("models/demo-lm", [], sae_config=str(bad))
        else:
            with pytest.raises(ValueError, match=msg):
                read_sae_config(str(bad))
    empty = tmp_path / "noconfig"
    empty.mkdir()
    with pytest.raises(ValueError, match="no cfg.json"):
        resolve_sae_specs("models/demo-lm", [], sae_config={"sets": {"x": {"0-x": str(empty)}}})
    dup = {"sets": {"x": {"0-x": str(arch_config.parent / "saes" / "standard")}}}
    with pytest.raises(ValueError, match="Two SAEs are served as"):
        resolve_sae_specs("models/demo-lm", [], sae_config=dup, sae_dirs=[str(arch_config.parent / "saes" / "standard")] * 2)
    with pytest.raises(ValueError, match="Unknown dtype"):
        parse_dtype("float64")
    with pytest.raises(ValueError, match="Unknown model 'no-such-model'"):
        check_model("no-such-model")
    with pytest.raises(ValueError, match="Unknown override_model_id"):
        check_model("gemma-2-2b", override_model_id="not-a-model")
    with pytest.raises(ValueError, match="not a model pack"):
        check_model(str(tmp_path))
    check_model("models/demo-lm")
    check_model("gpt2-small")
    check_model("gemma-2-2b", override_model_id="gemma-2-2b-it")
