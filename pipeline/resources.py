"""Fail fast on a request the cluster can never meet, instead of waiting for it forever.

Ray queues an actor or a worker group until resources appear, printing "No available node types can
fulfill resource request" every few seconds: right on an autoscaling cluster that will add the nodes, a hang
everywhere else (a teacher on `teacher.device=cuda` on a laptop). Each stage asks `require` before it starts
its actors or workers: the request is compared with what the cluster's nodes have in total (not what is free
now: two jobs sharing a cluster queue for each other as Ray normally does). A request that no set of the
current nodes can hold fails at once, naming the resource, what the nodes have and the key to change; on an
autoscaling cluster it is given `cluster.autoscaler_timeout_s` to appear first.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import PipelineError

log = logging.getLogger(__name__)

POLL_S = 5.0
# The cluster launcher (`ray up`) leaves this file on the head; Ray Tune reads the same marker. KubeRay
# clusters with the autoscaler on say so through DIVA_AUTOSCALING=1 in the head's environment (infra/k8s).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class ResourceUnavailable(PipelineError):
    """A stage asked for more than the cluster has (and no autoscaler added it in time)."""


def autoscaling() -> bool:
    """Whether this cluster can add nodes: launched by `ray up`, or marked by DIVA_AUTOSCALING=1."""
    flag = os.environ.get("DIVA_AUTOSCALING")
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "yes")
    return Path(BOOTSTRAP_CONFIG).expanduser().exists()


def placeable(per_unit: Mapping[str, float], nodes: list[Mapping[str, float]]) -> float:
    """How many units of `per_unit` (one actor's or worker's resources) the nodes hold at once, each unit on
    one node (Ray never splits an actor's resources across nodes)."""
    asked = {k: v for k, v in per_unit.items() if v > 0}
    if not asked:
        return math.inf if nodes else 0
    return sum(min(int(node.get(k, 0.0) / v + 1e-9) for k, v in asked.items()) for node in nodes)


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (CPU, GPU, TPU, memory, custom), without Ray's per-node labels."""
    import ray

    return [{k: v for k, v in n["Resources"].items() if not k.startswith("node:") and not k.endswith("_group")}
            for n in ray.nodes() if n.get("Alive")]


def require(per_unit: Mapping[str, float], units: int, *, what: str, change: str, timeout_s: float) -> None:
    """Return once `units` of `per_unit` fit on the cluster's nodes; else raise ResourceUnavailable, at once or,
    on an autoscaling cluster, after waiting `timeout_s` for nodes to appear."""
    waiting = autoscaling()
    t0 = time.monotonic()
    while True:
        nodes = cluster_nodes()
        if placeable(per_unit, nodes) >= units:
            return
        waited = time.monotonic() - t0
        if not waiting or waited >= timeout_s:
            raise ResourceUnavailable(_message(per_unit, units, nodes, what, change, waiting, waited))
        if waited == 0:
            log.warning("%s needs %d x %s, more than the cluster has now; waiting up to %.0f s for the autoscaler "
                        "(cluster.autoscaler_timeout_s)", what, units, dict(per_unit), timeout_s)
        time.sleep(min(POLL_S, max(0.0, timeout_s - waited)))


def _message(per_unit: Mapping[str, float], units: int, nodes: list[dict[str, float]], what: str, change: str,
             waiting: bool, waited: float) -> str:
    asked = ", ".join(f"{k} {v:g}" for k, v in per_unit.items() if v > 0)
    short = sorted(k for k, v in per_unit.items() if v > 0 and not any(n.get(k, 0.0) >= v for n in nodes))
    shown = {*per_unit, "CPU", "GPU", "TPU"}
    have = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in shown) for n in nodes) or "no nodes"
    why = f"no node has {', '.join(short)}" if short else f"its nodes hold {placeable(per_unit, nodes)} at once"
    after = f" (waited {waited:.0f} s for the autoscaler: cluster.autoscaler_timeout_s)" if waiting else \
        ", and it cannot add nodes"
    return (f"{what} asks for {units} x [{asked}], which this cluster can never give: {why}{after}. "
            f"The cluster's nodes have: {have}. Change {change}.")


def task_retries(cluster: Any) -> dict[str, int]:
    """Ray remote args of a Ray Data map or write task: run it again, up to `cluster.task_retries` times, when its
    worker process dies. An exception the task raises is not retried (a corrupt file fails at once). A rerun gives
    the same output: the work is deterministic and a file is published whole (cache.split_sink)."""
    return {"max_retries": cluster.task_retries}


def actor_restarts(cluster: Any) -> dict[str, int]:
    """Ray remote args of an actor pool's actors: restart a dead actor's process, up to `cluster.actor_restarts`
    times, and rerun the batches it held (written explicitly: Ray Data's defaults for both are unbounded)."""
    return {"max_restarts": cluster.actor_restarts, "max_task_retries": cluster.actor_restarts}
