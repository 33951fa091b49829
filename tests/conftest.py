"""Session-wide fixtures: one tiny model and one Ray cluster, shared by every test that needs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hub; fail fast instead of hanging on a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO_ROOT = Path(__file__).resolve().parents[1]

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
