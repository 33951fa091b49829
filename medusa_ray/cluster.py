"""The one place that starts or joins a Ray cluster."""

from __future__ import annotations

import logging
import os

from medusa_ray.config import RayConfig

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
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if cfg.address:
        log.info("joining Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = local_num_cpus(cfg)
        log.info("starting a local Ray cluster with %d logical CPUs", num_cpus)
        store = int(cfg.object_store_gb * 2**30) if cfg.object_store_gb else None
        # "local" always starts a fresh cluster; without it ray.init() silently joins whatever cluster
        # `ray start` last left running on this machine.
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=store, runtime_env=runtime_env,
                 include_dashboard=False)
