"""Engine settings that need no running engine: replica scaling and CPU memory defaults."""

from medusa_ray.config import build_config
from medusa_ray.distill.engine import _deployment_config, _with_cpu_defaults


def test_fixed_replicas_without_bounds_and_queue_depth_autoscaling_with_them():
    fixed = _deployment_config(build_config({}, ["distill.num_replicas=3"]), "app-llm")
    assert fixed == {"name": "app-llm", "num_replicas": 3}
    scaled = _deployment_config(
        build_config({}, ["distill.min_replicas=0", "distill.max_replicas=4", "distill.batch_size=32"]), "app-llm")
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                            "target_ongoing_requests": 32}


def test_cpu_replicas_take_a_tenth_of_ram_unless_told_otherwise():
    assert _with_cpu_defaults({}, "cpu") == {"gpu_memory_utilization": 0.1}
    assert _with_cpu_defaults({"gpu_memory_utilization": 0.3}, "cpu") == {"gpu_memory_utilization": 0.3}
    assert _with_cpu_defaults({}, "gpu") == {}
