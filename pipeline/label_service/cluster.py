"""The Ray cluster the label workers run on: connecting (or starting one with its dashboard), and how many
workers and what GPU share each the cluster fits."""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional

from ..config import RunConfig
from ..errors import UserError

NAMESPACE = "pipeline"


def init_ray(run_cfg: RunConfig, address: Optional[str] = None) -> str:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local cluster with the dashboard on
    ``run.dashboard_host`` (token authentication stays at Ray's default: on). Returns the dashboard URL
    ("" when unknown). Reuses an already initialised Ray."""
    import ray

    if ray.is_initialized():
        return dashboard_url()
    address = address or run_cfg.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ctx = ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            ctx = ray.init(namespace=NAMESPACE, include_dashboard=True, dashboard_host=run_cfg.dashboard_host,
                           log_to_driver=False)
    except ConnectionError as exc:
        raise UserError(address or "ray", f"cannot connect to the Ray cluster ({exc})") from None
    return _http(ctx.dashboard_url or "")


def dashboard_url() -> str:
    """The connected cluster's dashboard URL, "" when it has none."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # no dashboard on this cluster
        return ""
    return _http(url or "")


def _http(url: str) -> str:
    return url if not url or url.startswith("http") else f"http://{url}"


def resolve_device(requested: str) -> str:
    """The teacher device inside a worker: "auto" means the GPU Ray assigned to this actor, if any."""
    if requested != "auto":
        return requested
    import ray

    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


def resolve_gpus_per_worker(requested: float, cluster_gpus: float, workers: int, device: str = "auto") -> float:
    """GPUs each label worker asks Ray for. ``requested`` >= 0 (``label.gpus_per_worker``) is used as given;
    a negative value means auto: an equal share of the cluster's GPUs, ``min(1, cluster_gpus / workers)``
    (rounded down to Ray's 1e-4 resource unit so the shares fit), and 0 when the cluster has no GPU or the
    teacher is pinned to the CPU (``teacher.device`` "cpu")."""
    if requested >= 0:
        return float(requested)
    if cluster_gpus <= 0 or workers < 1 or device == "cpu":
        return 0.0
    return math.floor(min(1.0, cluster_gpus / workers) * 10_000) / 10_000


def resolve_workers(requested: int | str, resources: Mapping[str, float], cpus_per_worker: float,
                    gpus_per_worker: float, device: str = "auto") -> int:
    """The label worker count: ``requested`` as given, or for "auto" as many as the cluster's CPUs allow at
    ``cpus_per_worker``, and with a GPU teacher (cluster GPUs, ``device`` not "cpu") no more than its GPUs allow
    (one each when ``gpus_per_worker`` is auto). Raises ``UserError`` for a count below 1."""
    if requested != "auto":
        if int(requested) < 1:
            raise UserError("label.workers", f"must be at least 1 or auto, got {requested}")
        return int(requested)
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    n = int(math.floor(cpus / cpus_per_worker + 1e-9)) if cpus_per_worker > 0 else int(cpus)
    if gpus > 0 and device != "cpu" and gpus_per_worker != 0:
        n = min(n, int(math.floor(gpus / (gpus_per_worker if gpus_per_worker > 0 else 1.0) + 1e-9)))
    if n < 1:
        raise UserError("label.workers", f"auto: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, not enough "
                                         f"for one worker at label.cpus_per_worker {cpus_per_worker:g}")
    return n


def check_fits(workers: int, resources: Mapping[str, float], cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Actors that do not fit would wait for resources forever: a ``UserError`` naming the shortfall instead."""
    for kind, per_worker, key in (("CPU", cpus_per_worker, "cpus_per_worker"),
                                  ("GPU", gpus_per_worker, "gpus_per_worker")):
        need, have = workers * per_worker, resources.get(kind, 0.0)
        if need > have + 1e-9:
            raise UserError("label.workers", f"{workers} workers x {per_worker:g} {kind}s need {need:g} {kind}s, "
                                             f"the Ray cluster has {have:g}: lower --workers or label.{key}")
