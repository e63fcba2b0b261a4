"""CUDA parity: the model and SAEs on the GPU, float32 and bfloat16, answer what the CPU float32 path answers
(within each dtype's tolerance). Run by ``scripts/gpu_check.sh``; skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]

PROMPTS = ["the cat sat on the mat", "one two three four five six seven", "hello world, big city river park house."]
# (rtol, atol) against CPU float32, relative to the tensor's scale for bfloat16 (8 mantissa bits, 1-2 layers deep)
TOL = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 5e-2)}


@pytest.fixture(scope="module")
def specs(pack_dir):
    from deployments.specs import resolve_sae_specs

    return resolve_sae_specs(str(pack_dir), ["res-demo"], [], [], [])


@pytest.fixture(scope="module")
def cpu(pack_dir):
    from deployments.engine.capture import ModelRunner
    from deployments.engine.loading import load_model

    return ModelRunner(load_model(str(pack_dir), "cpu", "float32"), "cpu")


def _runner(pack_dir, dtype):
    from deployments.engine.capture import ModelRunner
    from deployments.engine.loading import load_model

    return ModelRunner(load_model(str(pack_dir), "cuda", dtype), "cuda")


def _scaled_close(got, want, dtype):
    rtol, atol = TOL[dtype]
    got, want = torch.as_tensor(got).float().cpu(), torch.as_tensor(want).float().cpu()
    scale = max(float(want.abs().max()), 1.0)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_capture_matches_cpu(pack_dir, cpu, specs, dtype):
    from deployments.engine.capture import CaptureRequest
    from deployments.engine.tokens import feature_tokens

    gpu = _runner(pack_dir, dtype)
    assert next(gpu.model.parameters()).is_cuda
    hooks = [s.hook_name for s in specs]
    reqs = [CaptureRequest(feature_tokens(cpu.tokenizer, p), hooks) for p in PROMPTS]
    want = cpu.capture(reqs)
    got = gpu.capture(reqs)  # one padded batch on the GPU
    for w, g in zip(want, got):
        for h in hooks:
            assert g[h].shape == w[h].shape and g[h].dtype == w[h].dtype
            _scaled_close(g[h], w[h], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encode_and_rank_match_cpu(cpu, specs, dtype):
    from deployments.engine import features as F
    from deployments.engine.capture import CaptureRequest
    from deployments.engine.loading import load_sae
    from deployments.engine.tokens import feature_tokens

    for spec in specs:
        sae_cpu = load_sae(spec, "cpu", "float32")
        sae_gpu = load_sae(spec, "cuda", dtype)
        assert sae_gpu.W_enc.is_cuda
        for p in PROMPTS:
            acts = cpu.capture([CaptureRequest(feature_tokens(cpu.tokenizer, p), [spec.hook_name])])[0][spec.hook_name]
            want = F.encode(sae_cpu, acts)
            got = F.encode(sae_gpu, acts)
            assert got.is_cuda and got.dtype == torch.float32
            _scaled_close(got, want, dtype)
            rw = F.rank_features(want, 10, [], True, None)
            rg = F.rank_features(got, 10, [], True, None)  # on the GPU, as the shard runs it
            if dtype == "float32":
                assert [r.index for r in rg] == [r.index for r in rw]
            else:  # near-ties may swap in bf16: the top values agree, and most of the top features do
                assert len({r.index for r in rg} & {r.index for r in rw}) >= 7
            _scaled_close([r.max_value for r in rg], [r.max_value for r in rw], dtype)
            gi, gv = F.topk_by_token(got, 5)
            wi, wv = F.topk_by_token(want, 5)
            _scaled_close(gv, wv, dtype)
            if dtype == "float32":
                assert gi == wi


def test_steering_hook_on_cuda(pack_dir, specs):
    """A decoder row added at the SAE's hook moves the GPU model's next-token logits the way it moves the CPU's."""
    from deployments.engine.loading import load_model, load_sae

    spec = specs[-1]
    vec = load_sae(spec, "cpu", "float32").W_dec[3].detach()
    out = {}
    for dev in ("cpu", "cuda"):
        m = load_model(str(pack_dir), dev, "float32")
        toks = m.to_tokens(PROMPTS[0]).to(dev)
        v = (vec * 8).to(dev)
        with torch.no_grad(), m.hooks(fwd_hooks=[(spec.hook_name, lambda a, hook: a + v)]):
            steered = m(toks)[0, -1]
        with torch.no_grad():
            plain = m(toks)[0, -1]
        out[dev] = (steered - plain).float().cpu()
    _scaled_close(out["cuda"], out["cpu"], "float32")
