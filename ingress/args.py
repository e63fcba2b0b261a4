"""AppArgs: the one configuration object, from serve_config.yaml ``args``, the CLI, or Python."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.engine import pack
from deployments.specs import DTYPE_NAMES, local_path, read_sae_config

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
    device: str = Field("auto", description="auto (cuda if the cluster has GPUs, else cpu), cpu, or cuda (each GPU "
                        "replica is given its card by Ray: see num_gpus)")
    token_limit: int = Field(200, ge=1, description="Most tokens in one prompt (after BOS/chat template); also capped by the model's n_ctx")
    max_completion_tokens: int = Field(256, ge=1, description="Most new tokens one steer/completion may ask for (n_completion_tokens)")
    max_batch_prompts: int = Field(16, ge=1, description="Most prompts in one *-batch request")
    max_num_results: int = Field(1000, ge=1, description="Cap on activation/all num_results")
    max_top_k: int = Field(100, ge=1, description="Cap on topk-by-token top_k")
    max_loaded_saes: int = Field(64, ge=1, description="Most SAEs resident in one SAEShard replica (LRU)")
    secret: Optional[str] = Field(None, description="If set (or env SECRET), requests need X-SECRET-KEY", repr=False)
    model_calls_in_flight: int = Field(2, ge=1, description="Most ModelDeployment calls one ingress replica has out at a time: "
                                       "requests that arrive meanwhile share the next call (a lone request goes at once)")
    capture_batch_size: int = Field(16, ge=1, description="Most prompts the model runs in one forward pass")
    capture_batch_wait_s: float = Field(0.0, ge=0, description="How long a forward pass waits for company when the model "
                                        "is idle (batches form anyway from what queues while the model is busy)")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body accepted (413 above)")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unanswered after this gets 503 + Retry-After")
    max_sae_bytes: Optional[int] = Field(
        None, ge=1, description="Most bytes one SAEShard replica holds for its SAEs (LRU), counting each SAE's weights "
        "and its cosine index; None = no cap on the CPU, on a GPU the replica's share of the card (sae_num_gpus)")
    encode_batch_size: int = Field(16, ge=1, description="Most prompts one SAE encodes in one matmul (a model batch's prompts "
                                   "for an SAE are encoded together, in chunks of this many)")
    generate_batch_rows: int = Field(16, ge=2, description="Rows (a steering request's STEERED and DEFAULT are two) decoded together in one generation wave")
    generate_batch_wait_s: float = Field(
        0.05, ge=0, description="How long a generation wave waits to collect requests; a wave runs to its end, so a "
        "request that just misses it waits for the whole wave")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads in each ModelDeployment and SAEShard replica (matters on CPU); "
        "None = Ray's default for the replica's num_cpus, which is 1 for a fractional CPU")
    burst_torch_threads: Optional[int] = Field(
        None, ge=0, description="CPU only: torch threads for a lone request's work while no other replica on the "
        "machine computes (idle cores otherwise); None = every CPU the replica may use, 0 = off")
    replica_env: dict[str, str] = Field(
        default_factory=lambda: {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        description="Environment variables for every replica of the app (merged into each deployment's "
        "ray_actor_options.runtime_env). The default turns on Serve's throughput-optimised mode in the replicas only: "
        "set in a driver process it would break that process's synchronous DeploymentHandle .result() calls",
    )
    # --- GPUs (ingress.resources turns these into each deployment's ray_actor_options) ---
    num_gpus: Optional[float] = Field(
        None, ge=0, description="GPUs per ModelDeployment and per SAEShard replica when the device is a GPU; fractions "
        "share a card. None = 0.25 per model replica and 0.125 per SAE replica (one card holds 2 + 4 replicas)")
    model_num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per ModelDeployment replica (overrides num_gpus)")
    sae_num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per SAEShard replica (overrides num_gpus); "
                                          "with no max_sae_bytes, this share of the card's memory bounds its SAEs")
    deployment_options: dict[str, dict] = Field(
        default_factory=dict,
        description="Per-deployment Serve options applied in Python (e.g. {'SAEShard': {'num_replicas': 2}}); "
        "serve_config.yaml's `deployments:` section is the usual place for these",
    )

    @field_validator("model_dtype", "sae_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        assert v in DTYPE_NAMES
        return v

    @model_validator(mode="after")
    def _gpus(self) -> "AppArgs":
        from .resources import check_gpu_args

        check_gpu_args(self.device, self.num_gpus, self.model_num_gpus, self.sae_num_gpus)
        return self

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
