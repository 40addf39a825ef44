"""Data parallel training under `torchrun` (torch.distributed: NCCL on GPU, gloo on CPU).

Every rank draws the same epoch order and the same augmentation for the global batch, then trains
on its slice of it (rank::world), so a run on N processes sees exactly the batches of one process
with the same global batch size; DDP averages the gradients. Only rank 0 writes files and logs."""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def init_from_env(device_kind: str = "auto") -> None:
    """Join the process group that torchrun describes in the environment (no-op otherwise)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available() and device_kind != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")


def local_device(device):
    """On CUDA, each rank uses the GPU of its LOCAL_RANK."""
    import torch

    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def all_reduce_sum(t):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def from_main(obj):
    """Rank 0's `obj` on every rank (a decision only rank 0 makes); `obj` itself outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
