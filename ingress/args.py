"""AppArgs: the one configuration object, from serve_config.yaml ``args``, the CLI, or Python."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.engine import pack
from deployments.engine.loading import DTYPES, local_path, read_sae_config

DType = Literal["float32", "float16", "bfloat16"]


class AppArgs(BaseModel):
    """How to build the application. Unknown keys are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("models/demo-lm", description="TransformerLens model name, or a local pack directory")
    model_id: Optional[str] = Field(None, description="Id clients send as `model` (default: the pack's model_name, or the model name)")
    override_model_id: Optional[str] = Field(None, description="Load these weights instead (e.g. an -it model under base-model SAEs); also accepted as `model`")
    sae_sets: list[str] = Field(default_factory=list, description="SAE sets to serve (pack sets or Neuronpedia set names)")
    sae_dirs: list[str] = Field(default_factory=list, description="Extra local SAE Lens directories, served as '<dir>-<parent dir>'")
    sae_config: Optional[str] = Field(
        None,
        description="YAML/JSON file listing SAE sets ({sets: {<set>: {<served id>: <SAE Lens dir>}}}, optionally model/model_id); "
        "with no sae_sets, all of its sets are served",
    )
    include_sae: list[str] = Field(default_factory=list, description="Serve only SAE ids matching one of these regexes")
    exclude_sae: list[str] = Field(default_factory=list, description="Do not serve SAE ids matching any of these regexes")
    model_dtype: DType = "float32"
    sae_dtype: DType = "float32"
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    token_limit: int = Field(200, ge=1, description="Most tokens in one prompt (after BOS/chat template); also capped by the model's n_ctx")
    max_completion_tokens: int = Field(256, ge=1, description="Most new tokens one steer/completion may ask for (n_completion_tokens)")
    max_batch_prompts: int = Field(16, ge=1, description="Most prompts in one *-batch request")
    max_num_results: int = Field(1000, ge=1, description="Cap on activation/all num_results")
    max_top_k: int = Field(100, ge=1, description="Cap on topk-by-token top_k")
    max_loaded_saes: int = Field(64, ge=1, description="Most SAEs resident in one SAEShard replica (LRU)")
    secret: Optional[str] = Field(None, description="If set (or env SECRET), requests need X-SECRET-KEY", repr=False)
    capture_batch_size: int = Field(16, ge=1, description="Most prompts the model runs in one forward pass")
    capture_batch_wait_s: float = Field(0.005, ge=0, description="How long a forward pass waits to fill its batch")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body accepted (413 above)")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unanswered after this gets 503 + Retry-After")
    max_sae_bytes: Optional[int] = Field(None, ge=1, description="Most bytes of SAE weights in one SAEShard replica (LRU); None = no byte cap")
    encode_batch_size: int = Field(16, ge=1, description="Most concurrent encodes for one SAE run as one batch")
    encode_batch_wait_s: float = Field(0.002, ge=0, description="How long an SAE encode waits to fill its batch")
    generate_rows: int = Field(
        64, ge=4, description="Row slots for generation (a steering request's STEERED and DEFAULT are two rows); a request "
        "joins the running batch at the next decode step while slots are free, and leaves it when it finishes")
    generate_fixed_shapes: Optional[bool] = Field(
        None, description="Decode all generate_rows slots every step and prefill prompts one at a time, so that a seeded "
        "request's arithmetic never depends on what else runs; None = only where the startup check finds rows computed "
        "in different batch shapes differ (a GPU)")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads in each ModelDeployment and SAEShard replica (matters on CPU); "
        "None = Ray's default for the replica's num_cpus, which is 1 for a fractional CPU")
    burst_torch_threads: Optional[int] = Field(
        None, ge=0, description="CPU only: torch threads for a lone request's work while no other replica on the "
        "machine computes (idle cores otherwise); None = every CPU the replica may use, 0 = off")
    deployment_options: dict[str, dict] = Field(
        default_factory=dict,
        description="Per-deployment Serve options applied in Python (e.g. {'SAEShard': {'num_replicas': 2}}); "
        "serve_config.yaml's `deployments:` section is the usual place for these",
    )

    @field_validator("model_dtype", "sae_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        assert v in DTYPES
        return v

    @model_validator(mode="after")
    def _model_from_sae_config(self) -> "AppArgs":
        """An SAE config file may name the model (and its id); explicit ``model`` / ``model_id`` win."""
        if self.sae_config and not {"model", "model_id"} <= self.model_fields_set:
            cfg = read_sae_config(self.sae_config)
            if cfg.model and "model" not in self.model_fields_set:
                self.model = cfg.model
            if cfg.model_id and "model_id" not in self.model_fields_set:
                self.model_id = cfg.model_id
        return self

    @property
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        path = local_path(self.model)
        if path is None:
            return self.model
        return pack.model_name(path) or path.name

    def accepted_model_ids(self) -> set[str]:
        ids = {self.served_model_id}
        if self.override_model_id:
            ids.add(self.override_model_id)
        return ids

    def resolved_secret(self) -> Optional[str]:
        return self.secret or os.environ.get("SECRET") or None

    def public_dict(self) -> dict:
        """For logs and /v1/capabilities: never the secret."""
        return self.model_dump(exclude={"secret"})


def resolve_model_path(model: str) -> str:
    """Absolute path for a local pack (replicas may run elsewhere); a model name unchanged."""
    p = local_path(model)
    return str(p) if p is not None else model


__all__ = ["AppArgs", "resolve_model_path"]
