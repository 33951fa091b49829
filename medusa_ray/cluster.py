"""The one place that starts or joins a Ray cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medusa_ray import compat, logs
from medusa_ray.config import RayConfig
from medusa_ray.errors import UserError

log = logging.getLogger(__name__)

# A Serve replica hosting vLLM and the Ray Data actors feeding it each claim a logical CPU. On a
# 2-core laptop Ray would otherwise advertise 2 CPUs and the Data actor would wait forever behind
# the replica, so local clusters advertise more logical CPUs than physical cores.
_MIN_LOCAL_CPUS = 8


def local_num_cpus(cfg: RayConfig) -> int:
    return cfg.num_cpus or max(_MIN_LOCAL_CPUS, os.cpu_count() or 1)


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or start a local cluster; a no-op when Ray is already up."""
    import ray


    if ray.is_initialized():
        return
    logs.adopt_library_loggers()  # before ray.init, which logs through Ray's own handler
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **logs.worker_env()},
                   # Every worker's log levels decide its stream (see medusa_ray/logs.py).
                   "worker_process_setup_hook": "medusa_ray.logs.worker_setup"}
    if cfg.address:
        log.info("joining Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = local_num_cpus(cfg)
        log.info("starting a local Ray cluster with %d logical CPUs", num_cpus)
        store = int(cfg.object_store_gb * 2**30) if cfg.object_store_gb else None
        # "local" always starts a fresh cluster; without it ray.init() silently joins whatever cluster
        # `ray start` last left running on this machine. The dashboard is what serves Ray's State API: Ray
        # Train's placement-group cleaner polls it every second and warns on each failure without it.
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=store, runtime_env=runtime_env,
                 include_dashboard=True, dashboard_port=_free_port())
        _owned["local"] = True
    logs.route_worker_lines()
    logs.adopt_library_loggers()


_owned = {"local": False}


def owns_cluster() -> bool:
    """Whether this process started the Ray cluster it is on (it ends with the process)."""
    import ray

    return _owned["local"] and ray.is_initialized()


def _free_port() -> int:
    """A dashboard port of its own: a second local cluster on the machine must not fight over 8265."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): stage results record where they ran."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - where we ran is information, never a failure
        return None


def run_task(fn, *args, name: str, num_cpus: float = 1, num_gpus: float = 0, **kwargs):
    """Run ``fn(*args, **kwargs)`` as a Ray task with these resources when Ray is up, else in this process.

    The driver of a job lives on the head node, which offers no CPUs and no GPU and has little memory: heavy
    work (export's weights and base lm_head, eval's vLLM engines) goes to a worker node this way. A ``UserError`` raised
    in the task is raised here as itself, so the CLI still prints one line.
    """
    import ray

    if not ray.is_initialized():
        return fn(*args, **kwargs)

    remote = ray.remote(fn).options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    try:
        return ray.get(remote.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise


def autoscaler_node_types() -> list[dict[str, float]] | None:
    """Resources of every node type the cluster's autoscaler can add.

    Read from the cluster config in the GCS, where a platform publishes one (open-source Ray 2.60's autoscalers
    don't), or from the cluster launcher's config on the head node (``~/ray_bootstrap_config.yaml``, where job
    drivers run). None when the cluster has no autoscaler that can add nodes (a fixed cluster: what it has now
    is all it will have). Raises ``LookupError`` when an autoscaler manages named node types we cannot read
    (KubeRay's, which keeps them in the RayCluster resource).
    """
    published = compat.gcs_node_group_resources()
    if published is not None:
        return published
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    if bootstrap.is_file():
        import yaml

        launcher = yaml.safe_load(bootstrap.read_text()) or {}
        return [dict(t.get("resources") or {}) for t in (launcher.get("available_node_types") or {}).values()
                if t.get("max_workers", 1) != 0]
    mapping = compat.autoscaler_node_type_mapping()
    if mapping:
        # A fixed cluster's monitor names every node's type after the node itself.
        if any(node_type != compat.readonly_node_type(node) for node, node_type in mapping.items()):
            raise LookupError("its autoscaler does not publish which node types it can add")
    return None


def resolve_accelerator(setting: str, key: str) -> str:
    """``gpu`` or ``cpu`` for a ``auto|gpu|cpu`` setting.

    ``auto`` means what the cluster can have, not what it has this second: a GPU pool scaled to zero reports no
    GPUs, yet asking for one makes the autoscaler add a node. So ``auto`` is ``gpu`` when the cluster has GPUs
    or its autoscaler can add a node type with GPUs; when an autoscaler runs whose node types can't be read, it
    refuses in one line rather than fall to CPU silently.
    """
    if setting in ("gpu", "cpu"):
        return setting
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return "gpu"

    try:
        node_types = autoscaler_node_types()
    except LookupError as exc:
        raise UserError(f"{key}=auto: the cluster has no GPU now and {exc}; set {key} explicitly "
                        "(gpu or cpu)") from None
    if node_types and any(resources.get("GPU", 0) > 0 for resources in node_types):
        return "gpu"
    return "cpu"


def torch_backend(use_gpu: bool) -> str:
    """The process group Ray Train builds: NCCL for GPU workers, gloo otherwise. A torch without NCCL (the
    CPU build, as on Ray nodes that declare logical GPUs without hardware) trains on CPU over gloo."""
    import torch.distributed as dist

    return "nccl" if use_gpu and dist.is_nccl_available() else "gloo"
