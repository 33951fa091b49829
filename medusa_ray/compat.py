"""The one home of the private Ray and vLLM APIs medusa-ray uses, each with why no public API does the job.

Everything else uses the libraries' public APIs. ``tests/test_compat.py`` imports every name below and fails
loudly, naming it, when an upgrade moves one. Ray 2.60 and vLLM 0.32 are what this was written against.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


# ---- Ray's GCS key-value store ---------------------------------------------------------------------------------
# Shared Serve apps are leased by the runs using them (distill/engine.py). The lease protocol needs a cluster-wide
# compare-and-set that outlives any one job; Ray's only one is the GCS KV store behind ray.experimental.internal_kv
# (a detached actor would be a single point of failure that itself needs start-once logic).

def kv_put_if_absent(key: bytes, value: bytes, namespace: str) -> bool:
    """Write ``key`` unless it exists; True when this call wrote it. (``_internal_kv_put`` returns whether the key
    already existed: the opposite.)"""
    from ray.experimental import internal_kv

    return not internal_kv._internal_kv_put(key, value, overwrite=False, namespace=namespace)


def kv_put(key: bytes, value: bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, namespace=namespace)


def kv_get(key: bytes, namespace: str) -> bytes | None:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_del(key: bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


def kv_keys(prefix: bytes, namespace: str) -> list[bytes]:
    from ray.experimental import internal_kv

    return list(internal_kv._internal_kv_list(prefix, namespace=namespace))


# ---- Ray's job table and Serve's controller -------------------------------------------------------------------

def live_job_ids() -> set[str]:
    """Ids (hex) of the jobs alive on the cluster: a lease whose job is dead is stale. The public job APIs
    (JobSubmissionClient, ray.util.state.list_jobs) need the dashboard's address and list submitted jobs; the
    GCS job table also has drivers started with plain ``python``."""
    import ray

    gcs = ray._private.worker.global_worker.gcs_client
    return {job.hex() for job, info in gcs.get_all_job_info().items() if not info.is_dead}


def serve_controller_running() -> bool:
    """Whether Serve runs on the cluster, without starting it (``serve.status()`` starts nothing either, but raises
    the same way for "not running" and for real failures)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def serve_replica_nodes(app_name: str) -> list[str]:
    """Ray node ids of an app's running replicas. ``serve.status()`` counts replicas but does not say where
    they run; the controller's details (what ``serve status`` prints) do."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details["applications"][app_name]["deployments"].values()
    return sorted({r["node_id"] for d in deployments for r in d.get("replicas", []) if r.get("node_id")})


def serve_http_address() -> tuple[str, int] | None:
    """Where the running Serve's HTTP proxy listens: ``serve.start`` on a running Serve keeps the proxy it has
    (and says nothing), so ``medusa-ray serve`` reads back the address clients must use. No public API has it;
    the controller's details (what ``serve status`` prints) do."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.get_serve_details().get("http_options") or {}
    return (http["host"], int(http["port"])) if http.get("host") is not None and http.get("port") else None


# ---- Ray's autoscaler state -----------------------------------------------------------------------------------
# ``auto`` accelerators mean "GPU when the cluster has GPUs or its autoscaler can add them". No public API lists
# the node types an autoscaler can add; the GCS cluster config and the monitor's status report do.

def gcs_node_group_resources() -> list[dict[str, float]] | None:
    """Resources of the node groups a platform published in the GCS cluster config (None: none published)."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
    return None


def autoscaler_node_type_mapping() -> dict[str, str] | None:
    """The autoscaler monitor's node -> node type mapping, and whether each type is a read-only one (a fixed
    cluster's monitor names every node's type after the node itself): {node: type}, None without a report."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
    if not status:
        return None
    return (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}


def readonly_node_type(node: str) -> str:
    from ray.autoscaler._private.util import format_readonly_node_type

    return format_readonly_node_type(node)


# ---- Ray's log forwarding -------------------------------------------------------------------------------------
# Workers' lines reach the driver through Ray's stdstream dispatcher; routing them by stream (stderr to the
# console, stdout to the run's log file only) means replacing its handler. Ray has no public hook for it
# (``log_to_driver`` is all or nothing).

def route_worker_lines(handle: Callable[[dict], None]) -> bool:
    """Replace Ray's printing of forwarded worker lines with ``handle`` (False: this Ray has no such
    dispatcher, and its own printing stays)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("medusa_ray_logs")
    dispatcher.add_handler("medusa_ray_logs", handle)
    return True


RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
"""The logger of Ray Data's one-time "progress bars are off" hint (we turn its bars off for our own); a moved
logger only brings the hint back."""


def print_worker_lines(data: dict, stream) -> None:
    """Ray's own rendering of forwarded worker lines (prefix, colours, dedup), for the lines we show."""
    import ray._private.worker as ray_worker

    ray_worker.print_worker_logs(data, stream)


# ---- Serve LLM's replica callbacks ----------------------------------------------------------------------------
# ``LLMConfig.callback_config`` is Serve LLM's public switch for code that runs in a replica before its engine
# starts, but the base class a callback must subclass is not exported publicly in Ray 2.60.

def serve_llm_callback_base() -> type:
    from ray.llm._internal.common.callbacks.base import CallbackBase

    return CallbackBase


# ---- vLLM ----------------------------------------------------------------------------------------------------

def shutdown_llm(llm: Any) -> None:
    """Stop an offline ``vllm.LLM``'s engine processes now. vLLM 0.32's ``LLM`` has no public shutdown (they stop
    when it is garbage-collected, which a second engine in the same process cannot wait for)."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()


# Every private name above, for the test that fails loudly when an upgrade moves one: (module, attribute).
PRIVATE_NAMES = (
    ("ray.experimental.internal_kv", "_internal_kv_put"),
    ("ray.experimental.internal_kv", "_internal_kv_get"),
    ("ray.experimental.internal_kv", "_internal_kv_del"),
    ("ray.experimental.internal_kv", "_internal_kv_list"),
    ("ray.experimental.internal_kv", "_internal_kv_initialized"),
    ("ray._private.worker", "global_worker"),
    ("ray._private.worker", "print_worker_logs"),
    ("ray._private.state", "state"),
    ("ray._private.ray_constants", "DEBUG_AUTOSCALING_STATUS"),
    ("ray._private.ray_logging", "global_worker_stdstream_dispatcher"),
    ("ray.autoscaler._private.util", "format_readonly_node_type"),
    ("ray.serve.context", "_get_global_client"),
    ("ray.llm._internal.common.callbacks.base", "CallbackBase"),
    ("vllm.v1.engine.llm_engine", "LLMEngine"),
)
