"""Session-wide fixtures: one tiny model and one Ray cluster, shared by every test that needs them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Tests never reach the Hub; fail fast instead of hanging on a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO_ROOT = Path(__file__).resolve().parents[1]
S3_BUCKET = "medusa-test"

# Pretrained just long enough that greedy outputs are structured (counting, alphabets...), which is
# what makes trained Medusa heads measurably better than untrained ones.
TINY_PRETRAIN_STEPS = 150


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A structured tiny Llama (head_dim 64) that transformers and vLLM both load."""
    from medusa_ray.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", pretrain_steps=TINY_PRETRAIN_STEPS)


@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory) -> Path:
    """The same architecture with random weights: cheap, for tests that only need something loadable."""
    from medusa_ray.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-random", pretrain_steps=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (8 logical CPUs, so Serve and Data actors coexist)."""
    import ray

    from medusa_ray.cluster import init_ray
    from medusa_ray.config import RayConfig

    init_ray(RayConfig(num_cpus=8, object_store_gb=1.0))
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """A moto S3 server on loopback with one bucket; yields the environment a client needs to reach it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.3)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        import pyarrow.fs

        pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing",
                                secret_key="testing", region="us-east-1",
                                allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
