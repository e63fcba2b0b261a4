"""The wire format: request/response models, field for field as ``neuronpedia-inference-client`` 1.10.1.

One module, one error shape (``ErrorResponse``). Field names and JSON types follow the client's generated
models; behaviour is documented in the README and CONTRACT.
"""

from __future__ import annotations

import re
from array import array
from enum import Enum
from typing import Annotated, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic import StrictStr as _StrictStr
from pydantic_core import PydanticCustomError

from deployments import steer_methods

# Error types the ingress answers with 400 rather than FastAPI's 422 (ingress.errors): the JSON is well-formed and of
# the right type, but the value cannot be used.
INVALID_UNICODE = "invalid_unicode"

_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(s: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); Python decodes it to a code point that is not a
    character, which no tokenizer, encoder or reply can take. Refused here, for every text field."""
    m = _SURROGATE.search(s)
    if m is not None:
        raise PydanticCustomError(
            INVALID_UNICODE, "text is not valid Unicode: a lone UTF-16 surrogate (U+{code}) at character {at}; send "
            "characters outside the Basic Multilingual Plane as a surrogate pair or as UTF-8",
            {"code": f"{ord(m.group()):04X}", "at": m.start()})
    return s


_INT_FLOAT_BOUND = 2 ** 1023  # every int of smaller magnitude converts to a finite float


def _in_float_range(v):
    """A JSON integer too large for a float (``1`` followed by 400 zeros) is no number a tensor can hold."""
    if type(v) is int and not -_INT_FLOAT_BOUND < v < _INT_FLOAT_BOUND:
        try:
            float(v)
        except OverflowError:
            raise PydanticCustomError("float_range", "number is beyond the range of a float (about 1.8e308)") from None
    return v


def _floats_in_range(v: list) -> list:
    try:
        array("d", v)  # every entry as a C double, at C speed: OverflowError for an integer no float holds
    except OverflowError:
        for i, x in enumerate(v):
            try:
                _in_float_range(x)
            except PydanticCustomError:
                raise PydanticCustomError("float_range", "entry {index} is beyond the range of a float (about 1.8e308)",
                                          {"index": i}) from None
    return v


# Text: a JSON string that is valid Unicode. Number: a JSON number a float can hold (non-finite values, which
# Python's JSON parser reads from NaN / Infinity / 1e400, are refused by the handlers with a message naming the field).
StrictStr = Annotated[_StrictStr, AfterValidator(_valid_unicode)]
Number = Annotated[Union[StrictFloat, StrictInt], AfterValidator(_in_float_range)]
Vector = Annotated[list[Union[StrictFloat, StrictInt]], Field(fail_fast=True), AfterValidator(_floats_in_range)]


class _FailFastList:
    """``Items[X]``: a request's list of X, validated fail-fast (a million bad entries make one error, not a million
    error objects: building those took 16 s of the ingress's event loop for a 4 MB body)."""

    def __class_getitem__(cls, item):
        return Annotated[list[item], Field(fail_fast=True)]


Items = _FailFastList


class Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class ErrorResponse(Wire):
    error: str


# --- health, tokenize --------------------------------------------------------------------------------


class HealthResponse(Wire):
    status: str


class TokenizeRequest(Wire):
    model: StrictStr
    text: StrictStr
    prepend_bos: Optional[StrictBool] = None


class TokenizeResponse(Wire):
    tokens: list[StrictInt]
    token_strings: list[StrictStr]
    prepend_bos: StrictBool


# --- activation/single --------------------------------------------------------------------------------


class ActivationSingleRequest(Wire):
    prompt: StrictStr
    model: StrictStr
    source: Optional[StrictStr] = None
    index: Optional[StrictStr] = None
    vector: Optional[Vector] = None
    hook: Optional[StrictStr] = None


class ActivationSingleBatchRequest(Wire):
    prompts: Items[StrictStr]
    model: StrictStr
    source: Optional[StrictStr] = None
    index: Optional[StrictStr] = None
    vector: Optional[Vector] = None
    hook: Optional[StrictStr] = None


class ActivationValues(Wire):
    values: list[float]
    max_value: float
    max_value_index: int
    dfa_values: Optional[list[float]] = None
    dfa_max_value: Optional[float] = None
    dfa_target_index: Optional[int] = None


class ActivationSingleResponse(Wire):
    activation: ActivationValues
    tokens: list[str]
    tokens_is_special: list[bool]


class ActivationSingleBatchResponse(Wire):
    results: list[ActivationSingleResponse]


# --- activation/all -----------------------------------------------------------------------------------


class ActivationAllRequest(Wire):
    prompt: StrictStr
    model: StrictStr
    source_set: StrictStr
    selected_sources: Items[StrictStr]
    sort_by_token_indexes: Items[StrictInt]
    ignore_bos: StrictBool
    num_results: Optional[StrictInt] = 25
    feature_filter: Optional[Items[StrictInt]] = Field(
        default=None, description="Only rank these features (needs exactly one selected source)."
    )


class ActivationAllBatchRequest(Wire):
    prompts: Items[StrictStr]
    model: StrictStr
    source_set: StrictStr
    selected_sources: Items[StrictStr]
    sort_by_token_indexes: Items[StrictInt]
    ignore_bos: StrictBool
    num_results: Optional[StrictInt] = 25
    feature_filter: Optional[Items[StrictInt]] = None


class ActivationAllFeature(Wire):
    source: str
    index: int
    values: list[float]
    sum_values: Optional[float] = None
    max_value: float
    max_value_index: int
    dfa_values: Optional[list[float]] = None
    dfa_target_index: Optional[int] = None
    dfa_max_value: Optional[float] = None


class ActivationAllResponse(Wire):
    activations: list[ActivationAllFeature]
    tokens: list[str]
    counts: Optional[list[list[float]]] = None


class ActivationAllBatchResponse(Wire):
    results: list[ActivationAllResponse]


# --- activation/topk-by-token -------------------------------------------------------------------------


class ActivationTopkByTokenRequest(Wire):
    prompt: StrictStr
    model: StrictStr
    source: StrictStr
    top_k: Optional[StrictInt] = None
    ignore_bos: StrictBool


class ActivationTopkByTokenBatchRequest(Wire):
    prompts: Items[StrictStr]
    model: StrictStr
    source: StrictStr
    top_k: Optional[StrictInt] = None
    ignore_bos: StrictBool


class TopkFeature(Wire):
    feature_index: int
    activation_value: float


class TopkTokenResult(Wire):
    token_position: int
    token: str
    is_special: bool
    top_features: list[TopkFeature]


class ActivationTopkByTokenResponse(Wire):
    results: list[TopkTokenResult]
    tokens: list[str]


class ActivationTopkByTokenBatchResponse(Wire):
    results: list[ActivationTopkByTokenResponse]


# --- activation/source --------------------------------------------------------------------------------


class ActivationSourceRequest(Wire):
    prompts: Items[StrictStr]
    model: StrictStr
    source: StrictStr


class ActivationSourceResult(Wire):
    tokens: list[str]
    active_features: Optional[dict[str, list[Annotated[list[Union[StrictInt, float]], Field(min_length=2, max_length=2)]]]] = Field(
        default=None, alias="activeFeatures"
    )


class ActivationSourceResponse(Wire):
    results: list[ActivationSourceResult]


# --- shared feature reference -------------------------------------------------------------------------


class NPFeature(Wire):
    model: StrictStr
    source: StrictStr
    index: StrictInt


# --- util: decoder geometry ---------------------------------------------------------------------------


class UtilSaeTopkByDecoderCossimRequest(Wire):
    feature: Optional[NPFeature] = None
    vector: Optional[Vector] = None
    model: StrictStr
    source: StrictStr
    num_results: StrictInt


class CossimFeature(Wire):
    feature: Optional[NPFeature] = None
    cosine_similarity: Optional[float] = None


class UtilSaeTopkByDecoderCossimResponse(Wire):
    feature: Optional[NPFeature] = None
    topk_decoder_cossim_features: Optional[list[CossimFeature]] = None


class UtilSaeVectorRequest(Wire):
    model: StrictStr
    source: StrictStr
    index: StrictInt


class UtilSaeVectorResponse(Wire):
    vector: list[float]
    hook_name: str = Field(alias="hookName")


# --- capabilities ------------------------------------------------------------------------------------


class SAEInfo(Wire):
    id: str
    set: str
    hook_name: str
    d_in: int
    d_sae: int
    architecture: str


class CapabilitiesResponse(Wire):
    model: str
    accepted_model_ids: list[str]
    n_layers: int
    n_ctx: int
    d_model: int
    sae_sets: dict[str, list[str]]
    saes: list[SAEInfo]
    limits: dict[str, int]
    routes: list[str]
    steer_methods: list[str]


# --- legacy routes (the original README's; secret in the body, camelCase output) -------------------------


class LegacyActivationsTestRequest(Wire):
    text: StrictStr
    model: StrictStr
    layer: StrictStr
    index: Union[StrictStr, StrictInt]
    secret: Optional[StrictStr] = None


class LegacyActivation(Wire):
    index: int
    layer: str
    maxValue: float
    maxValueIndex: int
    values: list[float]
    sumValues: Optional[float] = None


class LegacyActivationsTestResponse(Wire):
    activations: LegacyActivation
    tokens: list[str]


class LegacyActivationsAllRequest(Wire):
    text: StrictStr
    model: StrictStr
    source_set: StrictStr
    selected_layers: Items[StrictStr] = Field(default_factory=list)
    secret: Optional[StrictStr] = None
    sort_indexes: Items[StrictInt] = Field(default_factory=list)
    ignore_bos: StrictBool = True
    num_results: Optional[StrictInt] = 25
    feature_filter: Optional[Items[StrictInt]] = None


class LegacyActivationsAllResponse(Wire):
    activations: list[LegacyActivation]
    tokens: list[str]


class LegacyCossimRequest(Wire):
    sae_id: StrictStr
    feature_id: StrictInt
    model: StrictStr
    k: StrictInt = 10
    secret: Optional[StrictStr] = None


class LegacyCossimFeature(Wire):
    cosine_similarity: float
    index: int


class LegacyCossimResponse(Wire):
    feature_id: int
    top_k_features: list[LegacyCossimFeature]


class SteerType(str, Enum):
    STEERED = "STEERED"
    DEFAULT = "DEFAULT"


# The wire enum of steer_method: one member per registered method (deployments.steer_methods), in its order.
SteerMethod = Enum("SteerMethod", {m: m for m in steer_methods.METHODS}, type=str, module=__name__,
                   qualname="SteerMethod")


# --- steer/completion, steer/completion-chat ----------------------------------------------------------------


class NPSteerFeature(Wire):
    model: StrictStr
    source: StrictStr
    index: StrictInt
    strength: Number
    steering_vector: Optional[Vector] = None  # ignored: the vector is the SAE's decoder row W_dec[index]


class NPSteerVector(Wire):
    steering_vector: Vector
    strength: Number
    hook: StrictStr


class NPSteerChatMessage(Wire):
    content: StrictStr
    role: StrictStr


class _SteerRequestBase(Wire):
    model: StrictStr
    steer_method: SteerMethod
    normalize_steering: StrictBool
    types: Items[SteerType]
    features: Optional[Items[NPSteerFeature]] = None
    vectors: Optional[Items[NPSteerVector]] = None
    n_completion_tokens: StrictInt
    temperature: Number
    strength_multiplier: Number
    freq_penalty: Number
    seed: Number
    stream: Optional[StrictBool] = False
    n_logprobs: Optional[StrictInt] = 0


class SteerCompletionRequest(_SteerRequestBase):
    prompt: StrictStr


class SteerCompletionChatPostRequest(_SteerRequestBase):
    prompt: Items[NPSteerChatMessage]
    is_assistant_axis: Optional[StrictBool] = False  # accepted; persona monitoring is not implemented (no assistant_axis)
    steer_special_tokens: StrictBool


class NPLogprobTop(Wire):
    token: str
    logprob: float


class NPLogprob(Wire):
    token: str
    logprob: float
    top_logprobs: list[NPLogprobTop]


class NPSteerCompletionResponseInner(Wire):
    type: SteerType
    output: str
    logprobs: Optional[list[NPLogprob]] = None


class SteerCompletionPost200Response(Wire):
    outputs: list[NPSteerCompletionResponseInner]


class NPSteerChatResult(Wire):
    chat_template: list[NPSteerChatMessage]
    raw: str
    type: Optional[SteerType] = None
    logprobs: Optional[list[NPLogprob]] = None


class SteerCompletionChatPost200Response(Wire):
    outputs: list[NPSteerChatResult]
    input: NPSteerChatResult


# --- legacy POST /completion (secret in the body; keys = requested types, lower case) ------------------------


class LegacySteerFeature(Wire):
    layer: StrictStr  # the SAE id, e.g. "0-res-demo"
    index: Union[StrictInt, StrictStr]
    strength: Number


class LegacyCompletionRequest(Wire):
    prompt: StrictStr
    model: StrictStr
    features: Items[LegacySteerFeature]
    secret: Optional[StrictStr] = None
    instruct: StrictBool = False
    types: Items[StrictStr] = Field(default_factory=lambda: ["steered", "default"])
    n_completion_tokens: StrictInt = 64
    temperature: Number = 1.0
    strength_multiplier: Number = 1.0
    freq_penalty: Number = 0.0
    seed: Number = 0
    steer_method: SteerMethod = SteerMethod(steer_methods.DEFAULT)
    normalize_steering: StrictBool = False


class LegacyCompletionOutput(Wire):
    chat_template: Optional[list[NPSteerChatMessage]] = None  # instruct only
    raw: str


class LegacyCompletionResponse(Wire):
    steered: Optional[LegacyCompletionOutput] = None
    default: Optional[LegacyCompletionOutput] = None


# --- activation/attention, util/similarity-matrix-pred (the 2026 web app's routes; also under /v1) ------------------


class ActivationAttentionRequest(Wire):
    prompt: StrictStr
    model: StrictStr
    layer: StrictInt
    head: StrictInt


class ActivationAttentionResponse(Wire):
    """One head's attention pattern, sparse: each query row's top keys (at most 8, weight >= 0.005, 4 decimals) as
    flat ``q * seq_len + k`` indices, index-aligned with ``attention_values`` (not with ``tokens``)."""

    tokens: list[str]
    attention_indices: list[int]
    attention_values: list[float]
    max_activation: float = Field(description="The largest weight outside row and column 0 (the first position's sink)")
    seq_len: int


class SimilarityMatrixPredRequest(Wire):
    model_id: StrictStr
    source_id: StrictStr = Field(description="A temporal SAE")
    index: StrictInt = Field(description="Accepted and unused: the matrix is over all of the SAE's predicted codes")
    text: StrictStr


class SimilarityMatrixPredResponse(Wire):
    """Cosine similarities between positions of the temporal SAE's predicted codes (centred over positions), with
    position 0 dropped from both axes and from ``tokens``."""

    similarity_matrix: list[list[float]]
    tokens: list[str]


# --- lens/prompt (Neuronpedia 2026-08): logit and Jacobian lens read-outs, streamed as NDJSON frames ----------


class LensType(str, Enum):
    LOGIT_LENS = "LOGIT_LENS"
    JACOBIAN_LENS = "JACOBIAN_LENS"


class LensChatMessage(Wire):
    role: StrictStr
    content: StrictStr


class LensSteerToken(Wire):
    token: StrictStr  # a read-out string exactly as a frame showed it (whitespace kept)
    type: LensType


class LensPromptRequest(Wire):
    """Exactly one of ``prompt`` (raw text), ``chat`` (templated; a trailing assistant message is a prefill) or a
    non-empty ``input_token_ids`` (read out verbatim, no generation)."""

    model: StrictStr
    type: list[LensType]
    prompt: Optional[StrictStr] = None
    chat: Optional[Items[LensChatMessage]] = None
    input_token_ids: Items[StrictInt] = Field(default_factory=list)
    top_n: StrictInt = 10
    layers: Items[StrictInt] = Field(default_factory=list)
    max_seq_len: Optional[StrictInt] = None
    prepend_bos: StrictBool = True
    enable_thinking: StrictBool = False
    preserve_thinking: StrictBool = True
    stream: StrictBool = True
    temperature: Number = 1.0
    num_completion_tokens: StrictInt = 0
    cached_token_ids: Items[StrictInt] = Field(default_factory=list)
    steer_tokens: Items[LensSteerToken] = Field(default_factory=list)
    steer_layers: Items[StrictInt] = Field(default_factory=list)
    steer_strength: Number = 0.0
    steer_ablate: StrictBool = False
    swap_token: Optional[LensSteerToken] = None
    steer_generated_tokens: StrictBool = False
    filter_non_word_tokens: StrictBool = True
    fail_if_busy: StrictBool = False


class LensFrame(BaseModel):
    """The NDJSON frames keep their snake_case names in every dialect (the web app stores them verbatim)."""

    model_config = ConfigDict(extra="forbid")


class LensMetaFrame(LensFrame):
    kind: str = "meta"
    model: str
    types: list[LensType]
    layers_by_type: dict[str, list[int]]
    top_n: int
    prompt_len: int
    num_completion_tokens: int
    temperature: float
    prepend_bos: bool
    reuse_len: int


class LensPromptTokenFrame(LensFrame):
    position: int
    token: str
    id: int
    is_generated: bool
    is_char_continuation: bool
    message_index: Optional[int]
    role: Optional[str]
    channel: Optional[str]
    section: Optional[str]


class LensPromptFrame(LensFrame):
    kind: str = "prompt"
    tokens: list[LensPromptTokenFrame]


class LensTypeSlice(LensFrame):
    type: LensType
    top_tokens: list[list[str]]  # [layers][top_n]
    top_probs: list[list[float]]


class LensTokenFrame(LensPromptTokenFrame):
    kind: str = "token"
    results: list[LensTypeSlice]


class LensDoneFrame(LensFrame):
    kind: str = "done"
    seq_len: int
    prompt_len: int
    vocab_size: int
    completion: str


class LensErrorFrame(LensFrame):
    kind: str = "error"
    error: str


class LensPromptResponse(LensFrame):
    """``stream: false`` (and handle callers): the frames of a whole run but the prompt frame."""

    meta: LensMetaFrame
    tokens: list[LensTokenFrame]
    done: LensDoneFrame
