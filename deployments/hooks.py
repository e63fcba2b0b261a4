"""TransformerLens hook naming: which block a hook lives in, how deep a forward pass must run for a set of hooks,
and which hooks an attention-output SAE's attribution needs. Torch-free (the ingress uses it)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """The block index a hook lives in; None for hooks outside the blocks (embed, ln_final)."""
    m = _LAYER_RE.match(hook_name)
    return int(m.group(1)) if m else None


def stop_layer_for(hooks: Iterable[str], n_layers: int) -> int | None:
    """``stop_at_layer`` that still runs every hook in ``hooks`` (None = the whole model)."""
    stop = 0
    for h in hooks:
        layer = hook_layer(h)
        if layer is None:
            if h.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
                continue
            return None  # ln_final / unembed: run everything
        stop = max(stop, layer + 1)
    return None if stop >= n_layers else stop


def is_attention_map(hook: str) -> bool:
    """Hooks shaped [head, query, key] per prompt rather than [pos, ...]."""
    return hook.endswith(("hook_pattern", "hook_attn_scores"))


def is_attention_output_hook(hook_name: str) -> bool:
    return hook_name.endswith("attn.hook_z")


def dfa_hooks(hook_name: str) -> tuple[str, str]:
    """The hooks DFA needs beside ``blocks.L.attn.hook_z``: values and attention pattern of that layer."""
    prefix = hook_name[: -len("hook_z")]
    return prefix + "hook_v", prefix + "hook_pattern"


def capture_hooks(sae_hooks: Iterable[tuple[str, bool]]) -> list[str]:
    """Hooks to capture for ``(hook, dfa)`` pairs: each hook, plus values and pattern where DFA is wanted."""
    out: list[str] = []
    for hook, dfa in sae_hooks:
        out.append(hook)
        if dfa:
            out.extend(dfa_hooks(hook))
    return list(dict.fromkeys(out))
