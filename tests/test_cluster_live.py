"""Real clusters, started by the tests themselves: a `ray start --head` cluster that runs the tiny pipeline
submitted as a Ray job, and a 2-node `ray.cluster_utils.Cluster` on which training must spread its
workers. Both live in subprocesses / their own ports and temp dirs, so they never touch the pytest
session's in-process Ray (`ray_session`) or other clusters on the machine, and both are torn down by
process id (never `ray stop`, which would stop every Ray cluster of this user on the machine)."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import free_ports, write_distilled

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.slow


def _short_tmp(prefix: str) -> Path:
    # Ray puts unix sockets under its temp dir; pytest's tmp_path is too long for AF_UNIX (107 bytes).
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _processes_with(marker: str) -> list[int]:
    """Pids of this user's processes whose environment carries ``marker`` (everything a cluster spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _reap(marker: str, timeout: float) -> list[int]:
    """Wait for every process tagged ``marker`` to exit; SIGKILL (and return) those that would not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = _processes_with(marker)
        if not alive:
            return []
        time.sleep(0.5)
    left = _processes_with(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


# --- `ray job submit` on a real `ray start --head` cluster ------------------------------------------------


def _die_with_parent() -> None:
    # If pytest itself is killed, the cluster gets SIGTERM and shuts down instead of lingering.
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Cluster:
    """A head (`ray start --head --block`) plus worker nodes (`ray start --address`), each with its own ports and
    its own temp dir, tagged so every process they spawn can be found; stopped by signalling those processes.

    Each node gets its own ``--temp-dir`` (``RAY_TMPDIR`` alone only moves the head's), as separate machines
    have separate disks. A worker node started without one shares the head's session directory and so its
    ``runtime_resources/``: the first time the worker's runtime-env agent installs a ``working_dir`` package
    (when the job driver on the head calls ``ray.init``), it removes the directory and unzips it again, under
    the driver and its imports (``packaging.py``'s ``download_and_unpack_package(overwrite=True)``). That is
    the import failure a two-node ``--working-dir`` job on one machine dies of; Ray's file lock only keeps
    the two agents from unzipping at once.
    """

    def __init__(self, head_cpus: int = 0, env: dict | None = None):
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        self.head_cpus = head_cpus
        self.marker = uuid.uuid4().hex
        # Ray 2.60 clusters require a token; this one has its own, handed to the cluster (and so to job
        # drivers) through the environment, and to the client as a header.
        self.token = generate_new_authentication_token()
        self.root = _short_tmp("mrj")
        self.env = dict(os.environ, MEDUSA_RAY_TEST_CLUSTER=self.marker, RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=self.token, **(env or {}))
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.procs: list[subprocess.Popen] = []
        self.workers: list[list] = []  # [process, its ray start arguments, attempts]
        self.logs: list = []
        self.attempts = 0
        self._launch_head()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        temp = self.root / name
        temp.mkdir(exist_ok=True)
        log = open(self.root / f"{name}.log", "a")
        self.logs.append(log)
        nm, om, metrics, agent_http, agent_grpc, renv = free_ports(6)
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
            f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={renv}", "--min-worker-port=0", "--max-worker-port=0",
            "--object-store-memory=500000000", *args,
        ]
        proc = subprocess.Popen(cmd, env=dict(self.env, RAY_TMPDIR=str(temp)), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc

    def _launch_head(self) -> None:
        self.attempts += 1
        self.gcs, dash, client = free_ports(3)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.head = self._start("head", [
            "--head", f"--num-cpus={self.head_cpus}", "--num-gpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--port={self.gcs}", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}"])

    def add_worker(self, num_cpus: int, num_gpus: int = 0) -> None:
        args = [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
        self.workers.append([self._start(f"worker{len(self.procs)}", args), args, 1])

    def _restart_failed_workers(self) -> None:
        """A worker's raylet also has 30 s to register, which a loaded machine can miss ("The current node timed
        out during startup"): one fresh attempt each, as for the head, then it is a real failure."""
        for entry in self.workers:
            proc, args, attempts = entry
            if proc.poll() is None or proc.returncode == 0:
                continue
            if attempts >= 2:
                raise RuntimeError(f"a worker's ray start exited {proc.returncode}:\n{self._log_tail()}")
            self.procs.remove(proc)
            entry[:] = [self._start(f"worker{len(self.procs)}-again", args), args, attempts + 1]

    def client(self, nodes: int, timeout: float = 180):
        """The Jobs API client, once the dashboard answers and ``nodes`` nodes are alive."""
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            if self.head.poll() is not None:
                # Ray gives the raylet 30 s to register; a machine shared with other test runs can miss
                # that. One fresh attempt, then it is a real failure.
                if self.attempts < 2:
                    _reap(self.marker, timeout=30)
                    self.procs.remove(self.head)
                    self._launch_head()
                    continue
                raise RuntimeError(f"ray start exited {self.head.returncode}:\n{self._log_tail()}")
            self._restart_failed_workers()
            try:
                client = JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
                client.list_jobs()
                if self._alive_nodes() >= nodes:
                    return client
            except Exception:  # noqa: BLE001 - dashboard not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster never came up with {nodes} nodes:\n{self._log_tail()}")
            time.sleep(1)

    def _alive_nodes(self) -> int:
        import urllib.request

        request = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            summary = json.load(resp)["data"]["summary"]
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def _log_tail(self) -> str:
        tails = []
        for log in self.logs:
            log.flush()
            tails.append(Path(log.name).read_text()[-1500:])
        return "\n---\n".join(tails)

    def stop(self) -> list[int]:
        """Stop this cluster only; return the pids that outlived it (killed, but a failure)."""
        for proc in reversed(self.procs):  # workers first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        left = _reap(self.marker, timeout=30)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        return left


def _pipeline_config(tiny_model: Path, out: Path, storage: str) -> dict:
    engine = {"max_model_len": 256, "enforce_eager": True, "gpu_memory_utilization": 0.1}
    return {
        "model": str(tiny_model),
        "distill": {
            "input": str(REPO / "examples" / "demo_prompts.jsonl"), "output_dir": str(out / "distill"),
            "limit": 24, "max_tokens": 64, "engine_kwargs": engine,
        },
        "train": {
            "num_workers": 1, "zero_stage": 0, "batch_size": 4, "max_steps": 3, "max_length": 128,
            "warmup_steps": 0, "checkpoint_every": 3, "storage_path": storage, "run_name": "job",
            "tracking": ["tensorboard"],
        },
        "export": {"output_dir": str(out / "export")},
        "eval": {"num_prompts": 4, "max_tokens": 16, "compare_untrained": False,
                 "output_json": str(out / "eval.json"), "engine_kwargs": engine},
    }


@pytest.mark.parametrize("worker_gpus", [0, 1], ids=["cpu-worker", "logical-gpu-worker"])
def test_ray_job_submit_on_a_head_that_runs_nothing(worker_gpus, tiny_model, tmp_path, request, monkeypatch):
    """The shape we ship: a head with no CPUs and no GPU, one worker node, the tiny pipeline submitted with
    ``ray job submit --working-dir``. No vLLM engine and no stage may run on the head. The logical-GPU worker
    (``--num-gpus=1`` without hardware) makes every GPU-requesting path be scheduled for real: the Serve replica,
    the training worker and the eval task each claim the GPU, and inside fall back to CPU (no CUDA). That run
    keeps its checkpoints in S3 (a local S3 server), so the pipeline's object-storage path runs here too."""
    from ray.job_submission import JobStatus

    out = tmp_path / "run"
    env = {}
    storage = str(out / "ray_results")
    if worker_gpus:
        env = request.getfixturevalue("s3_env")
        storage = "s3://medusa-test/cluster-runs"
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(_pipeline_config(tiny_model, out, storage)))
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)

    cluster = _Cluster(head_cpus=0, env=env)
    try:
        cluster.add_worker(num_cpus=8, num_gpus=worker_gpus)
        client = cluster.client(nodes=2)
        job_id = client.submit_job(
            # The cluster's interpreter; on a real cluster this is plain `python`.
            entrypoint=f"{sys.executable} jobs/pipeline.py --config {config_path}",
            runtime_env=runtime_env,
        )
        deadline = time.monotonic() + 480
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        head_node = client.get_job_info(job_id).driver_node_id
        assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-6000:]}"
        # It joined the submitted-to cluster rather than starting its own.
        assert "starting a local Ray cluster" not in logs
        _assert_readable(logs, out / "distill" / "logs")
    finally:
        left = cluster.stop()
    assert left == [], f"processes outlived the cluster (killed now): {left}"

    summary = json.loads((out / "distill" / "_pipeline" / "pipeline_summary.json").read_text())
    nodes = summary["nodes"]
    assert nodes["driver"] == [head_node]
    for stage in ("distill", "train", "export", "eval"):
        assert nodes[stage] and None not in nodes[stage], (stage, nodes)
        assert head_node not in nodes[stage], f"{stage} ran on the head: {nodes}"

    assert sorted((out / "distill").glob("*.parquet")), "no distilled shards"
    from medusa_ray.train import find_latest_checkpoint
    from medusa_ray.checkpoint import read_meta

    for key, value in env.items():
        monkeypatch.setenv(key, value)  # read the bucket the way the cluster did
    checkpoint = find_latest_checkpoint(storage, "job")
    assert checkpoint is not None and checkpoint.startswith(storage)
    assert read_meta(checkpoint).global_step == 3
    export = out / "export"
    assert (export / "medusa_lm_head.safetensors").is_file()
    assert json.loads((export / "config.json").read_text())["medusa_num_heads"] == 3
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["num_drafts"] > 0 and evaluation["acceptance_length"] >= 1.0
    assert evaluation["outputs_identical"] is True


def _assert_readable(job_log: str, log_dir: Path) -> None:
    """A job log a person reads top to bottom: no line per request or per bar update, the summaries, and the
    full log file (which holds the workers' detail) named at the end."""
    lines = job_log.splitlines()
    assert "\r" not in job_log, "a progress bar redrew itself into the job log"
    for per_request in ("CALL chat", "POST /v1", "/chat/completions", "Added request"):
        assert per_request not in job_log, per_request
    for stage in ("distill:", "train:", "eval:"):
        updates = [line for line in lines if line.startswith(stage)]
        assert len(updates) <= 10, updates  # a line every 30 s, not one per update
        assert len(set(updates)) == len(updates), updates
    for summary in ("distill -> ", "trained Medusa heads", "acceptance length", "rows distilled"):
        assert summary in job_log, summary
    (log_file,) = log_dir.glob("pipeline-*.log")
    assert lines[-1] == f"full log: {log_file}"
    full = log_file.read_text()
    assert re.search(r"^\([^)]* pid=\d+, ip=", full, re.M) and len(full.splitlines()) > len(lines)  # the workers' lines are there


# --- training on a 2-node cluster ------------------------------------------------------------------------

_TWO_NODE_DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    from medusa_ray.config import build_config
    from medusa_ray import train

    args = json.loads(sys.argv[1])
    # A head that runs nothing, and two nodes that could each hold both training workers: only a SPREAD
    # placement puts the workers on different nodes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": args["port"], "include_dashboard": False,
        "object_store_memory": 200 * 2**20,
    })
    nodes = {}
    for name in ("a", "b"):
        node = cluster.add_node(num_cpus=3, resources={f"node_{name}": 1}, object_store_memory=200 * 2**20)
        nodes[node.node_id] = name
    cluster.wait_for_nodes()
    cfg = build_config(args["config"], [f"ray.address={cluster.address}"])
    try:
        result = train.run(cfg)
        from ray._private.state import actors
        workers = [a for a in actors().values() if a["ActorClassName"].endswith("RayTrainWorker")]
        print("RESULT " + json.dumps({
            "global_step": result.global_step,
            "worker_nodes": sorted(nodes.get(a["Address"]["NodeID"], "head") for a in workers),
        }), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_training_workers_spread_over_two_nodes(random_tiny_model, tmp_path):
    data = write_distilled(tmp_path / "distilled", n=48, model=str(random_tiny_model), shards=1, ids="c{i}",
                           errors=False)
    config = {
        "model": str(random_tiny_model),
        "train": {
            "data": str(data), "num_workers": 2, "zero_stage": 2, "batch_size": 2, "max_steps": 2,
            "max_length": 64, "warmup_steps": 0, "checkpoint_every": 2,
            "storage_path": str(tmp_path / "ray_results"), "run_name": "spread", "tracking": [],
        },
    }
    temp = _short_tmp("mr2")
    marker = uuid.uuid4().hex
    env = dict(os.environ, RAY_TMPDIR=str(temp), MEDUSA_RAY_TEST_CLUSTER=marker)
    env.pop("RAY_ADDRESS", None)
    (port,) = free_ports(1)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _TWO_NODE_DRIVER, json.dumps({"config": config, "port": port})],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, preexec_fn=_die_with_parent,
        )
    finally:
        left = _reap(marker, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["global_step"] == 2
    # Two workers (one per rank; a restarted group would show up as more), on two different nodes.
    assert sorted(set(result["worker_nodes"])) == ["a", "b"], result
    assert left == [], f"processes outlived the cluster (killed now): {left}"


# --- accelerator "auto": what the cluster can have, not what it has this second ------------------------------

_AUTO_DRIVER = textwrap.dedent(
    """
    import json
    import ray
    from ray.core.generated import autoscaler_pb2

    from medusa_ray.cluster import resolve_accelerator

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    seen = {"fixed cluster, no GPU": resolve_accelerator("auto", "train.use_gpu")}

    def publish(groups):
        # The cluster config a platform publishes in the GCS: the node groups its autoscaler can start.
        config = autoscaler_pb2.ClusterConfig(node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name=name, resources=res, min_count=0, max_count=n)
            for name, res, n in groups])
        ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())

    publish([("cpu", {"CPU": 8}, 4)])
    seen["autoscaler with CPU node types only"] = resolve_accelerator("auto", "train.use_gpu")
    publish([("cpu", {"CPU": 8}, 4), ("gpu", {"CPU": 8, "GPU": 1}, 2)])
    seen["GPU pool scaled to zero"] = resolve_accelerator("auto", "train.use_gpu")
    seen["explicit cpu"] = resolve_accelerator("cpu", "train.use_gpu")
    print("RESULT " + json.dumps(seen), flush=True)
    ray.shutdown()
    """
)


def test_auto_accelerator_counts_gpus_the_autoscaler_can_add(tmp_path):
    temp = _short_tmp("mra")
    marker = uuid.uuid4().hex
    env = dict(os.environ, RAY_TMPDIR=str(temp), MEDUSA_RAY_TEST_CLUSTER=marker)
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-c", _AUTO_DRIVER], env=env, capture_output=True, text=True,
                              timeout=180, cwd=tmp_path, preexec_fn=_die_with_parent)
    finally:
        left = _reap(marker, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[-1].removeprefix("RESULT ")) == {
        "fixed cluster, no GPU": "cpu",
        "autoscaler with CPU node types only": "cpu",
        "GPU pool scaled to zero": "gpu",
        "explicit cpu": "cpu",
    }
    assert left == []
