"""Process groups and collectives for multi-GPU (or multi-process CPU) training.

One :class:`Dist` per process says who this process is (rank, world size, compute device)
and owns every collective the trainer makes. Each collective puts its tensor on the compute
device: NCCL cannot reduce CPU tensors, so a CPU tensor in a CUDA run would fail on the first
step. The process group is also created with a backend for each device type
(``"cpu:gloo,cuda:nccl"`` on GPUs), so object collectives that travel through CPU tensors
work as well.

Parallelism: ``"ddp"`` wraps the model in DistributedDataParallel (every rank holds the whole
model and optimizer); ``"fsdp"`` shards parameters, gradients and optimizer state over the
ranks with FSDP2 (:func:`torch.distributed.fsdp.fully_shard`), one unit per transformer block.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, ContextManager, List, Tuple

import torch

__all__ = ["Dist", "init_distributed", "wrap_model", "PARALLEL_MODES"]

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
_GLOO_DRAIN_S = 0.2


@dataclass
class Dist:
    """Process-group facts for this process (world size 1 and no group without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False
    owns_group: bool = False
    device: torch.device = torch.device("cpu")
    mode: str = "none"

    @property
    def master(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks in place (identity without a group)."""
        if self.enabled:
            import torch.distributed as dist

            self._check(t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``t`` over all ranks, in place."""
        if self.enabled:
            import torch.distributed as dist

            self._check(t)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def agree(self, stop: bool, values: List[float]) -> Tuple[bool, List[float]]:
        """Whether any rank wants to stop, and rank 0's ``values`` (non-negative floats such
        as its clock), so that every rank takes the same decisions and learning rates."""
        if not self.enabled:
            return stop, list(values)
        t = torch.tensor([1.0 if stop else 0.0] + [v if self.master else 0.0 for v in values],
                         dtype=torch.float64, device=self.device)
        self.all_reduce_max(t)
        return bool(t[0] > 0), [float(v) for v in t[1:]]

    def gather_object(self, obj: Any) -> List[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` without a group)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                # gloo's worker threads drop their last references to the tensors of
                # finished collectives, which needs the GIL; the group's destructor joins
                # them while holding it (a deadlock at exit on torch 2.7, 3 runs in 11 of
                # two processes). Sleeping releases the GIL so that they finish first.
                time.sleep(_GLOO_DRAIN_S)
                dist.destroy_process_group()
            self.owns_group = False

    def _check(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise RuntimeError(f"collective on a {t.device} tensor; the compute device is "
                               f"{self.device}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device: torch.device) -> str:
    """The process-group backend string: gloo for CPU tensors, NCCL for CUDA ones."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(mode: str, device: torch.device) -> Dist:
    """Join (or create) the process group as ``mode`` asks and return this process's facts.

    ``mode``: ``"auto"`` (DDP when torchrun started several processes, else none),
    ``"none"``, ``"ddp"`` or ``"fsdp"``. ``"ddp"``/``"fsdp"`` also work with one process
    (under ``torchrun --nproc_per_node=1`` or without torchrun), so the distributed code path
    can be checked on one GPU. ``device`` is this process's compute device; for CUDA its index
    is this rank's local rank.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        if world > 1:
            raise ValueError(f"parallel = none, but {world} processes were started")
        return Dist(device=device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        if world == 1 and "MASTER_PORT" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend_for(device), rank=rank, world_size=world)
        owns = True
    return Dist(rank, local_rank, world, True, owns, device, mode)


def wrap_model(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The module the training step calls: DDP- or FSDP2-wrapped as ``d.mode`` says.

    FSDP2 shards each transformer block as one unit and the rest (embeddings, final norm,
    head) as the root, in place; the returned module is ``model`` itself. DDP returns a
    wrapper whose ``.module`` is ``model``.
    """
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def no_sync(module: torch.nn.Module, d: Dist, last_micro_step: bool) -> ContextManager[Any]:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation.

    DDP has ``no_sync()``; FSDP2 has ``set_requires_gradient_sync``, which this toggles.
    """
    if d.mode == "ddp" and not last_micro_step:
        return module.no_sync()  # type: ignore[operator]
    if d.mode == "fsdp":
        module.set_requires_gradient_sync(last_micro_step)  # type: ignore[operator]
    return contextlib.nullcontext()
