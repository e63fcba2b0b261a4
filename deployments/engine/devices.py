"""Which device a replica computes on, and whether that device still works (the replicas' health checks)."""

from __future__ import annotations

import torch


def torch_device(device: str | torch.device) -> torch.device:
    """``device`` with its index filled in: ``"cuda"`` is the current CUDA device (the one Ray made visible as
    device 0), so ``"cuda"`` and ``"cuda:0"`` compare equal there."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    da, db = torch.device(a), torch.device(b)
    if da.type != db.type:
        return False
    if da.type != "cuda":
        return da.index == db.index or None in (da.index, db.index)
    return torch_device(da) == torch_device(db)


_probe_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def check_device(device: str) -> None:
    """Raises unless ``device`` can still run work. On CUDA: a tiny kernel on that device (not device 0), on a
    stream of its own, read back on that stream. A poisoned context (a device-side assert, an illegal
    access) is sticky, so it raises here as a RuntimeError; the side stream keeps the check from waiting for
    the compute thread's queued kernels (a whole forward pass), as a device-wide synchronize would. Nothing to
    check on the CPU."""
    d = torch.device(device)
    if d.type != "cuda":
        return
    d = torch_device(d)
    stream = _probe_streams.get(d)
    if stream is None:
        stream = _probe_streams[d] = torch.cuda.Stream(device=d)
    with torch.cuda.stream(stream):
        probe = torch.ones(1, device=d)
        probe.add_(1)
        value = float(probe.item())  # copies and waits on this stream only (PyTorch's streams are non-blocking)
    if value != 2.0:
        raise RuntimeError(f"{d} computed 1 + 1 = {value}")


# What of a replica's share of a card its SAEs may take; the rest is for encodes' activations (a [tokens, d_sae]
# float32 tensor per batch), the CUDA context and the caching allocator's slack.
SAE_SHARE_OF_GPU_SHARE = 0.8


def sae_budget_bytes(device: str, gpu_share: float | None) -> int | None:
    """The default ``max_sae_bytes`` of an SAE replica: on a GPU, ``SAE_SHARE_OF_GPU_SHARE`` of its share of the
    card's memory (Ray's fraction of the card is an accounting unit, and this makes it a memory one too);
    None (no cap) on the CPU or when the share is unknown."""
    d = torch.device(device)
    if d.type != "cuda" or not gpu_share:
        return None
    total = torch.cuda.get_device_properties(torch_device(d)).total_memory
    return int(total * min(gpu_share, 1.0) * SAE_SHARE_OF_GPU_SHARE)


def release_cached_memory(device: str) -> None:
    """After an out-of-memory error: give the caching allocator's free blocks back, so the next batch (smaller, or
    someone else's) gets the whole card rather than the fragments the failed one left."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
