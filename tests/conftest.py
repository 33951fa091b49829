"""Session-wide fixtures: one tiny model and one Ray cluster, shared by every test that needs them.

Tests that start Ray or vLLM are marked ``slow``; ``pytest -m "not slow"`` (``make test-fast``) is the quick loop.
A test that is not marked slow and starts Ray anyway fails, naming the marker (``_fast_tests_start_no_ray``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, wait_for, write_distilled

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


SLOW_ONLY = ("starts Ray, so it must be marked slow (`pytestmark = pytest.mark.slow` for a whole module, "
             "`@pytest.mark.slow` for one test): `pytest -m 'not slow'` is the fast loop and never starts Ray or vLLM")


def _slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture: a session cluster already up (from a slow test) would otherwise be handed over silently.
    if "ray_session" in getattr(item, "fixturenames", ()) and not _slow(item):
        pytest.fail(f"{item.nodeid} uses the ray_session fixture, which {SLOW_ONLY}", pytrace=False)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request, monkeypatch):
    """A test not marked slow may not start Ray: ``ray.init`` raises in this process, and a Ray started by a
    subprocess (``medusa-ray ...``, ``ray start``) leaves a session under the RAY_TMPDIR it inherits, which fails
    the test afterwards."""
    if _slow(request.node):
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(f"ray.init() called by {request.node.nodeid}: a test that {SLOW_ONLY}")

    was_up = ray.is_initialized()
    monkeypatch.setattr(ray, "init", refuse)
    temp = tempfile.mkdtemp(prefix="mr-noray-")  # short: Ray's unix sockets must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", temp)
    try:
        yield
        sessions = [p.name for p in Path(temp).rglob("session_*")]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    if sessions or (ray.is_initialized() and not was_up):
        where = "in a subprocess" if sessions else "in the test process"
        pytest.fail(f"{request.node.nodeid} started Ray {where}: a test that {SLOW_ONLY}", pytrace=False)


@pytest.fixture(scope="session")
def ray_session(request):
    """One local Ray cluster for the whole session (8 logical CPUs, so Serve and Data actors coexist).
    Only for tests marked slow."""
    item = getattr(request, "_pyfuncitem", None)  # the test that asked for it first
    if item is not None and not _slow(item):
        pytest.fail(f"{item.nodeid} uses the ray_session fixture, which {SLOW_ONLY}", pytrace=False)
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


@pytest.fixture(scope="module")
def distilled(request, tmp_path_factory) -> Path:
    """Distill-format Parquet (``helpers.write_distilled``: the tiny corpus as distill writes it), labelled with a
    tiny model. A module tunes it with a ``DISTILLED`` dict: ``model``, the fixture naming the model
    (``random_tiny_model`` unless told), and ``write_distilled``'s keywords."""
    options = dict(getattr(request.module, "DISTILLED", {}))
    model = request.getfixturevalue(options.pop("model", "random_tiny_model"))
    return write_distilled(tmp_path_factory.mktemp("distill") / "out", model=str(model), **options)


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """A moto S3 server on loopback with one bucket; yields the environment a client needs to reach it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return True
        except OSError:
            return False

    try:
        wait_for(answers, 60, f"moto_server did not start on {endpoint}",
                 alive=lambda: server.poll() is not None and f"exited {server.returncode}")
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
