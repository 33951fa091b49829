"""Engine settings that need no running engine: replica scaling, requests in flight, CPU memory defaults."""

from medusa_ray.config import build_config
from medusa_ray.distill.engine import _deployment_config, with_cpu_defaults, in_flight_per_replica, max_replicas


def test_fixed_replicas_without_bounds_and_queue_depth_autoscaling_with_them():
    fixed = _deployment_config(build_config({}, ["distill.num_replicas=3"]), "app-llm")
    assert fixed == {"name": "app-llm", "num_replicas": 3}
    scaled = _deployment_config(
        build_config({}, ["distill.min_replicas=0", "distill.max_replicas=4", "distill.max_in_flight=32"]), "app-llm")
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                            "target_ongoing_requests": 32}


def test_cpu_replicas_take_a_tenth_of_ram_and_no_chunked_prefill_unless_told_otherwise():
    assert with_cpu_defaults({}, "cpu") == {"gpu_memory_utilization": 0.1, "enable_chunked_prefill": False}
    assert with_cpu_defaults({"gpu_memory_utilization": 0.3, "enable_chunked_prefill": True}, "cpu") == \
        {"gpu_memory_utilization": 0.3, "enable_chunked_prefill": True}
    assert with_cpu_defaults({}, "gpu") == {}


def test_requests_in_flight_fill_every_replica_the_run_may_have():
    default = build_config({})
    assert in_flight_per_replica(default) == 256 and max_replicas(default) == 1
    seqs = build_config({}, ["distill.engine_kwargs={max_num_seqs: 64}", "distill.num_replicas=3"])
    assert in_flight_per_replica(seqs) == 64 and max_replicas(seqs) == 3
    scaled = build_config({}, ["distill.min_replicas=1", "distill.max_replicas=5", "distill.max_in_flight=16"])
    assert in_flight_per_replica(scaled) == 16 and max_replicas(scaled) == 5
