"""Loading models and SAEs: local packs, local SAE Lens directories, dtypes, devices.

The SAE list is resolved from configuration alone (``cfg.json``), without loading weights, so the ingress
knows every SAE's hook and width before any shard loads one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import pack
from .errors import RequestError

log = logging.getLogger("saeserve.loading")

REPO_ROOT = Path(__file__).resolve().parents[2]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def local_path(p: str | Path) -> Path | None:
    """An existing local path: as given, or relative to the repository root (so the bundled pack is found from anywhere)."""
    path = Path(p).expanduser()
    if path.exists():
        return path.resolve()
    if not path.is_absolute() and (REPO_ROOT / path).exists():
        return (REPO_ROOT / path).resolve()
    return None


@dataclass(frozen=True)
class SAESpec:
    """Where an SAE comes from and what it reads, known before its weights are loaded."""

    id: str  # as served, e.g. "5-res-jb"
    set_name: str  # e.g. "res-jb"
    hook_name: str
    d_in: int
    d_sae: int
    architecture: str = "standard"
    path: str | None = None  # local SAE Lens directory
    release: str | None = None  # SAE Lens pretrained release
    release_sae_id: str | None = None

    @property
    def layer(self) -> int:
        head = self.id.split("-", 1)[0]
        if head.isdigit():
            return int(head)
        m = re.search(r"blocks\.(\d+)\.", self.hook_name)
        return int(m.group(1)) if m else 0

    def to_dict(self) -> dict:
        return asdict(self)


def sae_spec_from_dir(sae_id: str, set_name: str, path: str | Path) -> SAESpec:
    cfg = json.loads((Path(path) / "cfg.json").read_text())
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    if not hook:
        raise ValueError(f"{path}/cfg.json names no hook (metadata.hook_name)")
    return SAESpec(id=sae_id, set_name=set_name, hook_name=hook, d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                   architecture=cfg.get("architecture", "standard"), path=str(Path(path).resolve()))


def resolve_sae_specs(
    model: str,
    sae_sets: list[str],
    sae_dirs: list[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[SAESpec]:
    """Every SAE the service will serve, in set order then layer order, filtered by include/exclude regexes."""
    specs: list[SAESpec] = []
    pack_dir = local_path(model)
    for set_name in sae_sets:
        dirs = pack.local_sae_set_dirs(pack_dir, set_name) if pack_dir else {}
        if not dirs:
            known = pack.local_sae_sets(pack_dir) if pack_dir else []
            raise ValueError(f"SAE set {set_name!r} not found for model {model!r}" + (f"; the pack has {known}" if pack_dir else ""))
        specs += [sae_spec_from_dir(sae_id, set_name, d) for sae_id, d in dirs.items()]
    for d in sae_dirs or []:
        p = local_path(d)
        if p is None or not (p / "cfg.json").is_file():
            raise ValueError(f"SAE directory {d!r} not found (expected cfg.json + sae_weights.safetensors)")
        set_name = p.parent.name
        specs.append(sae_spec_from_dir(f"{p.name}-{set_name}", set_name, p))
    inc = [re.compile(r) for r in include or []]
    exc = [re.compile(r) for r in exclude or []]
    specs = [s for s in specs if (not inc or any(r.search(s.id) for r in inc)) and not any(r.search(s.id) for r in exc)]
    seen: set[str] = set()
    for s in specs:
        if s.id in seen:
            raise ValueError(f"Two SAEs are served as {s.id!r}")
        seen.add(s.id)
    return specs


def load_model(model: str, device: str = "cpu", dtype: str = "float32", override_model_id: str | None = None):
    """A HookedTransformer without weight processing: a local pack, or a TransformerLens model name."""
    t0 = time.monotonic()
    device = resolve_device(device)
    path = local_path(model)
    log.info("loading model %s on %s (%s)", model, device, dtype)
    if path is not None:
        m = pack.load_model_dir(path, device=device, dtype=parse_dtype(dtype))
    else:
        from transformer_lens import HookedTransformer

        name = override_model_id or model
        m = HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=parse_dtype(dtype))
    log.info("model %s loaded in %.1fs", model, time.monotonic() - t0)
    return m


def load_sae(spec: SAESpec, device: str = "cpu", dtype: str = "float32"):
    """The SAE Lens SAE for a spec, decoder norms folded into the encoder where the architecture allows."""
    from sae_lens import SAE

    t0 = time.monotonic()
    device = resolve_device(device)
    if spec.path:
        sae = SAE.load_from_disk(spec.path, device=device, dtype=dtype)
    elif spec.release:
        sae = SAE.from_pretrained(spec.release, spec.release_sae_id, device=device, dtype=dtype)
    else:
        raise RequestError(f"SAE {spec.id} has no source to load from", 500)
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError:
        log.info("SAE %s (%s) keeps its decoder norms: folding is not defined for it", spec.id, spec.architecture)
    sae.eval()
    log.info("SAE %s loaded in %.2fs (%s, d_sae=%d)", spec.id, time.monotonic() - t0, spec.architecture, spec.d_sae)
    return sae


def sae_nbytes(sae) -> int:
    return sum(p.numel() * p.element_size() for p in sae.parameters())
