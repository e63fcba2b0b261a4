"""The device the GPU tests run on: ``cuda`` (every test here skips where torch sees no CUDA device), or the CPU
with ``SAESERVE_GPU_TEST_DEVICE=cpu`` (``scripts/gpu_check.sh --dry-run``): the same code paths and comparisons,
with the CUDA-only checks (memory caps, a poisoned context) skipping themselves."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("SAESERVE_GPU_TEST_DEVICE", "cuda")
DTYPES = ["float32", "bfloat16", "float16"]


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh; SAESERVE_GPU_TEST_DEVICE=cpu runs "
                                   "these on the CPU)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if DEVICE.startswith("cuda") and not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture
def cuda_only(device):
    if not device.startswith("cuda"):
        pytest.skip("CUDA only")
    return device
