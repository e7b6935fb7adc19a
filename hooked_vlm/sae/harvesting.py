"""Activation harvesting: rows ``[n, d]`` of chosen positions at chosen hook points, from images.

sae_lens's own activation store streams token ids; images reach its trainer through these iterators instead.
Every forward runs through :meth:`HookedVLM.run_with_cache` with the hook names as ``names_filter``, so the
model stops as soon as the last requested hook has fired (a vision hook of a VLM never runs the LM), and
positions are picked with the vocabulary of :mod:`hooked_vlm.positions` (``layout.mask(positions, hook)``):
``"all"`` (padding excluded), ``"cls"``, ``"patches"``, ``"image"`` / ``"text"`` / ``"newline"`` tokens of the LM,
indices, ``(row, col)`` pairs, a ``[rows, cols]`` bool patch mask, a union of these, or a callable.

Every row keeps where it came from (:data:`INDEX_COLUMNS`): the image (its index in the image source, whose
``ids`` name it), the batch row and position in the forward that produced it (batch ``image // batch_size``
of the source), and from the layout the tile, row and col of image patches (-1 elsewhere).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.cache import PATTERN_HOOKS, ActivationCache
from hooked_vlm.inputs import load_images
from hooked_vlm.layout import InputLayout, Kind, Selector, TowerLayout
from hooked_vlm.positions import Positions as PositionArgument
from hooked_vlm.positions import record
from hooked_vlm.taps import current_device

if TYPE_CHECKING:
    from hooked_vlm.adapter import Prepared
    from hooked_vlm.model import HookedVLM

#: The columns of a row's index: where in the image source and in the model input the row came from.
INDEX_COLUMNS = ("image", "batch_row", "position", "tile", "row", "col")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------------------------
# Image sources.


@dataclass
class ImageSource:
    """A fixed, ordered collection of images; ``ids[i]`` says where image ``i`` came from."""

    ids: list[str]
    description: str
    _load: Callable[[int, int], list[Any]]

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, start: int, stop: int) -> list[Any]:
        """Images ``start:stop`` as the source holds them (paths unopened)."""
        return self._load(start, stop)

    def load(self, start: int, stop: int) -> list[Image.Image]:
        """Images ``start:stop`` as RGB PIL images (paths opened, arrays converted)."""
        return load_images(self._load(start, stop))


def image_source(
    images: Any,
    *,
    image_column: str | None = None,
    id_column: str | None = None,
    ids: Sequence[str] | None = None,
) -> ImageSource:
    """An :class:`ImageSource` from a list of images / paths, a folder, or a Hugging Face ``datasets.Dataset``.

    A folder is read recursively in sorted order (ids: paths relative to it). A dataset's image column is found
    by its ``Image`` feature unless ``image_column`` names it (ids: ``id_column`` values, else row indices). A list
    has ids ``ids`` if given, else file paths for paths and indices for in-memory images.
    """
    if isinstance(images, ImageSource):
        return images
    datasets = sys.modules.get("datasets")  # only a loaded `datasets` can have made a Dataset
    if datasets is not None and isinstance(images, datasets.IterableDataset):
        raise TypeError("a streaming (iterable) dataset has no fixed order or length; pass a map-style Dataset")
    if datasets is not None and isinstance(images, datasets.Dataset):
        return _dataset_source(images, image_column, id_column)
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        root = Path(images)
        ids = _image_files(os.fspath(root))
        if not ids:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return ImageSource(ids, f"folder {root}", lambda start, stop: [root / i for i in ids[start:stop]])
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("no images given")
    if ids is None:
        ids = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else str(i) for i, x in enumerate(items)]
    if len(ids) != len(items):
        raise ValueError(f"{len(ids)} ids for {len(items)} images")
    return ImageSource(list(ids), f"list of {len(items)} images", lambda start, stop: items[start:stop])


def _image_files(root: str, prefix: str = "") -> list[str]:
    """The image files under ``root`` as ``/``-joined relative paths, in the order of sorted ``Path`` objects
    (part by part), by ``os.scandir``: pathlib took 0.15 ms a file (a 1.28M-image folder: 3 minutes)."""
    found: list[tuple[list[str], str]] = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir():
                found.extend((name.split("/"), name) for name in _image_files(entry.path, f"{prefix}{entry.name}/"))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                name = prefix + entry.name
                found.append((name.split("/"), name))
    return [name for _, name in sorted(found)]


def _dataset_source(dataset: Any, image_column: str | None, id_column: str | None) -> ImageSource:
    from datasets import Image as ImageFeature

    if image_column is None:
        columns = [name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
        if len(columns) != 1:
            raise ValueError(
                f"cannot tell the image column of the dataset (Image features: {columns}, all columns: "
                f"{dataset.column_names}); pass image_column="
            )
        image_column = columns[0]
    elif image_column not in dataset.column_names:
        raise ValueError(f"no column {image_column!r} in the dataset (columns: {dataset.column_names})")
    ids = [str(x) for x in dataset[id_column]] if id_column is not None else [str(i) for i in range(len(dataset))]
    name = getattr(dataset.info, "dataset_name", None) or "dataset"
    return ImageSource(ids, f"{name} ({len(dataset)} rows, column {image_column!r})",
                       lambda start, stop: dataset[start:stop][image_column])


# ---------------------------------------------------------------------------------------------------------------
# Selecting rows.


#: one selector for every hook, or one per hook name (``{"vision.blocks.3.hook_resid_post": "patches",
#: "lm.blocks.5.hook_resid_post": "image"}``: a vision and an LM hook harvested from the same forwards)
Positions = PositionArgument | Mapping[str, PositionArgument]


def positions_for(positions: Positions, hook_name: str) -> Selector:
    """The selector of ``hook_name``."""
    if isinstance(positions, Mapping):
        if hook_name not in positions:
            raise KeyError(f"no position selector for {hook_name!r} (given for: {sorted(positions)})")
        return positions[hook_name]
    return positions


def describe_positions(positions: Positions) -> str | dict | list | int:
    """A JSON-able record of a selector (or of one per hook), for manifests and SAE metadata: the form of
    :func:`hooked_vlm.positions.record` (a patch mask ``{"patch_mask": [[0, 1], ...]}``, a callable its name)."""
    if isinstance(positions, Mapping):
        return {name: describe_positions(selector) for name, selector in positions.items()}
    return record(positions)


def check_hooks(model: HookedVLM, hook_names: Sequence[str], positions: Positions) -> list[str]:
    """Canonical names of the requested hooks; unknown names, attention patterns and bad selectors raise here,
    before any image is loaded."""
    names = [hp.name for hp in model.resolve_names(list(hook_names))]
    if not names:
        raise ValueError("no hook names given")
    every_kind = torch.tensor([list(Kind)])
    minus = torch.full_like(every_kind, -1)
    for name in names:
        if name.rsplit(".", 1)[-1] in PATTERN_HOOKS:
            raise ValueError(f"{name!r} is an attention pattern [batch, head, q, k], not one vector per position")
        selector = positions_for(positions, name)
        if isinstance(selector, str):  # unknown names raise, listing the valid ones
            TowerLayout(every_kind, minus, minus, minus, minus).mask(selector)
    return names


def take(layout: InputLayout, hook_name: str, tensor: Tensor, positions: Selector) -> Float[Tensor, "n d"]:
    """The selected positions of a ``[batch, pos, ...]`` tensor at ``hook_name`` (an activation, or anything computed
    from it per position, e.g. SAE features) as rows, trailing axes flattened (per-head hooks: ``head · d_head``).

    Pooled hooks (``[batch, d]``, e.g. CLIP's ``hook_image_embeds``) give one row per image, for ``"all"`` only.
    """
    if tensor.dim() == 2:
        if not (isinstance(positions, str) and positions == "all"):
            raise ValueError(f"{hook_name!r} is pooled ([batch, d], one vector per image): use positions='all'")
        return tensor
    mask = layout.mask(positions, hook_name)
    if tuple(tensor.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"{hook_name!r} has shape {tuple(tensor.shape)}, but its layout is {tuple(mask.shape)} [batch, pos]")
    # indices found on the CPU: a boolean mask on the GPU would make the host wait for the forward to finish
    flat = mask.flatten().nonzero().squeeze(1)
    if tensor.is_cuda:
        flat = flat.pin_memory().to(tensor.device, non_blocking=True)
    return tensor.flatten(0, 1)[flat.to(tensor.device)].flatten(1)


def row_index(
    layout: InputLayout, hook_name: str, shape: Sequence[int], positions: Selector, first_image: int = 0
) -> Int[Tensor, "n 6"]:
    """The :data:`INDEX_COLUMNS` of the rows :func:`take` picks from a tensor of ``shape`` at ``hook_name``.

    ``first_image`` is the source index of the forward's first image; each prompt of a VLM holds one image, so a
    text position of batch row ``b`` belongs to image ``first_image + b``. Pooled rows have position -1.
    """
    if len(shape) == 2:
        batch = torch.arange(shape[0])
        minus = torch.full_like(batch, -1)
        return torch.stack([batch + first_image, batch, minus, minus, minus, minus], 1)
    batch, position = layout.mask(positions, hook_name).nonzero(as_tuple=True)
    tower = layout.tower_for(hook_name)
    image = tower.image[batch, position]
    image = torch.where(image >= 0, image, batch) + first_image
    return torch.stack(
        [image, batch, position, tower.tile[batch, position], tower.row[batch, position], tower.col[batch, position]], 1
    )


def select_rows(
    cache: ActivationCache, hook_name: str, positions: Selector, first_image: int = 0
) -> tuple[Float[Tensor, "n d"], Int[Tensor, "n 6"]]:
    """The rows of ``cache[hook_name]`` at the selected positions, and their :data:`INDEX_COLUMNS`."""
    act = cache[hook_name]
    rows = take(cache.layout, hook_name, act, positions)
    return rows, row_index(cache.layout, hook_name, act.shape, positions, first_image)


# ---------------------------------------------------------------------------------------------------------------
# Harvesting.


@dataclass
class HarvestBatch:
    """The selected rows of one forward over images ``start:stop`` of the source, per hook."""

    start: int
    stop: int
    acts: dict[str, Float[Tensor, "n d"]]
    index: dict[str, Int[Tensor, "n 6"]]  # INDEX_COLUMNS per row


def has_language_model(model: HookedVLM) -> bool:
    return model.adapter.has_language_model


def model_inputs(model: HookedVLM, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
    """``run_with_cache`` arguments for a batch: one prompt per image for a VLM (so every image is tiled as a
    single-image prompt is), the images as a batch for CLIP."""
    if has_language_model(model):
        return {"inputs": [[image] for image in images], "prompt": None if prompt is None else [prompt] * len(images)}
    if prompt is not None:
        raise ValueError(f"a {model.adapter.family} model takes no prompt")
    return {"inputs": images}


#: images from which a compiled harvest (inductor) makes up its compile time; fewer run eager (see _compiled_tower)
COMPILE_PAYS_OFF_IMAGES = 250_000


@contextmanager
def _compiled_tower(
    model: HookedVLM, names: list[str], compiled: bool | str | dict[str, Any], n_images: int | None
) -> Iterator[Any]:
    """A :class:`~hooked_vlm.compiled.CompiledHarvest` of ``names`` while the block runs (``None`` if not asked
    for, or not worth it): entered once, so that a harvest over many batches (and epochs) compiles once.

    Compiling CLIP-L/14 with inductor took 15–95 s on an H100 and an H200 (mode and attention kernels), and saves
    about 0.07 ms per image there (3,019 against 2,510 images/s): it is made up after about 200,000–1,300,000
    images, so a harvest of fewer than :data:`COMPILE_PAYS_OFF_IMAGES` images (``n_images``; ``None``: an endless
    stream) runs eager and says so in a log line, unless ``compiled="always"`` (or a dict of ``torch.compile``
    arguments with ``"min_images"``: the threshold). Other backends (``"eager"``, ``"aot_eager"``) compile in a
    moment and always run.
    """
    if not compiled:
        yield None
        return
    if compiled not in (True, "always") and not isinstance(compiled, dict):
        raise ValueError(f"compiled={compiled!r}: give True, 'always', a dict of torch.compile arguments, or False")
    kwargs = dict(compiled) if isinstance(compiled, dict) else {}
    min_images = kwargs.pop("min_images", 0 if compiled == "always" else COMPILE_PAYS_OFF_IMAGES)
    if kwargs.get("backend", "inductor") == "inductor" and n_images is not None and n_images < min_images:
        logging.getLogger("hooked_vlm.compiled").warning(
            "compiled harvest not worth it for %d images: compiling costs 15-95 s and saves about 0.07 ms per image "
            "(CLIP-L/14, H200), so it pays off from about %d images; running eager (compiled='always' compiles "
            "anyway)", n_images, min_images)
        yield None
        return
    from hooked_vlm.compiled import CompiledHarvest

    with CompiledHarvest(model, names, compile_kwargs=kwargs or None) as tower:
        yield tower


def _prepared_batches(
    model: HookedVLM, source: ImageSource, prompt: str | None, bounds: list[tuple[int, int]], prefetch: bool,
) -> Iterator[Prepared]:
    """The prepared model inputs of images ``first:last`` for each ``(first, last)`` of ``bounds``, in order.

    With ``prefetch``, one worker thread loads and prepares the next batch while the caller runs the current
    forward: decoding, resizing and the processor's array work release the GIL, so the GPU does not sit idle
    between forwards waiting on the CPU. An error in the worker is raised here, when its batch is asked for; the
    worker is joined when the generator ends, raises or is closed early.
    """

    def prepare(bound: tuple[int, int]) -> Prepared:
        return model.prepare_inputs(**model_inputs(model, source.load(*bound), prompt))

    if not prefetch:
        yield from map(prepare, bounds)
        return
    if not bounds:
        return
    device = current_device(model.raw_model)
    # prepare_inputs moves the batch to the model's device; the CUDA device is per thread, and the worker's would
    # otherwise be cuda:0 (every rank of a data-parallel harvest would then open a context on GPU 0)
    initializer = functools.partial(torch.cuda.set_device, device) if device.type == "cuda" else None
    with ThreadPoolExecutor(1, "harvest-prefetch", initializer) as worker:
        future = worker.submit(prepare, bounds[0])
        try:
            for following in [*bounds[1:], None]:
                prepared = future.result()
                future = None if following is None else worker.submit(prepare, following)
                yield prepared
        finally:
            if future is not None:
                future.cancel()  # not started yet: never runs; running: the executor's exit waits for it


@contextmanager
def _batch_source(
    model: HookedVLM, source: ImageSource, prompt: str | None, bounds: list[tuple[int, int]], prefetch: bool,
    workers: int, preprocess: str,
) -> Iterator[Any]:
    """Something to iterate (as often as needed) for the prepared batches of ``bounds``: worker processes or the
    GPU path (:class:`~hooked_vlm.sae.pipeline.BatchLoader`, closed at the end), else this process's own threads."""
    if workers or preprocess != "processor":
        from hooked_vlm.sae.pipeline import BatchLoader

        loader = BatchLoader(model, source, prompt, bounds, workers, preprocess)
        try:
            yield loader
        finally:
            loader.close()
        return

    class _Threads:
        def __iter__(self) -> Iterator[Prepared]:
            return _prepared_batches(model, source, prompt, bounds, prefetch)

    yield _Threads()


def _forwards(
    model: HookedVLM, batches: Any, bounds: list[tuple[int, int]], names: list[str], positions: Positions,
    device: Any, dtype: torch.dtype | None, tower: Any, progress: bool,
) -> Iterator[HarvestBatch]:
    total = sum(last - first for first, last in bounds)
    prepared_batches = iter(batches)
    with tqdm(total=total, desc="harvest", unit="img", disable=not progress) as bar, closing(prepared_batches):
        for (first, last), prepared in zip(bounds, prepared_batches, strict=True):
            with torch.no_grad():
                if tower is None:
                    _, cache = model.run_with_cache(prepared, names_filter=names, device=device, dtype=dtype)
                else:
                    captured = tower(prepared)
                    cache = ActivationCache({n: t.to(device=device, dtype=dtype) for n, t in captured.items()},
                                            prepared.layout)
            selected = {name: select_rows(cache, name, positions_for(positions, name), first) for name in names}
            yield HarvestBatch(first, last, {n: r for n, (r, _) in selected.items()},
                               {n: i for n, (_, i) in selected.items()})
            bar.update(last - first)


def harvest(
    model: HookedVLM,
    images: Any,
    hook_names: str | Sequence[str],
    *,
    positions: Positions = "all",
    prompt: str | None = None,
    batch_size: int = 16,
    start: int = 0,
    stop: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compiled: bool | str | dict[str, Any] = False,
    progress: bool = True,
    prefetch: bool = True,
    workers: int = 0,
    preprocess: str = "processor",
) -> Iterator[HarvestBatch]:
    """One :class:`HarvestBatch` per forward over ``batch_size`` images of ``images`` (from ``start`` to ``stop``).

    ``images``: anything :func:`image_source` takes. ``positions``: a selector for every hook, or a dict of one
    per hook (a named selector that picks nothing in a hook's sequence raises: ``"image"`` tokens are LM
    positions, vision towers have ``"patches"`` and ``"cls"``). ``prompt``: the user message a VLM sees with
    each image. Activations stay on the model's device unless ``device`` says otherwise (keep them on the GPU
    to train there), in the model's dtype unless ``dtype`` is given.

    ``compiled`` runs the forwards through :class:`hooked_vlm.compiled.CompiledHarvest` (the hooks' tower alone,
    truncated after the deepest hook, through ``torch.compile``; a dict gives ``torch.compile`` arguments): for
    long harvests of one tower of the families that support it (CLIP), on a GPU. Below
    :data:`COMPILE_PAYS_OFF_IMAGES` images the compile time is not made up and the harvest runs eager (a log line
    says so); ``compiled="always"`` compiles anyway (in a dict: ``"min_images": 0``).

    ``prefetch`` loads and prepares the next batch in a worker thread while the current forward runs (the rows
    are the same either way); the image source is then read from that thread, which lists, folders and datasets
    allow. Turn it off for a source that must be read from the calling thread.

    ``workers`` > 0 loads and prepares batches in that many forked worker processes instead
    (:mod:`hooked_vlm.sae.pipeline`; :func:`~hooked_vlm.sae.pipeline.default_workers` is every core but one):
    the same rows, provenance and order, for when one thread cannot keep up with the GPU.

    ``preprocess="gpu"`` decodes JPEGs with nvJPEG and runs the processor's resize, crop and normalise on the
    model's GPU (:mod:`hooked_vlm.sae.gpu_preprocess`; fixed-size processors: CLIP, SigLIP, open_clip), the
    ``workers`` only reading files: for when even every core cannot keep up. Pixel values differ from the CPU
    processor's by the decoder's rounding (measured in doc/benchmarks.md).
    """
    names = check_hooks(model, [hook_names] if isinstance(hook_names, str) else hook_names, positions)
    source = image_source(images)
    stop = len(source) if stop is None else min(stop, len(source))
    bounds = [(first, min(first + batch_size, stop)) for first in range(start, stop, batch_size)]
    with (_compiled_tower(model, names, compiled, max(0, stop - start)) as tower,
          _batch_source(model, source, prompt, bounds, prefetch, workers, preprocess) as batches):
        yield from _forwards(model, batches, bounds, names, positions, device, dtype, tower, progress)


def activation_stream(
    model: HookedVLM,
    images: Any,
    hook_names: str | Sequence[str],
    *,
    positions: Positions = "all",
    prompt: str | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    compiled: bool | str | dict[str, Any] = False,
    loop: bool = True,
    progress: bool = True,
    prefetch: bool = True,
    workers: int = 0,
    preprocess: str = "processor",
) -> Iterator[Tensor] | Iterator[dict[str, Tensor]]:
    """Activation rows for training: ``[n, d]`` per forward for one hook, ``{hook: [n, d]}`` for several.

    With ``loop`` the images are gone through again and again (sae_lens trainers call ``next`` until they have
    seen their number of samples). Rows come in image order: shuffle them with a mixing buffer
    (:func:`sae_lens.training.mixing_buffer.mixing_buffer`), as :func:`~hooked_vlm.sae.train_sae` does.
    ``compiled``: as for :func:`harvest` (compiled once for all passes; an endless stream is always worth it);
    ``prefetch``, ``workers``, ``preprocess``: as for :func:`harvest` (the worker processes stay up from one pass
    to the next).
    """
    names = check_hooks(model, [hook_names] if isinstance(hook_names, str) else hook_names, positions)
    source = image_source(images)
    bounds = [(first, min(first + batch_size, len(source))) for first in range(0, len(source), batch_size)]
    with (_compiled_tower(model, names, compiled, None if loop else len(source)) as tower,
          _batch_source(model, source, prompt, bounds, prefetch, workers, preprocess) as batches):
        for epoch in itertools.count():
            for batch in _forwards(model, batches, bounds, names, positions, device, dtype, tower,
                                   progress and epoch == 0):
                yield batch.acts[names[0]] if isinstance(hook_names, str) else batch.acts
            if not loop:
                return
