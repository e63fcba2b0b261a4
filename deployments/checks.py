"""Input rules shared by the ingress (which checks before any call) and the engine (which checks again, so a
handle caller that skips the ingress gets the same 400). Torch-free."""

from __future__ import annotations

from .engine.errors import RequestError


def check_index(index: int, d_sae: int, source: str) -> None:
    if not 0 <= index < d_sae:
        raise RequestError(f"Feature index {index} is out of range for {source}: it has {d_sae} features (0..{d_sae - 1})")


def check_sort_indexes(sort_by_token_indexes: list[int], n_tokens: int) -> None:
    bad = [i for i in sort_by_token_indexes if not 0 <= i < n_tokens]
    if bad:
        raise RequestError(
            f"sort_by_token_indexes {bad} out of range: the prompt has {n_tokens} tokens (indexes 0..{n_tokens - 1})"
        )
