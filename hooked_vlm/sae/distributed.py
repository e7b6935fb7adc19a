"""Data-parallel harvesting: which images each rank harvests, and a ``torchrun`` process group to harvest in.

Rank ``r`` of ``W`` harvests a contiguous run of whole forwards into its own store ``<store>/rank-r-of-W``; the
store's manifest then lists the shards of every rank (:func:`hooked_vlm.sae.store.merge_stores`). Because the run's
boundaries are multiples of the batch size, every forward is the one a single process makes over the same images,
so every row, ``batch_row`` index column included, is the same as in a single-process harvest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def rank_images(n_images: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Images ``start:stop`` of rank ``rank`` of ``world_size``: whole forwards of ``batch_size`` images, the
    ranks' counts of forwards differing by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of world_size {world_size} ranks")
    n_batches = -(-n_images // batch_size)
    first, last = (n_batches * r // world_size for r in (rank, rank + 1))
    return min(first * batch_size, n_images), min(last * batch_size, n_images)


def part_folder(rank: int, world_size: int) -> str:
    """The folder (inside the store) that rank ``rank`` of ``world_size`` harvests into."""
    return f"rank-{rank}-of-{world_size}"


def process_group_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` process group; ``None`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


@contextmanager
def torchrun_group(device: str | None = None) -> Iterator[str | None]:
    """Under ``torchrun``: join the process group and give this rank its own GPU while the block runs.

    Yields the device for this rank's model. On CUDA (``device`` unset and a GPU present, or ``device`` a CUDA
    device) it is ``cuda:LOCAL_RANK``, made current (so that NCCL and a bare ``"cuda"`` mean this rank's GPU), and
    the backend is NCCL; otherwise it is the CPU and the backend gloo. The group is left at the end if it was
    joined here. Outside ``torchrun`` (no ``LOCAL_RANK`` in the environment) nothing happens and ``device`` is
    yielded as given.
    """
    if "LOCAL_RANK" not in os.environ:
        yield device
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        device = "cpu"
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    try:
        yield device
    finally:
        if joined:
            dist.destroy_process_group()
