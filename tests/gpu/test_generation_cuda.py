"""Generation on a CUDA device: the engine's numbers against the CPU's, the fixed-shapes default, the seeded-request
promise under load, bfloat16/float16, and failure isolation. Skipped where torch sees no CUDA device; run with
``scripts/gpu_check.sh`` (pytest tests/gpu) on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.engine import steering as St
from deployments.protocol import METHODS
from deployments.engine.generate import GenerationEngine, GenerationRequest, generate, tokens_of
from deployments.engine.pack import load_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from scripts.make_random_pack import write_random_pack

    return write_random_pack(tmp_path_factory.mktemp("cudapack"), n_layers=2, d_model=32, n_heads=4, n_ctx=96, d_sae=64,
                             vocab_size=300, seed=3)


def requests(model, n=6):
    vec = (np.random.RandomState(0).randn(model.cfg.d_model) * 3).astype(np.float32)
    g = torch.Generator().manual_seed(0)
    return [GenerationRequest(tokens=[model.tokenizer.bos_token_id] + torch.randint(3, 300, (3 + 4 * i,), generator=g).tolist(),
                              max_new_tokens=10, temperature=0.9 * (i % 2), freq_penalty=0.4 * (i % 3), seed=i, n_logprobs=3,
                              stop_tokens=[], steering=[St.SteerVector(HOOK, vec, 2.0, METHODS[i % 3])] if i % 2 == 0 else [])
            for i in range(n)]


def test_cuda_matches_cpu_and_defaults_to_fixed_shapes(pack):
    cpu = load_model_dir(pack)
    gpu = load_model_dir(pack, device="cuda")
    assert GenerationEngine(gpu, capacity=8).fixed
    reqs = [r for r in requests(cpu) if r.temperature == 0]
    for r, a, b in zip(reqs, generate(cpu, reqs, capacity=8), generate(gpu, reqs, capacity=8)):
        # float32 on both; a different device's kernels reassociate sums (~1e-6 relative)
        assert np.allclose([e.logprob for e in a][:3], [e.logprob for e in b][:3], atol=1e-4)


def test_cuda_seeded_request_is_reproducible_under_load_with_fixed_shapes(pack):
    gpu = load_model_dir(pack, device="cuda")
    reqs = requests(gpu)
    target = GenerationRequest(**{**reqs[1].__dict__, "seed": 77})
    alone = generate(gpu, [target], capacity=8)[0]
    loaded = generate(gpu, [*reqs, target], capacity=8)[-1]
    assert tokens_of(alone) == tokens_of(loaded) and [e.logprob for e in alone] == [e.logprob for e in loaded]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_runs_and_isolates_overflow(pack, dtype):
    gpu = load_model_dir(pack, device="cuda", dtype=dtype)
    reqs = requests(gpu, 3)
    unit = np.eye(gpu.cfg.d_model, dtype=np.float32)[0]
    hostile = GenerationRequest(tokens=reqs[0].tokens, max_new_tokens=5, stop_tokens=[],
                                steering=[St.SteerVector(HOOK, unit, 1e5 if dtype == torch.float16 else 3e38, St.ORTHOGONAL_DECOMP)])
    eng = GenerationEngine(gpu, capacity=8)
    ids = eng.add([hostile, *reqs])
    failed, events = {}, []
    while not eng.idle:
        res = eng.step()
        failed.update(res.failed)
        events += res.events
    assert set(failed) == {ids[0]} and failed[ids[0]].status == 400
    assert all(np.isfinite(e.logprob) for e in events if e.logprob is not None)
