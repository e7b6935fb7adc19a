"""Image loading in worker processes for harvests: decode and run the checkpoint's own processor off the main process.

One thread cannot feed a GPU: decoding a 640×480 JPEG and running ``CLIPImageProcessor`` on it costs about 7 ms of
CPU (143 images/s), while an H200 runs CLIP-L/14 at about 2,400 images/s. :func:`loaded_batches` spreads that
work over ``workers`` processes of a :class:`torch.utils.data.DataLoader` (pinned memory, ``prefetch_factor``
batches ahead per worker), each preparing whole forwards: item ``i`` of the loader is the prepared input of images
``bounds[i]``, built by the same call the single-thread path makes (``model.prepare_inputs`` of
:func:`~hooked_vlm.sae.harvesting.model_inputs`, so the adapter's own path: CLIP and open_clip transforms,
LLaVA-OneVision's anyres tiling, Qwen2-VL's dynamic resolution), with the layout built there too. The loader
keeps the order of ``bounds``, so rows and their provenance are those of the single-thread path, in order.

Workers are forked (``fork`` start method): they inherit the model, the image source and the processor instead
of receiving them pickled, and never touch the GPU. In a worker, the adapters' ``to_model`` (the move of the
inputs to the model's device and dtype) is replaced by a copy that leaves them on the CPU; the main process
makes that move itself (from pinned memory, without blocking), with the same cast, so the values are the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from hooked_vlm.adapter import Prepared
from hooked_vlm.taps import current_device

if TYPE_CHECKING:
    from hooked_vlm.model import HookedVLM
    from hooked_vlm.sae.harvesting import ImageSource


def default_workers() -> int:
    """Worker processes for loading: every core this process may use but one (the main process feeds the GPU),
    at most 32 (more than the tested 16 processes buy nothing a single GPU can use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(32, cores - 1))


def _keep_on_host(kwargs: Any, model: Any) -> dict[str, Any]:
    return dict(kwargs)


def _worker_init(_: int) -> None:
    # the adapters import to_model by name: replace it in every module that holds it (this process only)
    from hooked_vlm import inputs

    original = inputs.to_model
    for module in list(sys.modules.values()):
        if getattr(module, "to_model", None) is original:
            module.to_model = _keep_on_host
    torch.set_num_threads(1)  # one process a core: the processors' own threads would oversubscribe


class _Forwards(Dataset):
    """Item ``i``: the CPU model inputs and layout of images ``bounds[i]`` of ``source``."""

    def __init__(self, model: HookedVLM, source: ImageSource, prompt: str | None, bounds: list[tuple[int, int]]):
        self.model, self.source, self.prompt, self.bounds = model, source, prompt, bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], Any]:
        from hooked_vlm.sae.harvesting import model_inputs

        if get_worker_info() is None:
            raise RuntimeError("_Forwards items are built in DataLoader workers (the main process keeps to_model)")
        prepared = self.model.prepare_inputs(**model_inputs(self.model, self.source.load(*self.bounds[i]),
                                                            self.prompt))
        return prepared.kwargs, prepared.layout


def _to_model(kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """What :func:`hooked_vlm.inputs.to_model` does, but without waiting for a copy from pinned memory."""
    moved = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            value = value.to(device=device, non_blocking=value.is_pinned())
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def loaded_batches(
    model: HookedVLM, source: ImageSource, prompt: str | None, bounds: list[tuple[int, int]], workers: int,
    prefetch_factor: int = 2,
) -> Iterator[Prepared]:
    """The prepared model inputs of images ``first:last`` for each ``(first, last)`` of ``bounds``, in order,
    built by ``workers`` processes (see the module docstring)."""
    if not bounds:
        return
    if workers < 1:
        raise ValueError(f"workers={workers}: loaded_batches needs at least one worker process")
    device = current_device(model.raw_model)
    dtype = next((p.dtype for p in model.raw_model.parameters() if p.is_floating_point()), None)
    loader = DataLoader(
        _Forwards(model, source, prompt, bounds),
        batch_size=None,  # an item is already a whole forward
        num_workers=min(workers, len(bounds)),
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor,
        worker_init_fn=_worker_init,
        multiprocessing_context="fork",
    )
    for kwargs, layout in loader:
        yield Prepared(_to_model(kwargs, device, dtype), layout)
