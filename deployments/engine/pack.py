"""The on-disk model pack format (``models/<id>/``), readable with plain library calls.

Layout::

    <pack>/model/config.json          HookedTransformerConfig(**json) rebuilds the config
    <pack>/model/model.safetensors    the HookedTransformer state dict
    <pack>/model/tokenizer*.json      PreTrainedTokenizerFast.save_pretrained output
    <pack>/saes/<set>/<layer>/        SAE Lens format (cfg.json + sae_weights.safetensors)

The SAE in ``saes/<set>/<layer>/`` is served as ``"<layer>-<set>"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
SAES_SUBDIR = "saes"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_dir(out_dir: str | Path, cfg_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], tokenizer) -> Path:
    """Write a model directory: config kwargs, weights, tokenizer."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg_kwargs, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out / WEIGHTS_FILE))
    tokenizer.save_pretrained(str(out))
    return out


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def model_dir_of(path: str | Path) -> Path:
    """Accept either a pack root or its ``model/`` folder."""
    p = Path(path)
    if is_model_dir(p / MODEL_SUBDIR):
        return p / MODEL_SUBDIR
    return p


def model_name(path: str | Path) -> str | None:
    """The pack's ``model_name`` from its config (the id clients send), if it has one."""
    cfg = model_dir_of(path) / CONFIG_FILE
    return json.loads(cfg.read_text()).get("model_name") if cfg.is_file() else None


def load_tokenizer(model_dir: str | Path):
    """The pack's tokenizer, set up the way TransformerLens needs it offline.

    TransformerLens 3.x asks the hub for a tokenizer unless it gets one with a ``name_or_path``
    and BOS handling it recognises, so we hand it a fully built one.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    tok.name_or_path = str(model_dir)
    return tok


def load_model_dir(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a pack's HookedTransformer (no weight processing, like ``from_pretrained_no_processing``); float32 unless
    ``dtype`` says otherwise."""
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    mdir = model_dir_of(path)
    if not is_model_dir(mdir):
        raise FileNotFoundError(f"{path} is not a model pack: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it or in its model/ folder")
    kwargs = json.loads((mdir / CONFIG_FILE).read_text())
    dtype = torch.float32 if dtype is None else dtype
    kwargs = {**kwargs, "device": device, "dtype": dtype}
    cfg = HookedTransformerConfig(**kwargs)
    tokenizer = load_tokenizer(mdir)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = load_file(str(mdir / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.to(dtype)
    model.eval()
    return model


def local_sae_set_dirs(pack_dir: str | Path, set_name: str) -> dict[str, Path]:
    """``{"<layer>-<set>": dir}`` for every SAE of a set in a pack, ordered by layer."""
    root = Path(pack_dir) / SAES_SUBDIR / set_name
    if not root.is_dir():
        return {}
    dirs = [d for d in root.iterdir() if (d / "cfg.json").is_file()]
    dirs.sort(key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))
    return {f"{d.name}-{set_name}": d for d in dirs}


def local_sae_sets(pack_dir: str | Path) -> list[str]:
    root = Path(pack_dir) / SAES_SUBDIR
    return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
