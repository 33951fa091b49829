"""The training loop's collectives on a process group that, like NCCL, refuses CPU tensors.

On GPUs Ray Train builds an NCCL process group, which rejects CPU tensors ("No backend type associated with
device type cpu"). There is no GPU here, so the stand-in is torch's own ``"cuda:gloo"`` backend string: a real
two-process group whose only backend serves the ``cuda`` device type and refuses CPU tensors exactly that way.
Tensors on the "accelerator" are a CPU-backed tensor subclass that reports ``cuda:0``; collectives on them run
over a second, real gloo group between the same two processes. CPU tensors go to the real ``cuda:gloo`` group
and are refused as NCCL would refuse them.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback

import pytest
from helpers import free_port

ACCEL = "cuda"


def _accelerator():
    """A TorchFunctionMode that makes ``device="cuda"`` factories return CPU-backed tensors reporting cuda:0."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Accel(torch.Tensor):
        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                       device=torch.device(ACCEL, 0))

        def __init__(self, inner):
            self.inner = inner

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default:
                device = kwargs.get("device")
                if device is not None and torch.device(device).type == "cpu":
                    return args[0].inner.to(dtype=kwargs.get("dtype") or args[0].dtype).clone()
            if func is torch.ops.aten._local_scalar_dense.default:
                return args[0].inner.item()
            raise NotImplementedError(f"the test accelerator does not implement {func}")

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == ACCEL:
                return Accel(func(*args, **dict(kwargs, device="cpu")))
            return func(*args, **kwargs)

    return Accel, Mode()


def _rank_main(rank: int, port: int, results) -> None:
    try:
        import torch
        import torch.distributed as dist

        from medusa_ray.train.worker import Collectives

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("cuda:gloo", rank=rank, world_size=2)
        accel_group = dist.new_group(backend="gloo")  # carries the accelerator's collectives
        Accel, mode = _accelerator()
        real_all_reduce = dist.all_reduce

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if isinstance(tensor, Accel):
                return real_all_reduce(tensor.inner, op=op, group=accel_group, async_op=async_op)
            return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = all_reduce
        out: dict = {}
        try:
            dist.all_reduce(torch.ones(1))
            out["cpu_tensor"] = "accepted"
        except Exception as exc:  # noqa: BLE001 - the refusal is what we record
            out["cpu_tensor"] = str(exc).splitlines()[0]
        with mode:
            coll = Collectives(torch.device(ACCEL, 0))
            out["sum"] = coll.sum([float(rank + 1), 10.0, 0.5])
            out["all_true_one_rank"] = coll.all_true(rank == 0)
            out["all_true_every_rank"] = coll.all_true(True)
        dist.destroy_process_group()
        results.put((rank, out))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, {"error": traceback.format_exc()}))


def test_collectives_run_on_the_training_device_not_cpu():
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        assert "error" not in got[rank], got[rank]["error"]
        # The stand-in refuses CPU tensors the way NCCL does...
        assert "No backend type associated with device type cpu" in got[rank]["cpu_tensor"]
        # ...and the training loop's collectives still work on it, across both ranks.
        assert got[rank]["sum"] == pytest.approx([3.0, 20.0, 1.0])
        assert got[rank]["all_true_one_rank"] is False
        assert got[rank]["all_true_every_rank"] is True
