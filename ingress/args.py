"""AppArgs: the one configuration object, from serve_config.yaml ``args``, the CLI, or Python.

Grouped into sections (``model``, ``saes``, ``limits``, ``batching``, ``auth``, ``resources``); every field says
what it does, and the configuration reference (docs/configuration.md) is generated from these descriptions
(``python -m ingress.args --markdown``; a test fails when the file is out of date). The flat keys of earlier
versions (``model_dtype``, ``token_limit``, ``sae_sets`` ...) are still accepted and land in their section.
Unknown keys are errors: a misspelt option must not be silently ignored.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.engine import pack
from deployments.engine.compute import SHARED_LANES
from deployments.specs import local_path, read_sae_config

DType = Literal["float32", "float16", "bfloat16"]


# The replicas' environment by default (resources.replica_env; the field says why).
# Serve's gRPC between replicas caps a message at 4 MB by default, which a batch's activations or its feature rows
# can pass (batching.grpc_calls): the cap is gRPC's largest instead.
GRPC_MAX_MESSAGE_BYTES = (1 << 31) - 1
REPLICA_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
               "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE_BYTES)}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelArgs(Section):
    """The TransformerLens model: which one, and how it is loaded."""

    name: str = Field("models/demo-lm", description="A TransformerLens model name (`gpt2-small`, `gemma-2-2b`) or a local "
                      "pack directory (`models/demo-lm`)")
    id: Optional[str] = Field(None, description="The id clients send as `model` (default: the pack's model_name, or the "
                              "model name)")
    override: Optional[str] = Field(None, description="Load these TransformerLens weights instead (e.g. an -it model under "
                                    "base-model SAEs); clients may send this id too")
    dtype: DType = Field("float32", description="The model's dtype: float32, float16 or bfloat16")
    jacobian_lens: Optional[str] = Field(None, description="A Jacobian lens file for lens/prompt's JACOBIAN_LENS (torch "
                                         "file: `J` {layer: [d_model, d_model]}, `source_layers`, `d_model`; fit one "
                                         "with scripts/fit_jacobian_lens.py); none = the pack's own "
                                         "`jlens/<corpus>/<name>_jacobian_lens.pt` if it has one, `off` = no lens")


class SAEArgs(Section):
    """Which SAEs are served, and how much of them an SAEShard replica holds."""

    sets: list[str] = Field(default_factory=list, description="SAE sets to serve: sets of the pack, of the SAE config file, "
                            "or Neuronpedia set names of SAE Lens's pretrained directory (`res-jb`)")
    dirs: list[str] = Field(default_factory=list, description="Extra local SAE Lens directories, served as "
                            "`<dir>-<parent dir>`")
    config: Optional[str] = Field(None, description="A YAML/JSON file listing SAE sets (`{sets: {<set>: {<served id>: <SAE "
                                  "Lens dir>}}}`, optionally `model` / `model_id`); with no `sets`, all of its sets are served")
    include: list[str] = Field(default_factory=list, description="Serve only SAE ids matching one of these regexes")
    exclude: list[str] = Field(default_factory=list, description="Do not serve SAE ids matching any of these regexes")
    dtype: DType = Field("float32", description="The SAEs' dtype: float32, float16 or bfloat16 (decoder norms are folded "
                         "in float32 first)")
    max_loaded: int = Field(64, ge=1, description="Most SAEs resident in one SAEShard replica (least recently used go first; "
                            "one in use never does)")
    max_bytes: Optional[int] = Field(None, ge=1, description="Most bytes one SAEShard replica holds for its SAEs, counting "
                                     "each SAE's weights and its cosine index; none = no cap on the CPU, on a GPU 80% of "
                                     "the replica's share of the card")


class LimitArgs(Section):
    """What one request may ask for. A request over a limit gets a 400 that names it."""

    token_limit: int = Field(200, ge=1, description="Most tokens in one prompt (after BOS / chat template); also capped by "
                             "the model's n_ctx")
    max_completion_tokens: int = Field(256, ge=1, description="Most new tokens one steer/completion may ask for "
                                       "(`n_completion_tokens`)")
    max_batch_prompts: int = Field(16, ge=1, description="Most prompts in one `*-batch` or `activation/source` request")
    max_num_results: int = Field(1000, ge=1, description="Cap on activation/all's `num_results`")
    max_top_k: int = Field(100, ge=1, description="Cap on topk-by-token's `top_k`")
    max_steer_vectors: int = Field(64, ge=1, description="Most steering `features` (or `vectors`) in one steer request")
    max_steer_work: int = Field(1 << 15, ge=1, description="Most steering work in one steer request: (features + "
                                "vectors) x steered rows x (prompt tokens + `n_completion_tokens`); each vector is applied "
                                "at every position of every forward pass, so this bounds what one request adds to the "
                                "generation batch it shares")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body accepted (413 above, whether the "
                                "size is declared in Content-Length or counted while a chunked body is read)")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unanswered after this gets 503 + Retry-After")
    activation_token_limit: Optional[int] = Field(None, ge=1, description="Most tokens in one prompt of "
                                                  "activation/attention and util/similarity-matrix-pred, and of every "
                                                  "activation route in the /neuronpedia dialect; none = token_limit, "
                                                  "never more than it")
    neuronpedia_max_batch_prompts: int = Field(4, ge=1, description="/neuronpedia dialect: most prompts in one `*-batch` "
                                               "or `activation/source` request (the 2026 server's cap); a request with "
                                               "several prompts shares activation_token_limit among this many (each "
                                               "prompt at most activation_token_limit / this)")
    lens_token_limit: int = Field(1024, ge=1, description="Most tokens in one lens/prompt sequence (prompt, templated "
                                  "chat or input ids); also capped by the model's n_ctx, which bounds prompt + generation")


class BatchingArgs(Section):
    """How concurrent requests share work. Batches form from what queues while a replica is busy; nothing waits
    for company by default."""

    model_calls_in_flight: int = Field(2, ge=1, description="Most ModelDeployment calls one ingress replica has out at a "
                                       "time: requests that arrive meanwhile share the next call (a lone request goes at once). "
                                       "1 makes larger batches (0.9-1.2x the demo pack's activation/all at 16 clients) but a "
                                       "call then returns before the next goes out, so the model's next forward pass no longer "
                                       "overlaps the shards' work on the last; ModelDeployment's queue limit counts these calls, "
                                       "its autoscaling the prompts they carry (benchmarks/README.md)")
    grpc_calls: bool = Field(True, description="The request path's calls between replicas (ingress to ModelDeployment and "
                             "SAEShard, ModelDeployment to SAEShard) go over Serve's gRPC transport between replicas "
                             "instead of Ray actor calls: about half the CPU and the latency of a call for payloads up to a "
                             "megabyte (benchmarks.transport_bench). Streams (steering, lens) and the handle calls of Ray "
                             "jobs stay on Ray actor calls")
    direct_calls: bool = Field(True, description="activation/all's calls (ingress to ModelDeployment, ModelDeployment to "
                               "SAEShard) go straight to a replica Serve found earlier, over a kept-open socket of its own "
                               "(deployments.direct), instead of through Serve's handles: a fraction of a handle call's CPU "
                               "and latency (benchmarks/README.md). Serve still routes the first call, loads SAEs, counts "
                               "the load for autoscaling and carries every call a direct lane drops. Off: every call "
                               "through Serve")
    grpc_max_bytes: int = Field(2 << 20, ge=0, description="A ModelDeployment to SAEShard call whose activations are larger "
                                "than this goes through Ray's object store instead of gRPC (from about 4 MB on, the object "
                                "store costs less: benchmarks.transport_bench)")
    capture_batch_size: int = Field(16, ge=1, description="Most prompts the model runs in one forward pass")
    capture_batch_wait_s: float = Field(0.0, ge=0, description="How long an idle model waits for company before a forward "
                                        "pass")
    encode_batch_size: int = Field(16, ge=1, description="Most prompts one SAE encodes in one matmul (a model batch's "
                                   "prompts for an SAE are encoded together, in chunks of this many)")
    generate_rows: int = Field(64, ge=4, description="Row slots for generation (a steering request's STEERED and DEFAULT "
                               "are two rows); a request joins the running batch at the next decode step while slots are "
                               "free, and leaves it when it finishes")
    generate_fixed_shapes: Optional[bool] = Field(None, description="Decode all generate_rows slots every step and prefill "
                                                  "prompts one at a time, so that a seeded request's arithmetic never "
                                                  "depends on what else runs; none = only where the startup check finds "
                                                  "rows computed in different batch shapes differ (a GPU)")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads in each ModelDeployment and "
                                         "SAEShard replica (matters on CPU); none = Ray's default for the replica's num_cpus, "
                                         "which is 1 for a fractional CPU")
    burst_torch_threads: Optional[int] = Field(None, ge=0, description="CPU only: torch threads for a lone request's work "
                                               "while no other replica on the machine computes; none = every CPU the "
                                               "replica may use, 0 = off")
    shared_lanes: int = Field(SHARED_LANES, ge=1, description="CPU only, where replicas run torch on one thread: the most threads a "
                              "big enough capture batch, shard call or generation step splits between while other "
                              "replicas compute (at most burst_torch_threads); 1 = split only on an otherwise idle CPU")


class AuthArgs(Section):
    """Who may call."""

    secret: Optional[str] = Field(None, repr=False, description="If set (or env `SECRET`), every route but /health, /docs "
                                  "and /openapi.json needs header `X-SECRET-KEY` (the legacy routes: `secret` in the body)")


class ResourceArgs(Section):
    """Where replicas run and what they ask Ray for."""

    device: str = Field("auto", description="auto (cuda if the cluster has GPUs, else cpu), cpu, or cuda (Ray gives each "
                        "GPU replica its card: see num_gpus)")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per ModelDeployment and per SAEShard replica when the "
                                      "device is a GPU; fractions share a card. none = 0.25 per model replica and 0.125 per "
                                      "SAE replica (one card holds 2 + 4 replicas)")
    model_num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per ModelDeployment replica (overrides num_gpus)")
    sae_num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per SAEShard replica (overrides num_gpus); with no "
                                          "saes.max_bytes, this share of the card's memory bounds its SAEs")
    replica_env: dict[str, str] = Field(
        default_factory=lambda: dict(REPLICA_ENV),
        description="Environment variables for every replica of the app (merged into each deployment's "
        "ray_actor_options.runtime_env). The default turns on Serve's throughput-optimised mode in the replicas only (in "
        "a driver process it would break that process's synchronous DeploymentHandle .result() calls), and keeps glibc's "
        "malloc from handing large blocks back to the OS (no mmap, trim above 1 GiB): a batch's [rows, d_sae] codes "
        "would otherwise be mapped afresh, page by page, each time (a GPT-2-small SAE encode of 8 prompts: 352 -> 276 ms "
        "on one CPU thread), and lifts the 4 MB cap on a gRPC message between replicas (batching.grpc_calls; a call "
        "over it is sent again by reference)")
    deployment_options: dict[str, dict] = Field(
        default_factory=dict, description="Per-deployment Serve options applied in Python (e.g. `{SAEShard: {num_replicas: "
        "2}}`); serve_config.yaml's `deployments:` section is the usual place for these")


# The flat keys of earlier versions (and of the CLI's flags): key -> (section, field).
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"), "model_id": ("model", "id"), "override_model_id": ("model", "override"),
    "model_dtype": ("model", "dtype"), "jacobian_lens": ("model", "jacobian_lens"),
    "sae_sets": ("saes", "sets"), "sae_dirs": ("saes", "dirs"), "sae_config": ("saes", "config"),
    "include_sae": ("saes", "include"), "exclude_sae": ("saes", "exclude"), "sae_dtype": ("saes", "dtype"),
    "max_loaded_saes": ("saes", "max_loaded"), "max_sae_bytes": ("saes", "max_bytes"),
    **{k: ("limits", k) for k in LimitArgs.model_fields},
    **{k: ("batching", k) for k in BatchingArgs.model_fields},
    **{k: ("auth", k) for k in AuthArgs.model_fields},
    **{k: ("resources", k) for k in ResourceArgs.model_fields},
}


class AppArgs(BaseModel):
    """How to build the application."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelArgs = Field(default_factory=ModelArgs, description=ModelArgs.__doc__)
    saes: SAEArgs = Field(default_factory=SAEArgs, description=SAEArgs.__doc__)
    limits: LimitArgs = Field(default_factory=LimitArgs, description=LimitArgs.__doc__)
    batching: BatchingArgs = Field(default_factory=BatchingArgs, description=BatchingArgs.__doc__)
    auth: AuthArgs = Field(default_factory=AuthArgs, description=AuthArgs.__doc__)
    resources: ResourceArgs = Field(default_factory=ResourceArgs, description=ResourceArgs.__doc__)

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        """Flat keys (``token_limit: 64``, ``model: gpt2-small``) go to their section; a key given both ways is an
        error, as is one that is neither."""
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        flat: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if key in cls.model_fields and not (key == "model" and isinstance(value, str)):
                out[key] = value
            elif key in FLAT_KEYS:
                section, field = FLAT_KEYS[key]
                flat.setdefault(section, {})[field] = value
            else:
                out[key] = value  # an unknown key: the model's extra="forbid" names it
        for section, fields in flat.items():
            given = out.get(section)
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else dict(given or {})
            both = set(given) & set(fields)
            if both:
                raise ValueError(f"{sorted(both)} given both flat and in section {section!r}")
            out[section] = {**given, **fields}
        return out

    @model_validator(mode="after")
    def _gpus(self) -> "AppArgs":
        from .resources import check_gpu_args

        r = self.resources
        check_gpu_args(r.device, r.num_gpus, r.model_num_gpus, r.sae_num_gpus)
        return self

    @model_validator(mode="after")
    def _model_from_sae_config(self) -> "AppArgs":
        """An SAE config file may name the model (and its id); an explicit ``model.name`` / ``model.id`` wins."""
        given = self.model.model_fields_set
        if self.saes.config and not {"name", "id"} <= given:
            cfg = read_sae_config(self.saes.config)
            if cfg.model and "name" not in given:
                self.model.name = cfg.model
            if cfg.model_id and "id" not in given:
                self.model.id = cfg.model_id
        return self

    @property
    def served_model_id(self) -> str:
        if self.model.id:
            return self.model.id
        path = local_path(self.model.name)
        if path is None:
            return self.model.name
        return pack.model_name(path) or path.name

    def accepted_model_ids(self) -> set[str]:
        ids = {self.served_model_id}
        if self.model.override:
            ids.add(self.model.override)
        return ids

    def resolved_secret(self) -> Optional[str]:
        return self.auth.secret or os.environ.get("SECRET") or None

    def public_dict(self) -> dict:
        """For logs: never the secret."""
        return self.model_dump(exclude={"auth": {"secret"}})


def resolve_model_path(model: str) -> str:
    """Absolute path for a local pack (replicas may run elsewhere); a model name unchanged."""
    p = local_path(model)
    return str(p) if p is not None else model


LENS_OFF = "off"


def resolve_jacobian_lens(model: str, setting: Optional[str]) -> Optional[str]:
    """The Jacobian lens file to serve (an absolute path), or None: the setting's file (which must exist), else the
    pack's one (``<pack>/jlens/*/*_jacobian_lens.pt``, when there is exactly one)."""
    if setting == LENS_OFF:
        return None
    if setting:
        p = local_path(setting)
        if p is None or not p.is_file():
            raise ValueError(f"model.jacobian_lens: no such file {setting!r}")
        return str(p)
    pack_dir = local_path(model)
    if pack_dir is None or not pack_dir.is_dir():
        return None
    found = sorted(pack_dir.glob("jlens/*/*_jacobian_lens.pt"))
    return str(found[0]) if len(found) == 1 else None


def reference_markdown() -> str:
    """The configuration reference, from the fields themselves (docs/configuration.md is this text)."""
    lines = ["# Configuration reference", "",
             "Generated from `ingress/args.py` by `python -m ingress.args --markdown > docs/configuration.md` "
             "(`tests/ingress/test_config_reference.py` fails when this file is out of date).", "",
             "`serve_config.yaml`'s `args`, the Python builder `ingress.app:build_app(AppArgs(...))` and the CLI all take "
             "`ingress.args.AppArgs`. Sections nest (`limits: {token_limit: 64}`); each field's flat key of earlier "
             "versions (`token_limit: 64`, `model: gpt2-small`, `sae_sets: [...]`) is accepted too. Unknown keys are "
             "errors.", ""]
    flat_of = {v: k for k, v in FLAT_KEYS.items()}
    for name, f in AppArgs.model_fields.items():
        section = f.annotation
        lines += [f"## `{name}`", "", (section.__doc__ or "").strip(), "", "| key | flat key | default | meaning |",
                  "| --- | --- | --- | --- |"]
        for field, info in section.model_fields.items():
            default = info.get_default(call_default_factory=True)
            shown = "none" if default is None else ("`[]`" if default == [] else ("`{}`" if default == {} else f"`{default}`"))
            flat = flat_of.get((name, field), "–")
            lines.append(f"| `{name}.{field}` | `{flat}` | {shown} | {info.description} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["AppArgs", "FLAT_KEYS", "reference_markdown", "resolve_jacobian_lens", "resolve_model_path"]

if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(reference_markdown())
    else:
        sys.exit("usage: python -m ingress.args --markdown")
