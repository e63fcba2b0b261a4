"""Static checks of the Kubernetes/KubeRay manifests in cluster/ (no cluster, no Ray runtime needed).

* Every YAML document in cluster/ validates against the KubeRay CRD schema of its kind, with objects closed
  the way kubeconform treats them (an unknown key anywhere, pod templates included, is an error).
* Each RayService's serveConfigV2 passes ray.serve.schema.ServeDeploySchema *and* a strict key check against
  the field names of Ray's schema models (Ray silently ignores a misspelt deployment key); serve_config.yaml
  gets the same strict check.
* serveConfigV2 `applications` equal serve_config.yaml's; serve_config.gpu.yaml and the GPU manifest may differ
  from it only by GPU_OVERRIDES.
* Every config whose device is not the CPU requests GPUs for ModelDeployment and SAEShard (a replica without a
  GPU request still sees every GPU under Ray 2.60, unaccounted), and `auto` leaves their actor options to the
  code (ingress.resources), which resolves it with a GPU request.
* Deployment names in the configs are the `.name` of the Deployment objects in the code.
* A few things the API server would accept but KubeRay or Ray would not run: resource fields set twice, a
  replica that fits no worker group, a RayJob whose files are not on the head.

The CRDs are read from <repo>/../shared/kuberay, or the first shared/kuberay above the repository (ray-project/kuberay ray-operator/config/crd/bases).
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import typing
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from ingress import haproxy_env
from ingress.args import REPLICA_ENV

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SERVE_CONFIG = REPO / "serve_config.yaml"
SERVE_CONFIG_GPU = REPO / "serve_config.gpu.yaml"
# <repo>/../shared/kuberay, or the first shared/kuberay above the repository (a git worktree sits deeper)
KUBERAY = next((p / "shared" / "kuberay" for p in REPO.parents if (p / "shared" / "kuberay").is_dir()),
               REPO.parent / "shared" / "kuberay")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
APP_NAME = "saeserve"
SECRET_NAME = "saeserve-secret"

# The only ways serve_config.gpu.yaml's and cluster/rayservice-gpu.yaml's `applications` may differ from
# serve_config.yaml's (also listed in those files' headers and in cluster/README.md). Keys: (deployment name or
# None for app level, field). Model and SAE replicas share a card by these fractions.
GPU_MANIFEST = "rayservice-gpu.yaml"
GPU_OVERRIDES: dict[tuple[str | None, str], object] = {
    (None, "args.resources.device"): "cuda",
    ("ModelDeployment", "ray_actor_options"): {"num_cpus": 0, "num_gpus": 0.25},
    ("SAEShard", "ray_actor_options"): {"num_cpus": 0, "num_gpus": 0.125},
}
GPU_DEPLOYMENTS = ("ModelDeployment", "SAEShard")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _manifest_paths() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def _all_docs() -> list[tuple[str, int, dict]]:
    return [(p.name, i, d) for p in _manifest_paths() for i, d in enumerate(_docs(p))]


def _rayservices() -> list[tuple[str, dict]]:
    return [(name, d) for name, _, d in _all_docs() if d.get("kind") == "RayService"]


def _rayjobs() -> list[tuple[str, dict]]:
    return [(name, d) for name, _, d in _all_docs() if d.get("kind") == "RayJob"]


def _serve_config_v2(doc: dict) -> dict:
    raw = doc["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 must be a YAML string (use `serveConfigV2: |`)"
    return yaml.load(raw, Loader=_Loader)


def _local_serve_config() -> dict:
    return yaml.load(SERVE_CONFIG.read_text(), Loader=_Loader)


def _local_gpu_serve_config() -> dict:
    return yaml.load(SERVE_CONFIG_GPU.read_text(), Loader=_Loader)


# ---------------------------------------------------------------------------------------------------------
# CRD schemas, closed like kubeconform


def close_schema(s: object) -> object:
    """Add additionalProperties: false to every object schema that declares `properties` and says nothing about
    additional ones, unless it carries x-kubernetes-preserve-unknown-fields. In place; returns s."""
    if isinstance(s, dict):
        props = s.get("properties")
        if isinstance(props, dict):
            for sub in props.values():
                close_schema(sub)
            if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s["additionalProperties"] = False
        if isinstance(s.get("additionalProperties"), dict):
            close_schema(s["additionalProperties"])
        if isinstance(s.get("items"), dict):
            close_schema(s["items"])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key) or []:
                close_schema(sub)
        if isinstance(s.get("not"), dict):
            close_schema(s["not"])
    return s


def _require_kuberay() -> None:
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (shared/kuberay next to the repository); "
                    "cannot validate manifests against their schemas")


@lru_cache(maxsize=None)
def _crd(kind: str) -> tuple[str, jsonschema.protocols.Validator]:
    """(apiVersion, validator) for the first version of the kind's CRD."""
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = crd["spec"]["versions"][0]
    assert version.get("served", True), f"{kind} {version['name']} is not served"
    schema = close_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not a KubeRay kind"]
    api_version, validator = _crd(kind)
    errors = []
    if doc.get("apiVersion") != api_version:
        errors.append(f"apiVersion {doc.get('apiVersion')!r} != {api_version!r}")
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        errors.append(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
    return errors


def secret_errors(doc: dict) -> list[str]:
    errors = []
    if doc.get("apiVersion") != "v1":
        errors.append("Secret apiVersion must be v1")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "type", "data", "stringData", "immutable"}
    if unknown:
        errors.append(f"unknown Secret keys {sorted(unknown)}")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("Secret needs metadata.name")
    if not (doc.get("stringData") or doc.get("data")):
        errors.append("Secret has no data")
    return errors


# ---------------------------------------------------------------------------------------------------------
# Strict serve config keys (Ray's own schema accepts unknown keys and drops them)


def _models_in(annotation) -> list[type]:
    from pydantic import BaseModel

    found = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append(annotation)
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _field_names(model) -> dict[str, object]:
    """Accepted keys -> annotation, aliases included."""
    names = {}
    for name, field in model.model_fields.items():
        names[name] = field.annotation
        if field.alias:
            names[field.alias] = field.annotation
    return names


def unknown_keys(value: object, model, path: str = "") -> list[str]:
    """Paths of keys in `value` that `model` (a pydantic model class) and its nested models do not declare.
    Free-form fields (args, runtime_env, user_config, ... typed as plain dicts) are not descended into."""
    if not isinstance(value, dict):
        return [f"{path or '<root>'}: expected a mapping, got {type(value).__name__}"]
    fields = _field_names(model)
    bad = []
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            bad.append(f"{where}: unknown key for {model.__name__} (known: {', '.join(sorted(model.model_fields))})")
            continue
        nested = _models_in(fields[key])
        if not nested:
            continue
        if isinstance(sub, dict):
            bad.extend(unknown_keys(sub, nested[0], where))
        elif isinstance(sub, list):
            for i, item in enumerate(sub):
                if isinstance(item, dict):
                    bad.extend(unknown_keys(item, nested[0], f"{where}[{i}]"))
    return bad


def serve_config_errors(cfg: dict) -> list[str]:
    """ServeDeploySchema validation plus the strict key check."""
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(cfg)
    except Exception as e:  # pydantic.ValidationError
        return [f"ServeDeploySchema: {e}"]
    return unknown_keys(cfg, ServeDeploySchema)


def test_strict_serve_key_check_covers_nested_models():
    """The walker really reaches deployments, autoscaling_config and ray_actor_options."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    assert _models_in(_field_names(ServeDeploySchema)["applications"]) == [ServeApplicationSchema]
    assert _models_in(_field_names(ServeApplicationSchema)["deployments"]) == [DeploymentSchema]
    assert AutoscalingConfig in _models_in(_field_names(DeploymentSchema)["autoscaling_config"])
    assert RayActorOptionsSchema in _models_in(_field_names(DeploymentSchema)["ray_actor_options"])


# ---------------------------------------------------------------------------------------------------------
# Manifests against the CRDs


def test_cluster_dir_has_the_manifests():
    names = {p.name for p in _manifest_paths()}
    assert {"rayservice-cpu.yaml", "rayservice-gpu.yaml", "rayjob-extract.yaml"} <= names, names
    assert len(_rayservices()) == 2 and len(_rayjobs()) == 1


@pytest.mark.parametrize("name,index,doc", _all_docs(), ids=lambda v: v if isinstance(v, str) else None)
def test_manifest_validates(name, index, doc):
    if doc.get("kind") == "Secret":
        errors = secret_errors(doc)
    else:
        _require_kuberay()
        errors = crd_errors(doc)
    assert not errors, f"{name} document {index} ({doc.get('kind')}):\n  " + "\n  ".join(errors)


def _one_rayservice() -> dict:
    return copy.deepcopy(dict(_rayservices())["rayservice-cpu.yaml"])


def test_validator_rejects_unknown_keys():
    """The closed-object check can fail: a misspelt key at each level is an error, the original is not."""
    _require_kuberay()
    doc = _one_rayservice()
    assert crd_errors(doc) == []

    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert any("enableInTreeAutoscalling" in e for e in crd_errors(bad))

    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in crd_errors(bad))

    bad = copy.deepcopy(doc)  # inside the embedded pod template (core/v1 schema)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert any("imagePullPolice" in e for e in crd_errors(bad))

    bad = copy.deepcopy(doc)  # a wrong type is still an error too
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "3"
    assert any("maxReplicas" in e for e in crd_errors(bad))

    bad = copy.deepcopy(doc)
    bad["apiVersion"] = "ray.io/v1alpha2"
    assert any("apiVersion" in e for e in crd_errors(bad))


def test_close_schema_respects_preserve_unknown_fields_and_int_or_string():
    schema = close_schema({
        "type": "object",
        "properties": {
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "map": {"type": "object", "additionalProperties": {
                "anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}},
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        },
    })
    v = jsonschema.Draft4Validator(schema)
    assert v.is_valid({"open": {"a": "x", "anything": 1}, "map": {"cpu": "500m", "gpu": 1}, "port": 8000})
    assert v.is_valid({"port": "serve"})
    assert not v.is_valid({"closed": {"a": "x", "b": 1}})
    assert not v.is_valid({"extra": 1})
    assert not v.is_valid({"map": {"cpu": 0.5}})


# ---------------------------------------------------------------------------------------------------------
# Serve configs


@pytest.mark.parametrize("path", [SERVE_CONFIG, SERVE_CONFIG_GPU], ids=lambda p: p.name)
def test_serve_config_yaml_strict(path):
    errors = serve_config_errors(yaml.load(path.read_text(), Loader=_Loader))
    assert not errors, f"{path.name}:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("name,doc", _rayservices(), ids=lambda v: v if isinstance(v, str) else None)
def test_serve_config_v2_strict(name, doc):
    cfg = _serve_config_v2(doc)
    errors = serve_config_errors(cfg)
    assert not errors, f"{name} serveConfigV2:\n  " + "\n  ".join(errors)
    # On Kubernetes the proxies must be reachable from the Services KubeRay creates.
    http = cfg.get("http_options") or {}
    assert http.get("host", "0.0.0.0") == "0.0.0.0", f"{name}: proxies must listen on 0.0.0.0, not {http.get('host')}"
    port = http.get("port", 8000)
    for group, container in _ray_containers(doc):
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve") == port, f"{name} {group}: container port `serve` must be {port}"


def test_strict_check_rejects_misspelt_serve_keys():
    """Ray's schema accepts these (and would silently drop them); the strict check does not."""
    from ray.serve.schema import ServeDeploySchema

    cfg = copy.deepcopy(_local_serve_config())
    dep = cfg["applications"][0]["deployments"][0]
    dep["max_ongoing_request"] = 8
    dep["autoscaling_config"]["target_ongoing_request"] = 2
    dep["ray_actor_options"]["num_cpu"] = 1
    cfg["applications"][0]["rout_prefix"] = "/x"
    ServeDeploySchema.model_validate(cfg)  # Ray itself does not object
    errors = serve_config_errors(cfg)
    for key in ("max_ongoing_request", "target_ongoing_request", "num_cpu", "rout_prefix"):
        assert any(f".{key}:" in e for e in errors), (key, errors)
    assert len(errors) == 4


def _app(cfg: dict, name: str = APP_NAME) -> dict:
    apps = {a["name"]: a for a in cfg["applications"]}
    assert name in apps, f"no application {name!r} (have {sorted(apps)})"
    return apps[name]


def _deployments(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments", [])}


def apply_gpu_overrides(applications: list[dict]) -> list[dict]:
    """serve_config.yaml's applications as the GPU manifest must have them."""
    apps = copy.deepcopy(applications)
    app = _app({"applications": apps})
    for (deployment, field), value in GPU_OVERRIDES.items():
        target = app if deployment is None else _deployments(app)[deployment]
        *parents, leaf = field.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = copy.deepcopy(value)
    return apps


def sync_errors(manifest: str, applications: list[dict], local_applications: list[dict]) -> list[str]:
    expected = apply_gpu_overrides(local_applications) if manifest == GPU_MANIFEST else local_applications
    if applications == expected:
        return []
    errors = []
    got_apps, want_apps = {a["name"]: a for a in applications}, {a["name"]: a for a in expected}
    if set(got_apps) != set(want_apps):
        return [f"applications {sorted(got_apps)} != {sorted(want_apps)}"]
    for name, want in want_apps.items():
        got = got_apps[name]
        for key in sorted(set(got) | set(want)):
            if key == "deployments":
                g, w = _deployments(got), _deployments(want)
                for dname in sorted(set(g) | set(w)):
                    if g.get(dname) != w.get(dname):
                        errors.append(f"{name}.deployments[{dname}]: {g.get(dname)} != expected {w.get(dname)}")
            elif got.get(key) != want.get(key):
                errors.append(f"{name}.{key}: {got.get(key)!r} != expected {want.get(key)!r}")
    return errors


@pytest.mark.parametrize("name,doc", _rayservices(), ids=lambda v: v if isinstance(v, str) else None)
def test_serve_config_v2_applications_match_serve_config_yaml(name, doc):
    errors = sync_errors(name, _serve_config_v2(doc)["applications"], _local_serve_config()["applications"])
    extra = " (allowed GPU overrides: tests/cluster/test_manifests.py GPU_OVERRIDES)" if name == GPU_MANIFEST else ""
    assert not errors, f"{name} serveConfigV2 differs from serve_config.yaml{extra}:\n  " + "\n  ".join(errors)


def test_serve_config_gpu_yaml_is_serve_config_yaml_with_the_gpu_overrides():
    local = _local_serve_config()
    gpu = _local_gpu_serve_config()
    assert {k: v for k, v in gpu.items() if k != "applications"} == {k: v for k, v in local.items() if k != "applications"}
    errors = sync_errors(GPU_MANIFEST, gpu["applications"], local["applications"])
    assert not errors, "serve_config.gpu.yaml differs from serve_config.yaml beyond GPU_OVERRIDES:\n  " + "\n  ".join(errors)


def test_gpu_overrides_are_complete_actor_options():
    """A config's ray_actor_options replaces the code's whole dict: each override keeps every key the local one
    sets, and its resources fit what it asks for."""
    local = _deployments(_app(_local_serve_config()))
    for (deployment, field), value in GPU_OVERRIDES.items():
        if field != "ray_actor_options":
            continue
        missing = set(local[deployment].get("ray_actor_options", {})) - set(value)
        assert not missing, f"GPU override of {deployment}.ray_actor_options drops {sorted(missing)}"
        assert value.get("num_gpus", 0) > 0


def test_sync_check_rejects_undocumented_gpu_difference():
    local = _local_serve_config()["applications"]
    assert sync_errors(GPU_MANIFEST, apply_gpu_overrides(local), local) == []
    assert sync_errors("rayservice-cpu.yaml", apply_gpu_overrides(local), local)  # overrides are GPU-only
    changed = apply_gpu_overrides(local)
    _deployments(_app({"applications": changed}))["SAEShard"]["max_ongoing_requests"] = 1
    assert any("SAEShard" in e for e in sync_errors(GPU_MANIFEST, changed, local))
    changed = apply_gpu_overrides(local)
    _app({"applications": changed})["args"]["token_limit"] = 1
    assert any(".args" in e for e in sync_errors(GPU_MANIFEST, changed, local))


def _all_serve_configs() -> list[tuple[str, dict]]:
    return [("serve_config.yaml", _local_serve_config()), ("serve_config.gpu.yaml", _local_gpu_serve_config())] + \
        [(n, _serve_config_v2(d)) for n, d in _rayservices()]


def gpu_request_errors(cfg: dict) -> list[str]:
    """A config's GPU requests for the computing replicas, as Ray will apply them: the config's own
    ray_actor_options where it writes them (they replace the code's), else what build_app sets."""
    from ingress.args import AppArgs
    from ingress.resources import is_gpu_device, plan_for_args

    app = _app(cfg)
    args = AppArgs.model_validate(app.get("args") or {})
    deployments = _deployments(app)
    errors = []
    for name in GPU_DEPLOYMENTS:
        written = (deployments.get(name) or {}).get("ray_actor_options")
        if args.resources.device == "auto":
            if written is not None and not written.get("num_gpus"):
                errors.append(f"{name}: device auto with ray_actor_options that request no GPU: on a GPU node the "
                              "replica would use the GPU unaccounted (say device: cpu, or request num_gpus)")
            continue
        if written is not None:
            gpus = written.get("num_gpus", 0)
        else:
            gpus = plan_for_args(args, gpus_available=False).num_gpus.get(name, 0)
        if is_gpu_device(args.resources.device) and not gpus > 0:
            errors.append(f"{name}: device {args.resources.device} but no GPU requested")
        if args.resources.device == "cpu" and gpus:
            errors.append(f"{name}: device cpu but {gpus} GPUs requested")
    return errors


@pytest.mark.parametrize("source,cfg", _all_serve_configs(), ids=lambda v: v if isinstance(v, str) else None)
def test_non_cpu_devices_request_gpus(source, cfg):
    errors = gpu_request_errors(cfg)
    assert not errors, f"{source}:\n  " + "\n  ".join(errors)


def test_gpu_request_check_can_fail():
    cfg = copy.deepcopy(_local_gpu_serve_config())
    assert gpu_request_errors(cfg) == []
    del _deployments(_app(cfg))["SAEShard"]["ray_actor_options"]["num_gpus"]
    assert any("SAEShard" in e for e in gpu_request_errors(cfg))
    cfg = copy.deepcopy(_local_serve_config())
    _app(cfg)["args"]["resources"]["device"] = "auto"  # with the CPU config's num_cpus-only actor options
    assert len(gpu_request_errors(cfg)) == 2
    del _deployments(_app(cfg))["ModelDeployment"]["ray_actor_options"]
    del _deployments(_app(cfg))["SAEShard"]["ray_actor_options"]
    assert gpu_request_errors(cfg) == []  # auto left to the code: ingress.resources adds the GPU request


def test_deployment_names_match_code():
    """Names in the configs are the names of the Deployment objects the code builds (a config entry whose name
    matches no deployment is an error at deploy time; a renamed deployment would silently lose its options)."""
    from ray.serve import Deployment

    objects = {
        "ingress.app": "SAEServeIngress",
        "deployments.model": "ModelDeployment",
        "deployments.sae_shard": "SAEShard",
    }
    code_names = set()
    for module_name, attr in objects.items():
        module = importlib.import_module(module_name)  # ImportError here: the module is missing or broken
        obj = getattr(module, attr, None)
        assert isinstance(obj, Deployment), f"{module_name}.{attr} is not a Ray Serve Deployment (got {obj!r})"
        code_names.add(obj.name)
    for source, cfg in _all_serve_configs():
        app = _app(cfg)
        names = set(_deployments(app))
        assert names == code_names, f"{source}: deployments {sorted(names)} != code's {sorted(code_names)}"
        module_name, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module_name), attr)), f"{source}: import_path {app['import_path']}"


def test_app_args_validate():
    """`args` reach ingress.args.AppArgs (unknown keys forbidden) when the app is built; check them now."""
    from ingress.args import AppArgs

    for source, cfg in _all_serve_configs():
        args = _app(cfg).get("args") or {}
        AppArgs.model_validate(args)
        assert "secret" not in args or source == "serve_config.yaml", f"{source}: put the secret in a Kubernetes Secret"


# ---------------------------------------------------------------------------------------------------------
# What the API server accepts but KubeRay/Ray would not run as intended


def _groups(doc: dict) -> list[tuple[str, dict]]:
    rc = doc["spec"]["rayClusterConfig"]
    return [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc.get("workerGroupSpecs", [])]


def _ray_containers(doc: dict) -> list[tuple[str, dict]]:
    return [(name, g["template"]["spec"]["containers"][0]) for name, g in _groups(doc)]


def _cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def advertised(group: dict) -> dict[str, float]:
    """Ray resources a Pod of this group advertises, the way KubeRay derives them."""
    res = {}
    container = group["template"]["spec"]["containers"][0]
    limits = (container.get("resources") or {}).get("limits") or {}
    requests = (container.get("resources") or {}).get("requests") or {}
    start = group.get("rayStartParams") or {}
    cpu = limits.get("cpu", requests.get("cpu"))
    if cpu is not None:
        res["CPU"] = float(int(-(-_cpu_quantity(cpu) // 1)))  # KubeRay rounds the CPU limit up
    gpu = limits.get("nvidia.com/gpu")
    if gpu is not None:
        res["GPU"] = float(gpu)
    if "num-cpus" in start:
        res["CPU"] = float(start["num-cpus"])
    if "num-gpus" in start:
        res["GPU"] = float(start["num-gpus"])
    for name, quantity in (group.get("resources") or {}).items():
        key = {"cpu": "CPU", "gpu": "GPU", "nvidia.com/gpu": "GPU"}.get(name.lower(), name)
        res[key] = _cpu_quantity(quantity) if key != "CPU" else float(int(-(-_cpu_quantity(quantity) // 1)))
    return res


def demand(deployment: dict) -> dict[str, float]:
    opts = deployment.get("ray_actor_options") or {}
    d = {"CPU": float(opts.get("num_cpus", 1)), "GPU": float(opts.get("num_gpus", 0))}
    d.update({k: float(v) for k, v in (opts.get("resources") or {}).items()})
    return {k: v for k, v in d.items() if v > 0}


def _fits(need: dict[str, float], have: dict[str, float], times: int = 1) -> bool:
    return all(have.get(k, 0.0) >= v * times - 1e-9 for k, v in need.items())


def kuberay_errors(doc: dict) -> list[str]:
    """The RayService checks that matter here from KubeRay's ValidateRayClusterSpec, plus placement sanity."""
    errors = []
    rc = doc["spec"]["rayClusterConfig"]
    autoscaling = rc.get("enableInTreeAutoscaling", False)
    v2 = (rc.get("autoscalerOptions") or {}).get("version") == "v2"
    if not autoscaling:
        errors.append("enableInTreeAutoscaling must be true (Serve autoscaling needs worker Pods on demand)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) or len(doc["metadata"]["name"]) > 47:
        errors.append("RayService name must be a DNS-1035 label of at most 47 characters")
    for name, g in _groups(doc):
        start = g.get("rayStartParams") or {}
        if any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{name}: resources set both in rayStartParams and resources")
        if "labels" in start:
            errors.append(f"{name}: rayStartParams.labels is not supported; use labels")
        if name != "head":
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            if not 0 <= lo <= g.get("replicas", lo) <= hi:
                errors.append(f"{name}: need 0 <= minReplicas <= replicas <= maxReplicas")
            if g.get("idleTimeoutSeconds") is not None and not v2:
                errors.append(f"{name}: idleTimeoutSeconds needs autoscalerOptions.version v2")
    head = rc["headGroupSpec"]
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        errors.append('head must advertise no CPUs (rayStartParams num-cpus: "0") so it runs no replicas')
    if rc.get("rayVersion") != _ray_version():
        errors.append(f"rayVersion {rc.get('rayVersion')} != installed ray {_ray_version()}")

    # Every deployment fits some worker group, and the groups' maxReplicas hold every deployment's max_replicas.
    workers = [(n, advertised(g), g.get("maxReplicas", 0)) for n, g in _groups(doc) if n != "head"]
    deployments = _deployments(_app(_serve_config_v2(doc)))
    total_cpu_demand = 0.0
    for dname, dep in deployments.items():
        need = demand(dep)
        most = (dep.get("autoscaling_config") or {}).get("max_replicas", dep.get("num_replicas", 1))
        homes = [(n, have, mx) for n, have, mx in workers if _fits(need, have)]
        if not homes:
            errors.append(f"{dname} needs {need}: no worker group offers that")
            continue
        pinned = [k for k in need if k not in ("CPU", "GPU")]
        if pinned:  # custom resources: count whole Pods of the groups that offer them
            room = sum(int(min(have[k] / need[k] for k in need)) * mx for _, have, mx in homes)
            if room < most:
                errors.append(f"{dname}: max_replicas {most} but its groups hold {room}")
        else:
            total_cpu_demand += need.get("CPU", 0) * most
    free_cpu = sum(have.get("CPU", 0) * mx for n, have, mx in workers
                   if not any(k not in ("CPU", "GPU") for k in have))
    if total_cpu_demand > free_cpu + 1e-9:
        errors.append(f"unpinned deployments need {total_cpu_demand} CPUs at max_replicas; groups offer {free_cpu}")
    # GPUs: every GPU replica at max_replicas fits the GPU groups' cards (fractions pack onto shared cards), and
    # nothing that asks for no GPU fits a GPU group (it would keep GPU Pods from scaling down)
    gpu_demand = sum(demand(dep).get("GPU", 0) * (dep.get("autoscaling_config") or {}).get("max_replicas", dep.get("num_replicas", 1))
                     for dep in deployments.values())
    gpu_supply = sum(have.get("GPU", 0) * mx for _, have, mx in workers)
    if gpu_demand > gpu_supply + 1e-9:
        errors.append(f"GPU replicas need {gpu_demand} GPUs at max_replicas; groups offer {gpu_supply}")
    for dname, dep in deployments.items():
        need = demand(dep)
        if "GPU" not in need:
            on_gpu = [n for n, have, _ in workers if have.get("GPU") and _fits(need, have)]
            if on_gpu:
                errors.append(f"{dname} asks for no GPU but fits GPU group(s) {on_gpu}")
    return errors


@lru_cache(maxsize=None)
def _ray_version() -> str:
    import ray

    return ray.__version__


@pytest.mark.parametrize("name,doc", _rayservices(), ids=lambda v: v if isinstance(v, str) else None)
def test_rayservice_runs_as_intended(name, doc):
    errors = kuberay_errors(doc)
    assert not errors, f"{name}:\n  " + "\n  ".join(errors)


def test_kuberay_checks_can_fail():
    doc = _one_rayservice()
    assert kuberay_errors(doc) == []
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "2"
    assert any("head" in e for e in kuberay_errors(bad))
    gpu = copy.deepcopy(dict(_rayservices())[GPU_MANIFEST])
    assert kuberay_errors(gpu) == []
    no_card = copy.deepcopy(gpu)
    for g in no_card["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for where in ("limits", "requests"):
            g["template"]["spec"]["containers"][0].get("resources", {}).get(where, {}).pop("nvidia.com/gpu", None)
    assert any("SAEShard" in e for e in kuberay_errors(no_card))
    greedy = copy.deepcopy(gpu)  # a whole card per SAE replica: 4 more cards than the group has
    app = _app(_serve_config_v2(greedy))
    _deployments(app)["SAEShard"]["ray_actor_options"]["num_gpus"] = 1
    greedy["spec"]["serveConfigV2"] = yaml.safe_dump({**_serve_config_v2(greedy), "applications": [app]})
    assert any("GPUs at max_replicas" in e for e in kuberay_errors(greedy))
    cpu_on_gpu = copy.deepcopy(gpu)  # GPU Pods advertising CPUs: ingress replicas could land there
    for g in cpu_on_gpu["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        if g["groupName"] == "gpu":
            g["rayStartParams"] = {}
    assert any("SAEServeIngress asks for no GPU" in e for e in kuberay_errors(cpu_on_gpu))


@pytest.mark.parametrize("name,doc", _rayservices(), ids=lambda v: v if isinstance(v, str) else None)
def test_pods_secret_probes_image(name, doc):
    secret_names = {d["metadata"]["name"] for _, _, d in _all_docs() if d.get("kind") == "Secret"}
    assert SECRET_NAME in secret_names, "cluster/ should hold an example Secret for the API secret"
    flavour = "gpu" if name == GPU_MANIFEST else "cpu"
    images = set()
    for group, c in _ray_containers(doc):
        env = {e["name"]: e for e in c.get("env", [])}
        ref = (env.get("SECRET", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        assert ref.get("name") == SECRET_NAME and ref.get("key") == "SECRET", f"{group}: env SECRET via secretKeyRef"
        assert not ref.get("optional"), f"{group}: the secret must not be optional (fail closed)"
        assert c.get("readinessProbe") and c.get("livenessProbe"), f"{group}: probes"
        images.add(c["image"])
        limits = (c.get("resources") or {}).get("limits") or {}
        wants_gpu = "nvidia.com/gpu" in limits
        assert not (wants_gpu and flavour == "cpu"), f"{group}: GPU limit in the CPU manifest"
    assert len(images) == 1 and next(iter(images)).endswith(f"-{flavour}"), images
    if flavour == "gpu":
        gpu_groups = [n for n, c in _ray_containers(doc) if "nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})]
        assert gpu_groups, "GPU manifest without nvidia.com/gpu limits"


def test_gpu_dockerfile_asserts_a_cuda_torch():
    """The GPU image's build fails on a CPU-only torch: its check, run here with this machine's torch."""
    import subprocess
    import sys

    import torch

    text = (CLUSTER / "Dockerfile.gpu").read_text()
    runs = [line for line in text.splitlines() if line.startswith("RUN python -c") and "torch.version.cuda" in line]
    assert len(runs) == 1, "Dockerfile.gpu: one RUN python -c line that asserts torch.version.cuda"
    code = shlex.split(runs[0][len("RUN "):])[2]

    def check(want: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code.replace("${TORCH_CUDA}", want)], capture_output=True, text=True)

    if torch.version.cuda is None:  # this machine: the build would stop here, with a message
        r = check("")
        assert r.returncode != 0 and "not a CUDA build" in r.stderr, r.stderr
    else:
        assert check("").returncode == 0
        r = check("0.0")
        assert r.returncode != 0 and "not 0.0" in r.stderr, r.stderr


def test_dockerfiles_match_ray_version():
    for flavour in ("cpu", "gpu"):
        text = (CLUSTER / f"Dockerfile.{flavour}").read_text()
        m = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
        assert m, f"Dockerfile.{flavour}: ARG RAY_IMAGE=rayproject/ray:<tag>"
        assert m.group(1) == f"{_ray_version()}-py311-{flavour}", m.group(1)
        assert "torch==${TORCH_VERSION}" in text and "pip install --no-cache-dir ." in text
        assert (CLUSTER / f"Dockerfile.{flavour}.dockerignore").is_file()


# ---------------------------------------------------------------------------------------------------------
# RayJob


def _entrypoint_args(job: dict) -> tuple[list[str], dict[str, str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    opts = {}
    for i, a in enumerate(argv):
        if a.startswith("--") and i + 1 < len(argv):
            opts[a] = argv[i + 1]
    return argv, opts


@pytest.mark.parametrize("name,job", _rayjobs(), ids=lambda v: v if isinstance(v, str) else None)
def test_rayjob_targets_the_service_cluster(name, job):
    spec = job["spec"]
    selector = spec.get("clusterSelector") or {}
    service_names = {d["metadata"]["name"] for _, d in _rayservices()}
    cluster = selector.get("ray.io/cluster", "")
    # A RayService's cluster is named <rayservice>-<5 random chars>; the manifest carries a placeholder of that shape.
    assert any(re.fullmatch(rf"{re.escape(s)}-[a-z0-9x]{{5}}", cluster) for s in service_names), cluster
    assert "rayClusterSpec" not in spec, "use the service's cluster, not a new one"
    assert spec.get("submissionMode", "K8sJobMode") != "SidecarMode", "clusterSelector does not support SidecarMode"
    assert not spec.get("backoffLimit"), "backoffLimit > 0 is rejected with clusterSelector"
    assert not spec.get("suspend"), "clusterSelector RayJobs cannot be suspended"
    assert not spec.get("shutdownAfterJobFinishes"), "the job must not shut the service down"

    argv, opts = _entrypoint_args(job)
    assert argv[:3] == ["python", "-m", "jobs.top_contexts"], argv
    for flag in ("--app", "--dataset", "--source", "--features", "--out"):
        assert flag in opts, f"entrypoint lacks {flag}"
    assert opts["--app"] == APP_NAME
    assert all(f.strip().isdigit() for f in opts["--features"].split(",")), opts["--features"]
    # The driver runs on the head (no entrypoint resources): its files must be on a head volume.
    assert not (spec.get("entrypointNumCpus") or spec.get("entrypointNumGpus") or spec.get("entrypointResources"))
    for svc_name, svc in _rayservices():
        head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        mounts = [m["mountPath"].rstrip("/") + "/" for m in head.get("volumeMounts", [])]
        for flag in ("--dataset", "--out"):
            assert any(opts[flag].startswith(m) for m in mounts), f"{flag} {opts[flag]} is on no head volume of {svc_name}"


@pytest.mark.parametrize("name,job", _rayjobs(), ids=lambda v: v if isinstance(v, str) else None)
def test_rayjob_entrypoint_flags_exist(name, job):
    """The entrypoint's module accepts every flag the manifest passes (read from its --help)."""
    import importlib.util
    import subprocess
    import sys

    argv, opts = _entrypoint_args(job)
    module = argv[2]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"package {module.split('.')[0]!r} does not exist yet (the bulk job is written separately); "
                    "this check runs once it does")
    assert importlib.util.find_spec(module) is not None, f"{name}: entrypoint module {module} not found"
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{module} --help failed:\n{out.stderr[-2000:]}"
    for flag in opts:
        assert flag in out.stdout, f"{name}: {module} does not document {flag}:\n{out.stdout}"


def serving_mode_errors(doc: dict) -> list[str]:
    """HAProxy ingress on every Ray pod; throughput-optimised Serve in the replicas only (the app's runtime_env),
    never on a pod, where RayJob drivers run and would lose synchronous handle calls."""
    errors = []
    for name, c in _ray_containers(doc):
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
            errors.append(f"{name}: no RAY_SERVE_ENABLE_HA_PROXY=1")
        for var, value in haproxy_env.DEFAULTS.items():
            if env.get(var) != value:
                errors.append(f"{name}: {var} is {env.get(var)!r}, not {value} (ingress.haproxy_env.DEFAULTS)")
        if "RAY_SERVE_THROUGHPUT_OPTIMIZED" in env:
            errors.append(f"{name}: RAY_SERVE_THROUGHPUT_OPTIMIZED on the pod (drivers there would lose .result())")
    for app in _serve_config_v2(doc).get("applications", []):
        env = (app.get("runtime_env") or {}).get("env_vars") or {}
        if env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
            errors.append(f"application {app.get('name')}: no RAY_SERVE_THROUGHPUT_OPTIMIZED in its runtime_env")
        # gRPC between replicas (batching.grpc_calls) without Serve's 4 MB cap, as AppArgs' replica_env has it
        cap = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
        if env.get(cap) != REPLICA_ENV[cap]:
            errors.append(f"application {app.get('name')}: {cap} in its runtime_env is {env.get(cap)!r}, not {REPLICA_ENV[cap]}")
    return errors


@pytest.mark.parametrize("name,doc", _rayservices(), ids=lambda v: v if isinstance(v, str) else None)
def test_rayservice_serving_mode(name, doc):
    assert serving_mode_errors(doc) == []
    broken = copy.deepcopy(doc)
    _ray_containers(broken)[0][1]["env"] = []
    assert serving_mode_errors(broken)  # the check can fail
    capped = copy.deepcopy(doc)
    raw = capped["spec"]["serveConfigV2"]
    capped["spec"]["serveConfigV2"] = raw.replace('RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH: "2147483647"',
                                                  'RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH: "4194304"')
    assert capped["spec"]["serveConfigV2"] != raw and serving_mode_errors(capped)
