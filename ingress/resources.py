"""GPUs for the replicas that compute: what each ModelDeployment and SAEShard replica asks Ray for, and the device
it is told to use, decided once when the application is built.

Why here and not in the replicas: with Ray 2.60 an actor that asks for no GPU still sees every GPU of its node
(Ray no longer blanks ``CUDA_VISIBLE_DEVICES`` for zero-GPU actors), so a replica left to pick ``auto`` itself
would put model and SAE replicas on GPU 0 with no accounting. So ``auto`` is resolved here, to ``cuda`` when
the cluster has GPUs (or this machine, before Ray starts) and to ``cpu`` otherwise, and a GPU device always comes
with a GPU request. Fractions share a card: by default a model replica takes 0.25 of one and an SAE replica
0.125, so one card holds every replica the default autoscaling allows (2 x 0.25 + 4 x 0.125 = 1). Ray assigns
each GPU replica its card through ``CUDA_VISIBLE_DEVICES``, so inside a replica the device is plain ``cuda``.

A ``ray_actor_options`` given in serve_config.yaml's ``deployments:`` replaces what this module sets (Ray applies
the file over the code); serve_config.gpu.yaml writes the GPU requests out for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL = "ModelDeployment"
SAE = "SAEShard"
DEFAULT_GPUS = {MODEL: 0.25, SAE: 0.125}


@dataclass(frozen=True)
class ResourcePlan:
    device: str  # what the replicas are told: "cpu" or "cuda"
    num_gpus: dict[str, float] = field(default_factory=dict)  # per deployment name; empty on the CPU

    def actor_options(self, name: str, code_options: dict | None) -> dict:
        """``ray_actor_options`` for a deployment: the code's, with its GPU request added."""
        opts = dict(code_options or {})
        if self.num_gpus.get(name):
            opts["num_gpus"] = self.num_gpus[name]
        return opts


def is_gpu_device(device: str) -> bool:
    return device.split(":", 1)[0] == "cuda"


def check_gpu_args(device: str, num_gpus: float | None, model_num_gpus: float | None,
                   sae_num_gpus: float | None) -> None:
    """Raise ValueError for combinations that cannot be meant (checked before anything starts)."""
    asked = {"num_gpus": num_gpus, "model_num_gpus": model_num_gpus, "sae_num_gpus": sae_num_gpus}
    if device == "cpu":
        given = {k: v for k, v in asked.items() if v}
        if given:
            raise ValueError(f"device is cpu but {given} asks for GPUs the replicas would hold and never use: "
                             "drop them, or set device: cuda (or auto)")
        return
    if device == "auto":
        return
    if not is_gpu_device(device):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device not in ("cuda", "cuda:0"):
        raise ValueError(f"device {device!r}: Ray gives each GPU replica its own card (CUDA_VISIBLE_DEVICES), which "
                         "the replica sees as its only device, so say device: cuda and let num_gpus place replicas")
    for name, value in (("model_num_gpus", model_num_gpus), ("sae_num_gpus", sae_num_gpus)):
        resolved = value if value is not None else num_gpus
        if resolved is not None and resolved <= 0:
            raise ValueError(f"device is cuda but {name} resolves to {resolved}: a replica without a GPU request "
                             "still sees every GPU, unaccounted (use fractions such as 0.25 to share a card)")


def plan(device: str, num_gpus: float | None = None, model_num_gpus: float | None = None,
         sae_num_gpus: float | None = None, *, gpus_available: bool = False) -> ResourcePlan:
    """The device and GPU requests for these settings; ``gpus_available`` decides ``auto``."""
    check_gpu_args(device, num_gpus, model_num_gpus, sae_num_gpus)
    if device == "auto":
        device = "cuda" if gpus_available else "cpu"
    if device == "cpu":
        return ResourcePlan("cpu")
    per = {MODEL: model_num_gpus, SAE: sae_num_gpus}
    return ResourcePlan("cuda", {name: per[name] if per[name] is not None else
                                 (num_gpus if num_gpus is not None else DEFAULT_GPUS[name]) for name in per})


def plan_for_args(args, gpus_available: bool | None = None) -> ResourcePlan:
    """``plan`` for an AppArgs (``gpus_available`` looked up when not given)."""
    if gpus_available is None:
        gpus_available = args.resources.device == "auto" and gpus_visible()
    r = args.resources
    return plan(r.device, r.num_gpus, r.model_num_gpus, r.sae_num_gpus, gpus_available=gpus_available)


def gpus_visible() -> bool:
    """Whether ``auto`` means GPUs: the Ray cluster's GPUs when Ray is up (the build runs in Serve's controller,
    whose node may have none while workers do), else this machine's."""
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except ImportError:
        pass
    import torch

    return torch.cuda.is_available()
