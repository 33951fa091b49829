"""Runs inside each Serve replica hosting vLLM (loaded by Serve LLM by name, never imported by the driver)."""

from __future__ import annotations

from medusa_ray import compat, logs


class ReplicaLogging(compat.serve_llm_callback_base()):
    """``LLMConfig.callback_config``: importing Serve LLM points the replica's root logger at JSON on stderr;
    before the engine starts, it is pointed at the replica's Serve log file instead, and vLLM's subprocesses
    get the split of ``medusa_ray.logs`` (their output reaches the driver like any worker's)."""

    async def on_before_node_init(self) -> None:
        logs.replica_setup()
        logs.configure_vllm()
