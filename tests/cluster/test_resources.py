"""GPU requests of the computing replicas (ingress.resources), as AppArgs, the CLI and build_app apply them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ingress.args import AppArgs
from ingress.resources import DEFAULT_GPUS, MODEL, SAE, plan


def test_plan_cpu_and_gpu():
    assert plan("cpu").device == "cpu" and plan("cpu").num_gpus == {}
    p = plan("cuda")
    assert p.device == "cuda" and p.num_gpus == DEFAULT_GPUS
    # the defaults share one card between every replica the code's autoscaling allows (max 2 model, 4 SAE)
    assert 2 * p.num_gpus[MODEL] + 4 * p.num_gpus[SAE] == 1
    assert plan("cuda", num_gpus=1).num_gpus == {MODEL: 1, SAE: 1}
    assert plan("cuda", num_gpus=0.5, sae_num_gpus=0.2).num_gpus == {MODEL: 0.5, SAE: 0.2}
    assert plan("cuda:0", model_num_gpus=1).num_gpus == {MODEL: 1, SAE: DEFAULT_GPUS[SAE]}
    assert plan("auto", gpus_available=True) == plan("cuda")
    assert plan("auto", gpus_available=False) == plan("cpu")
    assert plan("auto", num_gpus=0.5, gpus_available=False).num_gpus == {}  # no GPUs to give


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="cpu", num_gpus=1), "device is cpu"),
    (dict(device="cpu", sae_num_gpus=0.5), "device is cpu"),
    (dict(device="cuda", num_gpus=0), "unaccounted"),
    (dict(device="cuda", num_gpus=1, model_num_gpus=0), "model_num_gpus"),
    (dict(device="cuda:1"), "CUDA_VISIBLE_DEVICES"),
    (dict(device="tpu"), "device must be"),
])
def test_bad_gpu_settings_are_config_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        AppArgs(**kwargs)


def test_actor_options_keep_the_codes_and_add_gpus():
    p = plan("cuda")
    assert p.actor_options(MODEL, {"num_cpus": 0.5}) == {"num_cpus": 0.5, "num_gpus": DEFAULT_GPUS[MODEL]}
    assert p.actor_options("SAEServeIngress", {"num_cpus": 0.25}) == {"num_cpus": 0.25}
    assert plan("cpu").actor_options(SAE, {"num_cpus": 0.25}) == {"num_cpus": 0.25}


def _bound(app) -> dict:
    """{deployment name: (ray_actor_options, device arg)} of a built application, without starting Ray."""
    out = {}
    ingress = app._bound_deployment
    for a in ingress.init_args:
        d = getattr(a, "_bound_deployment", None)
        if d is not None:
            device = d.init_args[1]  # ModelDeployment(model, device, ...), SAEShard(specs, device, ...)
            out[d.name] = (d.ray_actor_options, device)
    out[ingress.name] = (ingress.ray_actor_options, None)
    return out


@pytest.mark.parametrize("args,gpus", [
    (dict(device="cuda"), DEFAULT_GPUS),
    (dict(device="cuda", num_gpus=1), {MODEL: 1, SAE: 1}),
    (dict(device="cuda", sae_num_gpus=0.5, deployment_options={"SAEShard": {"num_replicas": 2}}),
     {MODEL: DEFAULT_GPUS[MODEL], SAE: 0.5}),
])
def test_build_app_requests_gpus_for_a_gpu_device(args, gpus):
    """Any non-CPU device: ModelDeployment and SAEShard ask Ray for GPUs and are told `cuda`; the ingress asks for none."""
    from ingress.app import build_app

    bound = _bound(build_app(AppArgs(**args)))
    for name in (MODEL, SAE):
        opts, device = bound[name]
        assert opts["num_gpus"] == gpus[name] and opts["num_cpus"] > 0 and device == "cuda", (name, opts, device)
    assert "num_gpus" not in bound["SAEServeIngress"][0]


def test_build_app_on_cpu_and_auto_without_gpus():
    from ingress.app import build_app

    for device in ("cpu", "auto"):  # no GPU on this machine and no Ray cluster: auto is the CPU, said explicitly
        bound = _bound(build_app(AppArgs(device=device)))
        for name in (MODEL, SAE):
            opts, dev = bound[name]
            assert "num_gpus" not in opts and dev == "cpu", (device, name, opts, dev)


def test_user_actor_options_win_over_the_plan():
    from ingress.app import build_app

    bound = _bound(build_app(AppArgs(device="cuda", replica_env={}, deployment_options={
        "ModelDeployment": {"ray_actor_options": {"num_gpus": 1, "resources": {"model_node": 1}}}})))
    assert bound[MODEL][0] == {"num_cpus": 0.5, "num_gpus": 1, "resources": {"model_node": 1}}


def test_cli_gpu_flags():
    from ingress.cli import args_from_flags, build_parser

    p = build_parser()
    a = args_from_flags(p.parse_args(["--device", "cuda", "--num_gpus", "0.5", "--sae-num-gpus", "0.2"]), p)
    r = a.resources
    assert (r.device, r.num_gpus, r.model_num_gpus, r.sae_num_gpus) == ("cuda", 0.5, None, 0.2)
    with pytest.raises(SystemExit) as e:
        args_from_flags(p.parse_args(["--device", "cpu", "--num_gpus", "1"]), p)
    assert e.value.code == 2


def test_replica_env_reaches_every_deployment_and_user_env_wins():
    """Throughput-optimised Serve is on in every replica by default (never in the driver: it would break its
    synchronous handle calls), merged under the env a deployment option gives."""
    from ingress.app import build_app
    from ingress.args import REPLICA_ENV

    bound = _bound(build_app(AppArgs(device="cpu")))
    for name, (actor, _) in bound.items():
        assert actor["runtime_env"]["env_vars"] == REPLICA_ENV, name  # glibc's malloc kept from unmapping too
    mine = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "X": "1"}}}}
    bound = _bound(build_app(AppArgs(device="cpu", deployment_options={"SAEShard": mine})))
    assert bound[SAE][0]["runtime_env"]["env_vars"] == {**REPLICA_ENV, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "X": "1"}
    bound = _bound(build_app(AppArgs(device="cpu", replica_env={})))
    assert all("runtime_env" not in actor for actor, _ in bound.values())
