"""The wire format: request/response models, field for field as ``neuronpedia-inference-client`` 1.10.1.

One module, one error shape (``ErrorResponse``). Field names and JSON types follow the client's generated
models; behaviour is documented in the README and CONTRACT.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictFloat, StrictInt]


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
    vector: Optional[list[Number]] = None
    hook: Optional[StrictStr] = None


class ActivationSingleBatchRequest(Wire):
    prompts: list[StrictStr]
    model: StrictStr
    source: Optional[StrictStr] = None
    index: Optional[StrictStr] = None
    vector: Optional[list[Number]] = None
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
    selected_sources: list[StrictStr]
    sort_by_token_indexes: list[StrictInt]
    ignore_bos: StrictBool
    num_results: Optional[StrictInt] = 25
    feature_filter: Optional[list[StrictInt]] = Field(
        default=None, description="Only rank these features (needs exactly one selected source)."
    )


class ActivationAllBatchRequest(Wire):
    prompts: list[StrictStr]
    model: StrictStr
    source_set: StrictStr
    selected_sources: list[StrictStr]
    sort_by_token_indexes: list[StrictInt]
    ignore_bos: StrictBool
    num_results: Optional[StrictInt] = 25
    feature_filter: Optional[list[StrictInt]] = None


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
    prompts: list[StrictStr]
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
    prompts: list[StrictStr]
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


class SteerType(str, Enum):
    STEERED = "STEERED"
    DEFAULT = "DEFAULT"


class SteerMethod(str, Enum):
    SIMPLE_ADDITIVE = "SIMPLE_ADDITIVE"
    ORTHOGONAL_DECOMP = "ORTHOGONAL_DECOMP"
    PROJECTION_CAP = "PROJECTION_CAP"
