"""The real replica classes built in process on the demo pack (no Ray cluster): their methods run the same engine
code as in a Serve replica, and tests can call them directly or look inside mid-call."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

from deployments.engine.pack import local_sae_set_dirs
from deployments.specs import sae_spec_from_dir


@contextmanager
def demo_shard(pack_dir: Path, **kwargs):
    """An SAEShard holding the demo pack's ``res-demo`` SAEs on the CPU (``kwargs``: its constructor's options)."""
    from deployments.sae_shard import SAEShard

    cls = getattr(SAEShard, "func_or_class", SAEShard)
    specs = [dataclasses.asdict(sae_spec_from_dir(i, "res-demo", d)) for i, d in local_sae_set_dirs(pack_dir, "res-demo").items()]
    shard = cls(specs, **{"device": "cpu", "torch_threads": 1, "burst_torch_threads": 0, **kwargs})
    try:
        yield shard
    finally:
        shard.compute.shutdown()


@contextmanager
def demo_model(pack_dir: Path, **kwargs):
    """A ModelDeployment on the demo pack's model on the CPU, with no SAEShard to fan out to."""
    from deployments.model import ModelDeployment

    cls = getattr(ModelDeployment, "func_or_class", ModelDeployment)
    model = cls(str(pack_dir), **{"device": "cpu", "torch_threads": 1, "burst_torch_threads": 0, **kwargs})
    try:
        yield model
    finally:
        model.compute.shutdown()
