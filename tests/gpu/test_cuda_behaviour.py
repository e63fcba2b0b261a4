"""What only a GPU can show: batch invariance with prompts of very different lengths, float16 overflow kept to its
own request, an out-of-memory request answered 503 while the next one succeeds, and health checks on a poisoned
CUDA context. Run by ``scripts/gpu_check.sh``; with ``SAESERVE_GPU_TEST_DEVICE=cpu`` the device-independent ones
run on the CPU.

Generation checks (overflow isolation, the generation OOM) hold the engine to the issue's contract: a float16
steering strength that overflows is a 400 for that request alone, an OOM during generation a 503 for its wave.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from deployments.engine import features as F
from deployments.engine.capture import CaptureRequest, ModelRunner
from deployments.engine.errors import Overloaded, RequestError
from deployments.engine.loading import load_model, load_sae
from deployments.specs import resolve_sae_specs
from tests.engine.tolerances import capture_tolerance, check_selection
from tests.gpu.conftest import DTYPES

LENGTHS = {"short": 6, "over-64": 70, "over-1024": 1100}


@pytest.fixture(scope="module")
def long_pack(tmp_path_factory):
    """A small random model with n_ctx 2048, so one batch can hold a prompt of more than 1024 tokens."""
    from scripts.make_random_pack import write_random_pack

    return write_random_pack(tmp_path_factory.mktemp("longpack"), n_layers=2, d_model=64, n_heads=4, n_ctx=2048,
                             d_sae=256, vocab_size=400, seed=5)


def _prompt(vocab: int, bos: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [bos] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_capture_and_ranking_batch_invariance(long_pack, device, dtype):
    """Each prompt's activations and ranking in one padded batch (6, 70 and 1100 tokens) equal its own. Both runs
    are the same model in the same dtype, so their difference is within twice one run's bound against float32."""
    runner = ModelRunner(load_model(str(long_pack), device, dtype), device)
    spec = resolve_sae_specs(str(long_pack), ["res-demo"])[-1]
    sae = load_sae(spec, device, dtype)
    tok = runner.tokenizer
    prompts = {k: _prompt(len(tok), tok.bos_token_id, n, i) for i, (k, n) in enumerate(LENGTHS.items())}
    hooks = [spec.hook_name, "blocks.0.attn.hook_pattern"]
    together = runner.capture([CaptureRequest(p, hooks) for p in prompts.values()])
    for (k, p), batched in zip(prompts.items(), together):
        alone = runner.capture([CaptureRequest(p, hooks)])[0]
        for h in hooks:
            a, b = alone[h], batched[h]
            assert a.shape == b.shape
            scale = 1.0 if h.endswith("pattern") else np.abs(a).max(axis=-1, keepdims=True)
            assert (np.abs(a - b) <= 2 * capture_tolerance(h, dtype, widest=256) * scale).all(), (dtype, k, h)
        fa, fb = F.encode(sae, alone[spec.hook_name]), F.encode(sae, batched[spec.hook_name])
        diff = (fa - fb).abs()
        tol = diff.max().clamp_min(1e-30) * torch.ones(fa.shape[1], device=fa.device)  # what the inputs moved
        ra = F.rank_features(fa, 10, [], True, None)
        rb = F.rank_features(fb, 10, [], True, None)
        scores = fa[1:].max(0).values.clamp_min(0).cpu()
        check_selection([r.index for r in rb], [r.max_value for r in rb], scores, 2 * tol.cpu(), list(range(fa.shape[1])), k)
        if dtype == "float32" and device == "cpu":  # same kernels, same shapes per row: expect the same features
            assert [r.index for r in ra][:3] == [r.index for r in rb][:3]


def _gen_model(long_pack, device, dtype):
    m = load_model(str(long_pack), device, dtype)
    m.eval()
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_generation_rows_alone_and_together(long_pack, device, dtype):
    """Seeded rows of 6, 70 and 1100 prompt tokens give the same tokens alone and in one wave (the engine promises
    this on a GPU with fixed shapes, its default there: every step decodes all slots, each prompt is prefilled alone)."""
    from deployments.engine.generate import GenerationRequest, generate, tokens_of

    m = _gen_model(long_pack, device, dtype)
    reqs = [GenerationRequest(tokens=_prompt(m.cfg.d_vocab, m.tokenizer.bos_token_id, n, 10 + i), max_new_tokens=6,
                              temperature=1.0, seed=3 + i, stop_tokens=[]) for i, n in enumerate(LENGTHS.values())]
    together = generate(m, reqs, capacity=8)
    for r, ev in zip(reqs, together):
        assert tokens_of(generate(m, [r], capacity=8)[0]) == tokens_of(ev)


async def _collect(sub):
    toks = []
    async for events in sub:
        toks += [e.token for e in events if e.token is not None]
    return toks


def test_float16_overflow_is_that_requests_400(long_pack, device):
    """A steering strength past float16's range (65504) must fail its own request with a 400 and leave the
    request beside it in the same wave untouched."""
    from deployments.engine.generate import GenerationRequest, GenerationScheduler
    from deployments.protocol import SteerVector

    m = _gen_model(long_pack, device, "float16")
    hook = "blocks.0.hook_resid_post"
    vec = (np.random.RandomState(0).randn(m.cfg.d_model)).astype(np.float32)
    bos = m.tokenizer.bos_token_id
    ok = GenerationRequest(tokens=_prompt(m.cfg.d_vocab, bos, 8, 1), max_new_tokens=5, temperature=1.0, seed=1,
                           stop_tokens=[], steering=[SteerVector(hook, vec, 2.0)])
    huge = GenerationRequest(tokens=_prompt(m.cfg.d_vocab, bos, 8, 2), max_new_tokens=5, temperature=1.0, seed=2,
                             stop_tokens=[], steering=[SteerVector(hook, vec, 1e5)])

    async def run(rows):
        sched = GenerationScheduler(m, max_rows=4)
        subs = [sched.submit([r]) for r in rows]
        return await asyncio.gather(*(_collect(s) for s in subs), return_exceptions=True)

    (alone,) = asyncio.run(run([ok]))
    assert not isinstance(alone, BaseException), alone
    bad, good = asyncio.run(run([huge, ok]))
    assert isinstance(bad, RequestError) and bad.status == 400, bad
    assert good == alone


def _cap_memory(device: str, headroom_bytes: int) -> float:
    """Cap this process's CUDA memory at what it holds now plus ``headroom_bytes``; returns the fraction set."""
    d = torch.device(device)
    total = torch.cuda.get_device_properties(d).total_memory
    torch.cuda.empty_cache()
    frac = min(1.0, (torch.cuda.memory_reserved(d) + headroom_bytes) / total)
    torch.cuda.set_per_process_memory_fraction(frac, d)
    return frac


def test_oom_is_a_503_for_that_request(pack_dir, cuda_only):
    """Under a memory cap, an encode too large to fit raises CUDA's OOM; the ingress maps it to Overloaded (503,
    Retry-After) for that request, and the next, small request is answered."""
    from deployments.engine.errors import translate_remote_error

    async def call(coro):  # what a caller of the replica sees: the app's one translation of what it raised
        try:
            return await coro
        except Exception as e:
            raise translate_remote_error(e) from e

    spec = resolve_sae_specs(str(pack_dir), ["res-demo"])[-1]
    sae = load_sae(spec, cuda_only, "float32")
    small = np.random.default_rng(0).standard_normal((16, spec.d_in)).astype(np.float32)
    want = F.encode(sae, small).cpu()
    big = np.random.default_rng(1).standard_normal((200_000, spec.d_in)).astype(np.float32)  # 0.8 GB of features
    try:
        _cap_memory(cuda_only, 256 << 20)

        async def encode(acts):
            return F.encode(sae, acts)

        with pytest.raises(Overloaded) as e:
            asyncio.run(call(encode(big)))
        assert e.value.status == 503
        torch.cuda.empty_cache()
        got = asyncio.run(call(encode(small)))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(cuda_only))


def test_generation_oom_is_a_503_and_the_next_wave_runs(long_pack, cuda_only):
    from deployments.engine.generate import GenerationRequest, GenerationScheduler

    m = _gen_model(long_pack, cuda_only, "float32")
    bos = m.tokenizer.bos_token_id
    small = GenerationRequest(tokens=_prompt(m.cfg.d_vocab, bos, 8, 1), max_new_tokens=3, seed=1, stop_tokens=[])
    big = GenerationRequest(tokens=_prompt(m.cfg.d_vocab, bos, 2000, 2), max_new_tokens=3, seed=2, stop_tokens=[])
    sched = GenerationScheduler(m, max_rows=16)

    async def one(r):
        return await _collect(sched.submit([r]))

    async def scenario():
        # 16 rows of 2000 tokens: the prefill's [heads, 2000, 2000] attention scores alone overflow the cap
        first = await asyncio.gather(*(one(big) for _ in range(16)), return_exceptions=True)
        return first, await one(small)

    try:
        _cap_memory(cuda_only, 64 << 20)
        first, after = asyncio.run(scenario())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(cuda_only))
    assert all(isinstance(r, Overloaded) and r.status == 503 for r in first), first
    assert len(after) == 3


POISON = textwrap.dedent("""
    import sys, time, torch
    from deployments.engine.devices import check_device
    check_device("cuda")                         # healthy first
    x = torch.zeros(4, device="cuda")
    try:
        x[torch.tensor([10], device="cuda")] = 1.0   # out of bounds: a device-side assert
        torch.cuda.synchronize()
    except RuntimeError:
        pass
    time.sleep(0.5)
    try:
        check_device("cuda")
    except RuntimeError as e:
        print("UNHEALTHY", str(e).splitlines()[0])
        sys.exit(0)
    print("HEALTHY")
    sys.exit(1)
""")


def test_health_check_fails_on_a_poisoned_context(cuda_only):
    """A device-side assert poisons the CUDA context for good: the replicas' health check must say so (in a
    subprocess, since the context cannot recover)."""
    import os

    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "0"}
    r = subprocess.run([sys.executable, "-c", POISON], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "UNHEALTHY" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_health_check_and_sae_budget_on_the_device(device):
    from deployments.engine.devices import check_device, same_device, sae_budget_bytes

    check_device(device)  # a healthy device passes
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        assert sae_budget_bytes("cuda", 0.125) == int(total * 0.125 * 0.8)
        assert same_device(torch.zeros(1, device="cuda").device, "cuda")
    else:
        assert sae_budget_bytes(device, 0.125) is None
