"""The types that cross Ray between the ingress and the deployments: plain dataclasses, numpy at most, no torch.

The ingress imports these (it never imports torch); the engine builds on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from . import steer_methods
from .engine.errors import Overloaded, RequestError

# --- steering ---------------------------------------------------------------------------------------------

# The methods' names and properties are defined once, in steer_methods; the names are re-exported for the engine.
METHODS = steer_methods.METHODS
SIMPLE_ADDITIVE = steer_methods.SIMPLE_ADDITIVE
ORTHOGONAL_DECOMP = steer_methods.ORTHOGONAL_DECOMP
PROJECTION_CAP = steer_methods.PROJECTION_CAP


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


# --- the model's answers about itself ---------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What the ingress needs to know about the served model, without holding it."""

    n_layers: int
    n_ctx: int
    d_model: int
    d_vocab: int
    hook_shapes: dict[str, list[int]] = field(default_factory=dict)  # per-position shape of each hook
    lens_layers: Optional[list[int]] = None  # the Jacobian lens's source layers; None: no lens is loaded


# --- features: what ModelDeployment and SAEShard compute for a prompt --------------------------------------


@dataclass
class FeatureActivation:
    """One feature's activations over a prompt (a row of activation/all, or activation/single's answer)."""

    index: int
    values: list[float]
    max_value: float
    max_value_index: int
    sum_values: float
    dfa_values: list[float] | None = None  # attention-output SAEs only

    @property
    def dfa_max_value(self) -> float | None:
        return max(self.dfa_values) if self.dfa_values else None

    def score(self, by_sum: bool) -> float:
        return self.sum_values if by_sum else self.max_value

    def __reduce__(self):
        # Constructor arguments instead of the default's attribute dict: a reply carries hundreds of rows, and this
        # pickles in about half the time and loads in about a third (benchmarks/README.md, "Shard-side merges").
        return (FeatureActivation, (self.index, self.values, self.max_value, self.max_value_index, self.sum_values,
                                    self.dfa_values))


@dataclass
class RankOp:
    """activation/all on one SAE: its top ``num_results`` features by max (or by the sum over the indexes)."""

    num_results: int
    sort_by_token_indexes: list[int] = field(default_factory=list)
    ignore_bos: bool = False  # zero position 0 (the BOS column)
    feature_filter: Optional[list[int]] = None  # rank only these features


@dataclass
class SingleOp:
    """activation/single: one feature's values, with the given positions zeroed and position 0 dropped if asked."""

    index: int
    zero_positions: list[int] = field(default_factory=list)
    drop_first: bool = False


@dataclass
class TopkOp:
    """activation/topk-by-token: the top ``top_k`` features at every position -> (indices, values) per position."""

    top_k: int


@dataclass
class ActiveOp:
    """activation/source: every non-zero activation from ``skip_positions`` on -> {"<feature>": [[pos, value]]}."""

    skip_positions: int = 1


@dataclass
class SimilarityOp:
    """util/similarity-matrix-pred on a temporal SAE: the cosine similarity between positions of its predicted codes
    (``encode_with_predictions``), centred over positions, without position 0 -> float32 ``[seq - 1, seq - 1]``."""


SaeOp = Union[RankOp, SingleOp, TopkOp, ActiveOp, SimilarityOp]


@dataclass
class SaeTask:
    """One operation on one SAE's encoding of a prompt's activations at ``hook``."""

    sae_id: str
    hook: str
    op: SaeOp
    dfa: bool = False  # an attention-output SAE: also attribute through attention (needs hook_v and hook_pattern)


@dataclass
class FeatureJob:
    """One prompt: one forward pass, then its SAE tasks, each on the SAEShard replica holding that SAE.

    ``merge``: activation/all over several SAEs, the tasks' rankings merged into the best ``merge`` rows (score
    descending, ties by task order then feature index). ``project``: activation/single's vector path,
    ``(hook, vector)`` -> ``resid[hook] @ vector`` as a FeatureActivation (no SAE).
    """

    tokens: list[int]
    tasks: list[SaeTask] = field(default_factory=list)
    merge: Optional[int] = None
    project: Optional[tuple[str, list[float]]] = None


@dataclass
class FeatureResult:
    """A FeatureJob's answer: one result per task (in task order), or the merged ranking, or the projection."""

    results: list[Any] = field(default_factory=list)
    merged: Optional[list[tuple[int, FeatureActivation]]] = None  # (task index, row)
    projection: Optional[FeatureActivation] = None


@dataclass
class CaptureRequest:
    """Raw activations at ``hooks`` for one prompt (``ModelDeployment.capture``): ``{hook: float32 array}``."""

    tokens: list[int]
    hooks: list[str]


@dataclass
class AttentionRequest:
    """One head's attention pattern on a prompt (``ModelDeployment.attention``), from ``blocks.<layer>.attn.hook_pattern``;
    answered as an AttentionPattern, so the dense ``[heads, seq, seq]`` capture never leaves the model replica."""

    tokens: list[int]
    layer: int
    head: int


@dataclass
class AttentionPattern:
    """activation/attention's answer: the pattern's kept entries as flat ``q * seq_len + k`` indices and values."""

    seq_len: int
    indices: list[int]
    values: list[float]
    max_activation: float


# --- SAEShard ---------------------------------------------------------------------------------------------


@dataclass
class ShardItem:
    """One prompt's activations at an SAE's hook and what to compute from them (``dfa_inputs``: hook_v, pattern)."""

    sae_id: str
    acts: np.ndarray
    op: SaeOp
    dfa_inputs: Optional[tuple[np.ndarray, np.ndarray]] = None


@dataclass
class ShardBatch:
    """Items of one model batch for the SAEs one SAEShard replica holds: one handle call, one encode per SAE. The
    call is routed by the multiplexed id of one of them (the lead: loaded there if missing); the others are served
    only if that replica holds them (else ``NotHere``, and the caller sends them on their own)."""

    items: list[ShardItem]
    # all of one request's: its encodes may use more threads while no other replica computes (engine.compute), as a
    # lone prompt's capture does
    one_request: bool = False
    # one job's rankings (activation/all over several SAEs) that the replica merges before it replies
    merges: list[MergeGroup] = field(default_factory=list)


@dataclass
class MergeGroup:
    """Items of one FeatureJob with ``merge`` set, all RankOps: the replica answers them with their merged ranking
    (engine.features.merge_pairs) instead of each one's, so that only the rows that can make the job's final
    ``num_results`` cross processes (at 4 SAEs a quarter of them, at 24 a 24th). The top rows of the union of
    partial merges are those of the whole, ties included: the order is total.

    ``items``: their positions in the call; ``sources``: each one's task index in its job (the merge's ties)."""

    items: list[int]
    sources: list[int]
    num_results: int
    by_sum: bool


@dataclass
class MergedRanking:
    """The answer of a merge group's items: the first answered item carries the group's merged ``(task index, row)``
    pairs, each other answered item an empty one. An item that failed keeps its ItemError (or NotHere)."""

    pairs: list[tuple[int, FeatureActivation]] = field(default_factory=list)


@dataclass
class NotHere:
    """In place of an item whose SAE the replica does not hold (it was not the call's lead)."""


@dataclass
class ShardReply:
    results: list[Any]  # per item: its answer, an ItemError, or NotHere
    replica: str  # the replica that answered (the caller groups the SAEs it holds into one call next time)
    direct: Any = None  # its deployments.direct.DirectAddress, where the caller may send its next calls directly


@dataclass
class ItemError:
    """An item's failure, returned in its place so that the other items of its batch still get their answers."""

    message: str
    status: int = 400

    def exception(self) -> RequestError:
        return Overloaded(self.message) if self.status == 503 else RequestError(self.message, self.status)


@dataclass
class VectorsRequest:
    """Decoder rows ``W_dec[indices]`` (steering vectors, cosine queries) -> float32 ``[len, d_in]``."""

    indices: list[int]


@dataclass
class EncoderVectorRequest:
    """``W_enc[:, index]`` after folding (util/sae-vector)."""

    index: int


@dataclass
class CosineRequest:
    """The decoder rows most cosine-similar to ``query`` -> (indices, cosines), best first."""

    query: list[float]
    num_results: int


# --- lens/prompt: logit and Jacobian lens read-outs (ModelDeployment.lens) ----------------------------------

LOGIT_LENS = "LOGIT_LENS"
JACOBIAN_LENS = "JACOBIAN_LENS"
LENS_TYPES = (LOGIT_LENS, JACOBIAN_LENS)


@dataclass
class LensSteerToken:
    """A read-out token to intervene on: its id, and which lens's direction (``W_U[:, id]``, or that pulled back
    through the Jacobian lens at fitted layers)."""

    token_id: int
    type: str = LOGIT_LENS


@dataclass
class LensIntervention:
    """What to write into ``blocks.<l>.hook_resid_post`` of each of ``layers`` before it is read out.

    Precedence: ``swap`` (the steer tokens' direction replaced by the swap token's), else ``ablate`` (the
    direction projected out), else add ``strength * |h|`` along it (the addition capped at ``|h|``). Applied at
    prompt positions except those holding ``skip_tokens`` (BOS), and at generated ones only when ``generated``.
    """

    steer: list[LensSteerToken]
    layers: list[int]
    strength: float = 0.0
    ablate: bool = False
    swap: Optional[LensSteerToken] = None
    generated: bool = False
    skip_tokens: list[int] = field(default_factory=list)


@dataclass
class LensRequest:
    """One lens run: read out ``tokens`` (already templated) at every position from ``reuse_len`` on, then
    generate up to ``max_new_tokens`` (KV-cached; temperature 0 is argmax) and read out each generated token.

    ``layers_by_type``: the layers each type reads, ascending, the last layer included. ``fail_if_busy``: refuse
    (429) instead of taking turns when the replica already runs a lens or a generation.
    """

    tokens: list[int]
    types: list[str]
    layers_by_type: dict[str, list[int]]
    top_n: int
    reuse_len: int = 0
    max_new_tokens: int = 0
    temperature: float = 0.0
    filter_non_word: bool = True
    intervention: Optional[LensIntervention] = None
    fail_if_busy: bool = False


@dataclass
class LensStarted:
    """The first item of a lens stream: the run was accepted. ``stop_tokens``: what ends its generation."""

    stop_tokens: list[int]


@dataclass
class LensReadout:
    """One type's read-out of consecutive positions: the top-n ids ``int [positions, layers, n]`` and their
    probabilities (over the full vocabulary, rounded to 4 places) ``float [positions, layers, n]``."""

    type: str
    top_ids: np.ndarray
    top_probs: np.ndarray


@dataclass
class LensChunk:
    """Consecutive positions ``start..start+len(tokens)-1``, all from the prompt or all generated, with each
    requested type's read-out; ``finished`` ("eos" or "length") on the last chunk of a generating run."""

    start: int
    tokens: list[int]
    generated: bool
    results: list[LensReadout]
    finished: Optional[str] = None
