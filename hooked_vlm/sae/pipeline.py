"""Image loading for harvests off the main thread: worker processes, and preprocessing on the GPU.

One thread cannot feed a GPU: decoding a 640×480 JPEG and running ``CLIPImageProcessor`` on it costs about 7 ms of
CPU (143 images/s), while an H200 runs CLIP-L/14 at about 2,500 images/s. :class:`BatchLoader` spreads that
work over ``workers`` processes of a :class:`torch.utils.data.DataLoader` (persistent across passes, so an
``activation_stream`` forks once), built by the same call the single-thread path makes (``model.prepare_inputs``
of :func:`~hooked_vlm.sae.harvesting.model_inputs`, so the adapter's own path: CLIP and open_clip transforms,
LLaVA-OneVision's anyres tiling, Qwen2-VL's dynamic resolution). The loader keeps the order of ``bounds``, so
rows and their provenance are those of the single-thread path, in order.

How the work is cut decides the speed. A model without a language model (CLIP, open_clip) preprocesses every
image alone, so a batch is the concatenation of its parts: each batch is cut into ``workers`` chunks, every
worker prepares one, and the main process joins them straight into pinned memory and starts the copy to the GPU
without waiting. (One whole batch per worker, as before, left the GPU waiting for a single process to prepare 256
images: 2 s per batch, 4,096 images in 16 such items, about 500 images/s from 15 workers.) A VLM's batch is not
a concatenation (prompts padded together, tiles padded to the batch's most), so each worker prepares whole
forwards.

With ``preprocess="gpu"`` (:mod:`hooked_vlm.sae.gpu_preprocess`) the workers only read file bytes; a thread of
the main process decodes each batch with nvJPEG and preprocesses it on a CUDA stream of its own while the
previous batch's forward runs, and the forward's stream waits on that work's event, not the host.

Workers are forked (``fork`` start method): they inherit the model, the image source and the processor instead
of receiving them pickled, and never touch the GPU. In a worker, the adapters' ``to_model`` (the move of the
inputs to the model's device and dtype) is replaced by a copy that leaves them on the CPU; the main process
makes that move itself (from pinned memory, without blocking), with the same cast, so the values are the same.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from hooked_vlm.adapter import Prepared
from hooked_vlm.taps import current_device

if TYPE_CHECKING:
    from hooked_vlm.model import HookedVLM
    from hooked_vlm.sae.harvesting import ImageSource

#: ``preprocess=`` values: the checkpoint's processor on the CPU, or nvJPEG and the same steps on the GPU
PREPROCESS = ("processor", "gpu")


#: loading processes for ``preprocess="gpu"`` at most: they only read files
GPU_PREPROCESS_WORKERS = 4


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


def _in_worker() -> None:
    if get_worker_info() is None:
        raise RuntimeError("loader items are built in DataLoader workers (the main process keeps to_model)")


class _Forwards(Dataset):
    """Item ``i``: the CPU model inputs (and layout) of images ``bounds[i]`` of ``source``."""

    def __init__(
        self,
        model: HookedVLM,
        source: ImageSource,
        prompt: str | None,
        bounds: list[tuple[int, int]],
        with_layout: bool = True,
    ):
        self.model, self.source, self.prompt, self.bounds, self.with_layout = model, source, prompt, bounds, with_layout

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], Any]:
        from hooked_vlm.sae.harvesting import model_inputs

        _in_worker()
        prepared = self.model.prepare_inputs(**model_inputs(self.model, self.source.load(*self.bounds[i]), self.prompt))
        return prepared.kwargs, prepared.layout if self.with_layout else None


class _RawImages(Dataset):
    """Item ``i``: what :func:`~hooked_vlm.sae.gpu_preprocess.raw_image` makes of images ``bounds[i]``."""

    def __init__(self, source: ImageSource, bounds: list[tuple[int, int]]):
        self.source, self.bounds = source, bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from hooked_vlm.sae.gpu_preprocess import pack, raw_image

        return pack([raw_image(item) for item in self.source.raw(*self.bounds[i])])


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


def _joined(parts: list[dict[str, Any]], pin: bool) -> dict[str, Any]:
    """The kwargs of a batch from those of its consecutive chunks (every value a tensor with the images first),
    concatenated once, into pinned memory when the batch goes to a GPU."""
    joined = {}
    for key, first in parts[0].items():
        pieces = [part[key] for part in parts]
        if not all(isinstance(p, Tensor) and p.dim() and p.shape[1:] == first.shape[1:] for p in pieces):
            raise ValueError(
                f"the prepared inputs' {key!r} are no per-image tensors of one shape, so chunks of a batch "
                "cannot be joined; load with workers=0"
            )
        out = torch.empty((sum(len(p) for p in pieces), *first.shape[1:]), dtype=first.dtype, pin_memory=pin)
        joined[key] = torch.cat(pieces, out=out)
    return joined


class BatchLoader:
    """The prepared model inputs of images ``first:last`` for each ``(first, last)`` of ``bounds``, in order, each
    time it is iterated (see the module docstring). ``workers`` processes load (0: a thread of this process, for
    ``preprocess="gpu"`` only); they stay up between passes until the loader is closed or dropped."""

    def __init__(
        self,
        model: HookedVLM,
        source: ImageSource,
        prompt: str | None,
        bounds: list[tuple[int, int]],
        workers: int,
        preprocess: str = "processor",
        prefetch_factor: int = 2,
    ):
        from hooked_vlm.sae.harvesting import has_language_model

        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess={preprocess!r}: choose one of {PREPROCESS}")
        if workers < (1 if preprocess == "processor" else 0):
            raise ValueError(f"workers={workers}: loading with the processor in worker processes needs at least one")
        self.model, self.bounds, self.preprocess = model, bounds, preprocess
        self.device = current_device(model.raw_model)
        self.dtype = next((p.dtype for p in model.raw_model.parameters() if p.is_floating_point()), None)
        self.transform = None
        if preprocess == "gpu":
            from hooked_vlm.sae.gpu_preprocess import check_device, device_transform

            if prompt is not None and not has_language_model(model):
                raise ValueError(f"a {model.adapter.family} model takes no prompt")
            check_device(self.device)
            self.transform = device_transform(model.adapter.processor)
            dataset: Dataset = _RawImages(source, bounds)
            self.chunks = None
        elif has_language_model(model):
            dataset = _Forwards(model, source, prompt, bounds)
            self.chunks = None
        else:  # every image alone: cut each batch into about one chunk per worker
            self.chunks = []
            for first, last in bounds:
                size = math.ceil((last - first) / workers)
                self.chunks.append([(i, min(i + size, last)) for i in range(first, last, size)])
            dataset = _Forwards(model, source, prompt, [c for chunks in self.chunks for c in chunks], with_layout=False)
        self.dataset = dataset
        if preprocess == "gpu":  # reading a batch's bytes takes one process ~20 ms; each fork costs this one as much
            workers = min(workers, GPU_PREPROCESS_WORKERS)
        self.loader = None
        if workers and bounds:
            self.loader = DataLoader(
                dataset,
                batch_size=None,  # an item is already a chunk or a whole forward
                num_workers=min(workers, len(dataset)),
                pin_memory=self.device.type == "cuda" and self.chunks is None,
                prefetch_factor=prefetch_factor,
                persistent_workers=True,
                worker_init_fn=_worker_init,
                multiprocessing_context="fork",
            )

    def close(self) -> None:
        """End the worker processes (they also end when the loader is garbage-collected)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
        self.loader = None

    def __iter__(self) -> Iterator[Prepared]:
        if not self.bounds:
            return
        items = (
            iter(self.loader) if self.loader is not None else map(self.dataset.__getitem__, range(len(self.dataset)))
        )
        # the cores belong to the workers: this process's small CPU ops (layouts, row indices, joins) spread over
        # every core's thread ran 10-100x slower against them (6 ms for a torch.full of 66k elements on an H200
        # host); a model on the CPU keeps its threads for its forward
        threads = torch.get_num_threads()
        if self.loader is not None and self.device.type == "cuda":
            torch.set_num_threads(1)
        try:
            if self.transform is not None:
                yield from self._on_device(items)
            elif self.chunks is not None:
                yield from self._from_chunks(items)
            else:
                for kwargs, layout in items:
                    yield Prepared(_to_model(kwargs, self.device, self.dtype), layout)
        finally:
            torch.set_num_threads(threads)

    def _from_chunks(self, items: Iterator[tuple[dict[str, Any], Any]]) -> Iterator[Prepared]:
        pin = self.device.type == "cuda"
        for chunks in self.chunks:
            parts = [next(items)[0] for _ in chunks]
            kwargs = _to_model(_joined(parts, pin), self.device, self.dtype)
            yield self.model.prepare_inputs(kwargs)  # a processor output: the layout from its shapes, lazily

    def _on_device(self, items: Iterator[tuple[Tensor, Tensor]]) -> Iterator[Prepared]:
        """Decode and preprocess batch ``i + 1`` on a side stream, in a thread, while batch ``i`` runs."""
        from hooked_vlm.sae.gpu_preprocess import decode, unpack

        stream = torch.cuda.Stream(self.device)

        def prepare() -> tuple[Tensor, torch.cuda.Event] | None:
            packed = next(items, None)  # read here too: the files' bytes, when no worker process reads them
            if packed is None:
                return None
            with torch.cuda.stream(stream):
                pixels = self.transform(decode(unpack(*packed), self.device)).to(self.dtype)
                done = torch.cuda.Event()
                done.record(stream)
            return pixels, done

        with ThreadPoolExecutor(1, "harvest-decode", functools.partial(torch.cuda.set_device, self.device)) as worker:
            future: Future | None = worker.submit(prepare)
            try:
                while (ready := future.result()) is not None:
                    future = worker.submit(prepare)
                    pixels, done = ready
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(done)
                    pixels.record_stream(current)  # freed later on the side stream only once this stream is done
                    yield self.model.prepare_inputs(pixels)
                future = None
            finally:
                if future is not None:
                    future.cancel()
