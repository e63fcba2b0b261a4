"""The types that cross Ray between the ingress and the deployments: plain dataclasses, numpy at most, no torch.

The ingress imports these (it never imports torch); the engine builds on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .engine.errors import RequestError

# --- steering ---------------------------------------------------------------------------------------------

SIMPLE_ADDITIVE = "SIMPLE_ADDITIVE"
ORTHOGONAL_DECOMP = "ORTHOGONAL_DECOMP"
PROJECTION_CAP = "PROJECTION_CAP"
METHODS = (SIMPLE_ADDITIVE, ORTHOGONAL_DECOMP, PROJECTION_CAP)


@dataclass
class SteerVector:
    """One vector to apply at one hook, already scaled: ``coeff = strength * strength_multiplier``."""

    hook: str
    vector: np.ndarray  # float32 [d]
    coeff: float
    method: str = SIMPLE_ADDITIVE


# --- generation -------------------------------------------------------------------------------------------

MAX_LOGPROBS = 10


@dataclass
class GenerationRequest:
    """One row: a prompt (already templated, BOS included) and how to continue it."""

    tokens: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    freq_penalty: float = 0.0
    seed: int = 0
    n_logprobs: int = 0
    steering: list[SteerVector] = field(default_factory=list)  # empty: DEFAULT
    no_steer_tokens: Optional[list[int]] = None  # positions holding these token ids are not steered
    stop_tokens: Optional[list[int]] = None  # None: the tokenizer's EOS


@dataclass
class StepEvent:
    """What one row did in one step: a token (``None`` when it stopped at EOS), its scores, and whether it is done."""

    row: int
    token: Optional[int]
    logprob: Optional[float] = None
    top_tokens: Optional[list[int]] = None
    top_logprobs: Optional[list[float]] = None
    finished: Optional[str] = None  # "eos", "length" or "cancelled" on the row's last event


def torch_seed(seed) -> int:
    """A request's seed as a torch seed (any integer; floats must be whole)."""
    if isinstance(seed, float):
        if not math.isfinite(seed) or not seed.is_integer():
            raise RequestError(f"seed must be a whole number, got {seed}")
        seed = int(seed)
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF
