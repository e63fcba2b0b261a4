"""Autoscaling on the work a replica holds, not only on the calls it has open.

Serve's default policy counts a replica's open handle calls. ModelDeployment and SAEShard receive batched calls:
an ingress replica has at most ``batching.model_calls_in_flight`` ModelDeployment calls out, each carrying every
prompt that queued meanwhile, and a model replica sends one SAEShard call per batch. Counted by calls, activation
traffic never reached ModelDeployment's ``target_ongoing_requests`` of 16 from one ingress replica, however long
its queue. So each of these replicas reports its load through Serve's custom autoscaling metrics
(``record_autoscaling_stats``: :data:`LOAD_METRIC`, in the units of a request) and :func:`load_policy` scales on
the larger of that and Serve's own count, by Serve's default rule. Delays, bounds and scaling factors still come
from the deployment's ``autoscaling_config`` (Serve applies them around any policy).

Units: ModelDeployment counts the prompts of feature jobs, captures and attention maps in its replica (queued, in a
forward pass or waiting on their SAE work), plus generations and lens runs under way; SAEShard counts the prompts
of its calls in flight (a call's items over its SAEs: one item per prompt and SAE). Kept free of torch and Ray
imports: Serve's controller imports it by path.
"""

from __future__ import annotations

from typing import Any

LOAD_METRIC = "saeserve_load"
POLICY = "deployments.autoscaling:load_policy"


def load_policy(ctx) -> tuple[float, dict[str, Any]]:
    """Replicas wanted: ``load / target``, Serve's default rule (``current * load / (target * current)``), where
    ``load`` is the larger of the replicas' reported :data:`LOAD_METRIC` (summed; each averaged over
    ``look_back_period_s``) and Serve's count of requests queued or running. ``ctx``: Serve's AutoscalingContext."""
    current = ctx.current_num_replicas
    if current == 0:
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(LOAD_METRIC) or {}
    load = max(float(ctx.total_num_requests), float(sum(reported.values())))
    return load / ctx.config.get_target_ongoing_requests(), {}


def with_load_policy(autoscaling_config: dict | None) -> dict | None:
    """``autoscaling_config`` with :func:`load_policy`, unless it names a policy of its own (or is None)."""
    if autoscaling_config is None or "policy" in autoscaling_config:
        return autoscaling_config
    return {**autoscaling_config, "policy": {"policy_function": POLICY}}
