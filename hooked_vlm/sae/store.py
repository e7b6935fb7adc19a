"""A disk store of harvested activations: sharded safetensors plus a JSON manifest.

Layout of a store folder (default ``models/activations/<model>/<hooks>__<positions>``)::

    manifest.json            model, hook names, widths, position selector, prompt, dtype, batch size, the id of
                             every image of the source, how many images are done, and the list of shards
    shard_00000.safetensors  per hook: ``acts/<hook>`` [n, d] and ``index/<hook>`` [n, 6] (INDEX_COLUMNS)
    ...

Writing is crash-safe and resumable: a shard holds whole forwards (all rows of its images), is written to a
temporary file and renamed, and only then is it added to the manifest (also written to a temporary file and
renamed) with its byte size and sha256. After an interruption, harvesting the same source into the same folder
removes files the manifest does not list, checks every listed shard against its size and sha256 (a truncated
or altered shard, and every shard after it, is harvested again, with a warning naming the file) and continues
with the first image no good listed shard holds: no row is lost or written twice. One process writes a store at
a time: a writer holds an exclusive lock on ``writer.lock`` (``fcntl.flock``, released by the system when the
process dies, so a killed harvest leaves no stale lock), and a second writer gets :class:`StoreLockedError`.

Reading checks what it reads: the file is the size the manifest says, its sha256 is the manifest's (the first
time a store object reads a whole shard; ``ActivationStore(path, verify=False)`` skips the hash), its row count is
the manifest's, and the images its rows name lie in the shard's image range of the manifest, in order (so two
swapped shard files are caught even without hashing). Shard files must lie inside the store folder. Errors name
the file. :meth:`ActivationStore.trace` and single-row reads open only the one key they need (``safe_open``).

A data-parallel harvest (``torchrun``; see :mod:`hooked_vlm.sae.distributed`) writes one such store per rank, for
its run of images (``image_range`` in its manifest), and the manifest at the top lists their shards::

    manifest.json            the same settings, "parts": ["rank-0-of-2", "rank-1-of-2"], and every part's shards
    rank-0-of-2/             images 0:k, a store of its own (manifest.json, shard_00000.safetensors, ...)
    rank-1-of-2/             images k:n
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from torch import Tensor

from hooked_vlm.sae.distributed import part_folder, process_group_rank, rank_images
from hooked_vlm.sae.harvesting import (
    INDEX_COLUMNS,
    ImageSource,
    Positions,
    check_hooks,
    describe_positions,
    harvest,
    image_source,
)

if TYPE_CHECKING:
    from hooked_vlm.model import HookedVLM

FORMAT = "hooked_vlm.activations/1"
MANIFEST = "manifest.json"
LOCK = "writer.lock"
_log = logging.getLogger(__name__)
DEFAULT_ROOT = Path("models/activations")
#: manifest keys a resumed harvest must agree on (and the parts of a data-parallel harvest, but for image_range)
_SETTINGS = ("model", "hook_names", "positions", "prompt", "dtype", "batch_size", "image_ids", "image_range")


class StoreMismatchError(ValueError):
    """Resuming a store with a different model, hooks, selector, prompt, dtype, batch size or images; merging
    parts that differ so; mixing a single-process and a data-parallel harvest in one folder."""


class StoreLockedError(RuntimeError):
    """Another process is writing this store (it holds ``writer.lock``)."""


class CorruptStoreError(ValueError):
    """A store file is missing, truncated, altered, out of place or unreadable; the message names the file."""


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def checkpoint_name(model: HookedVLM) -> str:
    """``model.name`` (kept for callers of the old name)."""
    return model.name


def default_store_path(model: str, hook_names: Sequence[str], positions: Positions) -> Path:
    """``models/activations/<model>/<hook or first hook+n>__<positions>`` (the research layout)."""
    hooks = hook_names[0] + (f"+{len(hook_names) - 1}" if len(hook_names) > 1 else "")
    described = describe_positions(positions)
    selector = described if isinstance(described, str) else "custom"
    return DEFAULT_ROOT / slug(model) / f"{slug(hooks)}__{slug(selector)}"


@functools.lru_cache(maxsize=2)
def _json_list(items: tuple[str, ...]) -> str:
    return json.dumps(list(items))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON, written to a temporary file and renamed. A manifest's ``image_ids`` (a million images:
    about 20 MB of JSON, rewritten after every shard) are serialised once per store, not once per shard."""
    temporary = path.with_name(path.name + ".tmp")
    ids = data.get("image_ids")
    if isinstance(ids, list) and len(data) > 1:
        rest = json.dumps({k: v for k, v in data.items() if k != "image_ids"}, indent=1)
        temporary.write_text(f'{rest[:-2]},\n "image_ids": {_json_list(tuple(ids))}\n}}')
    else:
        temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptStoreError(f"{path} is not a readable manifest ({error}); harvest the store again "
                                "(overwrite=True)") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise CorruptStoreError(f"{path} is not an activation-store manifest (no list of shards)")
    # written before data-parallel harvests: a store then always held the whole source
    manifest.setdefault("image_range", [0, len(manifest["image_ids"])])
    return manifest


def _shard_path(store: Path, entry: dict[str, Any]) -> Path:
    """The file of a manifest's shard entry, which must lie inside the store folder (a manifest is data)."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CorruptStoreError(f"{store / MANIFEST} lists a shard file {name!r} outside the store folder")
    return store / name


def _check_file(file: Path, entry: dict[str, Any], *, hashed: bool) -> bytes | None:
    """Raise unless ``file`` exists and has the manifest's size (and sha256, reading it whole: returned)."""
    if not file.is_file():
        raise CorruptStoreError(f"shard {file} listed in the manifest is missing")
    size = file.stat().st_size
    if "size" in entry and size != entry["size"]:
        raise CorruptStoreError(f"{file} is {size} bytes, the manifest says {entry['size']} (truncated or "
                                "rewritten); harvest the store again to redo it")
    if not hashed:
        return None
    data = file.read_bytes()
    if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptStoreError(f"{file} does not match its sha256 in the manifest (altered, or another shard's "
                                "file); harvest the store again to redo it")
    return data


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Hold ``path/writer.lock`` exclusively; a second writer (any process) gets :class:`StoreLockedError`."""
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text().strip() or "another process"
            raise StoreLockedError(f"{path} is being written by {holder} (it holds {lock}); wait for that harvest "
                                   "to end, or harvest into another folder") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _keep_good_shards(path: Path, manifest: dict[str, Any]) -> None:
    """Drop the first listed shard that fails its checks and every one after it, so they are harvested again."""
    for number, entry in enumerate(manifest["shards"]):
        file = _shard_path(path, entry)
        try:
            data = _check_file(file, entry, hashed=True)
            if "sha256" not in entry:  # written before checksums: at least it must load, with the listed rows
                tensors = load_bytes(data)
                if any(len(tensors[f"acts/{h}"]) != n for h, n in entry["rows"].items()):
                    raise CorruptStoreError(f"{file} holds other row counts than the manifest lists")
                entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        except (CorruptStoreError, SafetensorError, KeyError) as error:
            dropped = [e["file"] for e in manifest["shards"][number:]]
            _log.warning("%s: %s; harvesting images %d: again (dropping %s)", path, error, entry["images"][0],
                         ", ".join(dropped))
            manifest["n_images_done"] = entry["images"][0]
            del manifest["shards"][number:]
            _write_json(path / MANIFEST, manifest)
            return


class ActivationStore:
    """A store folder, opened for reading (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        """``verify``: check each shard's sha256 the first time this object reads it whole (sizes, row counts and
        image ranges are always checked); ``False`` skips the hash, for speed on a store already checked."""
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"no activation store at {self.path} ({MANIFEST} missing)")
        self.manifest: dict[str, Any] = _read_manifest(manifest)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest} is not a {FORMAT} manifest")
        for entry in self.manifest["shards"]:
            _shard_path(self.path, entry)
        self.verify = verify
        self._verified: set[int] = set()

    def __repr__(self) -> str:
        rows = ", ".join(f"{h}: {n}" for h, n in self.n_rows.items())
        start, stop = self.image_range
        state = "complete" if self.complete else f"{self.manifest['n_images_done'] - start}/{stop - start} images"
        if (start, stop) != (0, len(self.image_ids)):
            state = f"images {start}:{stop} of {len(self.image_ids)}, {state}"
        return f"ActivationStore({self.path}, {state}, rows {{{rows}}})"

    # ---- what is in it -------------------------------------------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        return list(self.manifest["hook_names"])

    @property
    def image_ids(self) -> list[str]:
        return list(self.manifest["image_ids"])

    def positions(self, hook_name: str) -> str | dict:
        """The selector ``hook_name``'s rows were harvested with (as :func:`describe_positions` wrote it)."""
        described = self.manifest["positions"]
        return described[hook_name] if isinstance(described, dict) and not {"patch_mask", "patches"} & set(described) else described

    @property
    def image_range(self) -> tuple[int, int]:
        """The images ``start:stop`` of the source this store holds: all of them but in one rank's part."""
        start, stop = self.manifest["image_range"]
        return start, stop

    @property
    def complete(self) -> bool:
        return self.manifest["n_images_done"] == self.image_range[1]

    @property
    def n_rows(self) -> dict[str, int]:
        return {h: sum(shard["rows"][h] for shard in self.manifest["shards"]) for h in self.hook_names}

    def d_in(self, hook_name: str) -> int:
        return self.manifest["d_in"][hook_name]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    # ---- reading ---------------------------------------------------------------------------------------------------
    def _hooks(self, hook_names: str | Sequence[str] | None) -> list[str]:
        names = self.hook_names if hook_names is None else [hook_names] if isinstance(hook_names, str) else list(hook_names)
        unknown = [h for h in names if h not in self.manifest["hook_names"]]
        if unknown:
            raise KeyError(f"{unknown} not in this store (hooks: {self.hook_names})")
        return names

    def _load(self, i: int, keys: list[str], *, whole: bool) -> dict[str, Tensor]:
        """Tensors ``keys`` of shard ``i``: the whole file read and its sha256 checked (``whole``, once per shard
        and object, when ``verify``), else only those keys (``safe_open``). The size is always checked."""
        entry = self.manifest["shards"][i]
        file = _shard_path(self.path, entry)
        hashed = whole and self.verify and i not in self._verified and "sha256" in entry
        try:
            if hashed:
                data = _check_file(file, entry, hashed=True)
                self._verified.add(i)
                tensors = load_bytes(data)
                missing = [k for k in keys if k not in tensors]
                found = {k: tensors[k] for k in keys if k in tensors}
            else:
                _check_file(file, entry, hashed=False)
                with safe_open(file, "pt") as handle:
                    present = set(handle.keys())
                    missing = [k for k in keys if k not in present]
                    found = {k: handle.get_tensor(k) for k in keys if k in present}
        except SafetensorError as error:
            raise CorruptStoreError(f"{file} is not a readable safetensors file ({error}); harvest the store "
                                    "again to rewrite it") from error
        if missing:
            raise CorruptStoreError(f"{file} lacks {missing}: it is not the shard {MANIFEST} lists")
        return found

    def shard(self, i: int, hook_names: str | Sequence[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(acts, index)`` of shard ``i``, per hook, checked against the manifest (size, sha256, rows, images)."""
        names = self._hooks(hook_names)
        tensors = self._load(i, [k for h in names for k in (f"acts/{h}", f"index/{h}")], whole=True)
        acts, index = {h: tensors[f"acts/{h}"] for h in names}, {h: tensors[f"index/{h}"] for h in names}
        for h in names:
            self._check_rows(i, h, len(acts[h]), index[h])
        return acts, index

    def _check_rows(self, i: int, hook: str, n_acts: int, index: Tensor, *, all_rows: bool = True) -> None:
        """The rows of shard ``i`` are as many as the manifest says and name images of its range, in order
        (``index`` holds all of them, or with ``all_rows=False`` a few)."""
        entry = self.manifest["shards"][i]
        file = self.path / entry["file"]
        expected = entry["rows"][hook]
        if n_acts != expected or (all_rows and len(index) != expected):
            raise CorruptStoreError(f"{file} holds {n_acts} rows of {hook} ({len(index)} index rows), "
                                    f"{self.path / MANIFEST} says {expected}")
        start, stop = entry["images"]
        images = index[:, 0]
        if len(images) and (images.min() < start or images.max() >= stop or (images.diff() < 0).any()):
            raise CorruptStoreError(f"{file} holds rows of images {int(images.min())}..{int(images.max())}, but "
                                    f"{self.path / MANIFEST} lists it for images {start}:{stop} (files swapped or "
                                    "copied from another store?)")

    def read(self, hook_name: str) -> Float[Tensor, "n d"]:
        """Every row of ``hook_name``, in harvest order."""
        return torch.cat([self.shard(i, hook_name)[0][hook_name] for i in range(self.n_shards)])

    def index(self, hook_name: str) -> Int[Tensor, "n 6"]:
        """The :data:`INDEX_COLUMNS` of every row of ``hook_name``, in harvest order."""
        return torch.cat([self.shard(i, hook_name)[1][hook_name] for i in range(self.n_shards)])

    def trace(self, hook_name: str, row: int) -> dict[str, Any]:
        """Where row ``row`` of ``hook_name`` came from: image id and index, batch row, position, tile, row, col."""
        hook = self._hooks(hook_name)[0]
        total = self.n_rows[hook]
        if not -total <= row < total:
            raise IndexError(f"row {row} out of range: the store holds {total} rows of {hook}")
        row %= total
        number = 0  # only this row of this shard's index is read
        while row >= self.manifest["shards"][number]["rows"][hook]:
            row -= self.manifest["shards"][number]["rows"][hook]
            number += 1
        shard = self.manifest["shards"][number]
        file = _shard_path(self.path, shard)
        key = f"index/{hook}"
        try:
            _check_file(file, shard, hashed=False)
            with safe_open(file, "pt") as handle:
                if key not in set(handle.keys()):
                    raise CorruptStoreError(f"{file} lacks {key}: it is not the shard {MANIFEST} lists")
                piece = handle.get_slice(key)
                n_index = piece.get_shape()[0]
                values = piece[row : row + 1]
        except SafetensorError as error:
            raise CorruptStoreError(f"{file} is not a readable safetensors file ({error})") from error
        if n_index != shard["rows"][hook]:
            raise CorruptStoreError(f"{file} holds {n_index} index rows of {hook}, {self.path / MANIFEST} says "
                                    f"{shard['rows'][hook]}")
        self._check_rows(number, hook, shard["rows"][hook], values, all_rows=False)
        entry = dict(zip(INDEX_COLUMNS, values[0].tolist(), strict=True))
        return {"image_id": self.image_ids[entry["image"]], **entry}

    def stream(
        self,
        hook_names: str | Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        loop: bool = False,
        buffer_shards: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[Tensor] | Iterator[dict[str, Tensor]]:
        """Batches of ``batch_size`` rows (``[batch, d]``, or ``{hook: [batch, d]}`` for several hooks).

        With ``shuffle``, shards come in a random order and rows are shuffled across ``buffer_shards`` shards at
        a time (rows of one image are correlated: mixing several shards keeps them apart). Without ``loop`` the
        stream ends after one pass, with a last, smaller batch; with ``loop`` it never ends and every batch is
        full (what sae_lens trainers need). Several hooks must have the same rows (same tower and selector).
        """
        names = self._hooks(hook_names)
        if not self.manifest["shards"]:
            raise ValueError(f"the store at {self.path} has no shards yet")
        generator = torch.Generator().manual_seed(seed)
        leftover: dict[str, Tensor] | None = None
        while True:
            order = torch.randperm(self.n_shards, generator=generator) if shuffle else torch.arange(self.n_shards)
            for group in order.split(buffer_shards):
                parts = [self.shard(int(i), names)[0] for i in group]
                if leftover is not None:
                    parts.insert(0, leftover)
                rows = {h: torch.cat([p[h] for p in parts]) for h in names}
                counts = {h: len(r) for h, r in rows.items()}
                if len(set(counts.values())) > 1:
                    raise ValueError(f"the hooks have different row counts {counts}: stream them one at a time")
                n = counts[names[0]]
                if shuffle:
                    permutation = torch.randperm(n, generator=generator)
                    rows = {h: r[permutation] for h, r in rows.items()}
                rows = {h: r.to(device=device, dtype=dtype) for h, r in rows.items()}
                full = n - n % batch_size
                for i in range(0, full, batch_size):
                    batch = {h: r[i : i + batch_size] for h, r in rows.items()}
                    yield batch[names[0]] if isinstance(hook_names, str) else batch
                leftover = {h: r[full:] for h, r in rows.items()}
            if not loop:
                break
        if leftover is not None and len(leftover[names[0]]):
            yield leftover[names[0]] if isinstance(hook_names, str) else leftover


def harvest_to_store(
    model: HookedVLM,
    images: Any,
    hook_names: str | Sequence[str],
    path: str | os.PathLike | None = None,
    *,
    positions: Positions = "all",
    prompt: str | None = None,
    batch_size: int = 16,
    dtype: torch.dtype | None = None,
    shard_mb: float = 256.0,
    overwrite: bool = False,
    compiled: bool | dict[str, Any] = False,
    progress: bool = True,
    model_name: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    prefetch: bool = True,
    workers: int = 0,
    preprocess: str = "processor",
) -> ActivationStore:
    """Harvest ``images`` into a store at ``path``, resuming a store that was interrupted.

    ``dtype`` (default: the model's) is what rows are stored in; rows are bit-exact copies of the activations
    when it is the model's. Shards are cut after about ``shard_mb`` megabytes (all hooks together). A folder
    holding a store of other settings raises :class:`StoreMismatchError` unless ``overwrite``, which starts over.
    ``model_name`` is recorded in the manifest (default: the checkpoint's name). ``compiled``, ``prefetch``,
    ``workers`` (loading processes) and ``preprocess``: as for :func:`~hooked_vlm.sae.harvest`.

    Data-parallel: in an initialised ``torch.distributed`` process group (``torchrun``), every rank harvests its
    run of images (:func:`~hooked_vlm.sae.distributed.rank_images`) into ``path/rank-R-of-W``, a resumable store
    of its own, with the model on its own device; rank 0 then merges the parts (:func:`merge_stores`) and every
    rank returns the merged store. Progress is shown by rank 0 only. Given ``rank`` and ``world_size`` instead
    (separate jobs, no process group), the call harvests that rank's part only and returns it: merge with
    :func:`merge_stores` once every part is done. Rows are those of a single-process harvest, in the same order.
    """
    names = check_hooks(model, [hook_names] if isinstance(hook_names, str) else hook_names, positions)
    source = image_source(images)
    name = model_name or checkpoint_name(model)
    path = Path(path) if path is not None else default_store_path(name, names, positions)
    dtype = dtype or next(p.dtype for p in model.raw_model.parameters() if p.is_floating_point())
    settings = {
        "model": name,
        "hook_names": names,
        "positions": describe_positions(positions),
        "prompt": prompt,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "image_ids": source.ids,
        "image_range": [0, len(source)],
    }
    into = functools.partial(_harvest, model, source, names, positions=positions, prompt=prompt,
                             batch_size=batch_size, dtype=dtype, shard_mb=shard_mb, overwrite=overwrite,
                             compiled=compiled, prefetch=prefetch, workers=workers,
                             preprocess=preprocess)
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size (a part of a data-parallel harvest), or neither")
    group = process_group_rank() if rank is None else None  # under torchrun: (rank, world_size)
    if group is not None:
        rank, world_size = group
    elif rank is None or world_size is None:
        return into(path, settings, progress=progress)

    if overwrite and rank == 0:  # the other ranks only write their own parts meanwhile
        _remove_parts(path, keep=[part_folder(r, world_size) for r in range(world_size)])
        for file in [path / MANIFEST, *path.glob("shard_*")]:
            file.unlink(missing_ok=True)
    elif not overwrite:
        _refuse_single_process_store(path)
    start, stop = rank_images(len(source), batch_size, rank, world_size)
    part = into(path / part_folder(rank, world_size), settings | {"image_range": [start, stop]},
                progress=progress and (group is None or rank == 0))
    if group is None:
        return part
    import torch.distributed as dist

    dist.barrier()  # every part is written
    if rank == 0:
        merge_stores(path)
    dist.barrier()  # the merged manifest is written
    return ActivationStore(path)


#: shards hashed and written at once (each by its own thread): hashing runs at about 2 GB/s per core, so one
#: thread would fall behind a GPU that makes 1.3 GB of rows a second (CLIP-L/14 patches, bf16)
WRITERS = 3


def _harvest(
    model: HookedVLM, source: ImageSource, names: list[str], path: Path, settings: dict[str, Any], *,
    positions: Positions, prompt: str | None, batch_size: int, dtype: torch.dtype, shard_mb: float, overwrite: bool,
    compiled: bool | str | dict[str, Any], progress: bool, prefetch: bool, workers: int = 0,
    preprocess: str = "processor",
) -> ActivationStore:
    """Harvest images ``settings["image_range"]`` of ``source`` into the store at ``path``, resuming it.

    Shards are written by :data:`WRITERS` threads while the next forwards run, and listed in the manifest in
    order, each once it and every shard before it are on disk (at most ``WRITERS`` shards in writing and one
    filling, so memory stays bounded); an error in a writer is raised here.
    """
    with _writer_lock(path), ThreadPoolExecutor(WRITERS, thread_name_prefix="store-writer") as writers:
        manifest = _open_for_writing(path, settings, overwrite)
        manifest["source"] = source.description
        pending: list[Any] = []
        pending_bytes = 0
        writing: deque[tuple[Future, int]] = deque()

        def list_written(keep: int, interrupted: bool = False) -> None:
            """List finished shards in order, waiting until at most ``keep`` are in writing (``interrupted``: up to
            the first that failed, whose error is not raised over the one that interrupted the harvest)."""
            while writing and (len(writing) > keep or writing[0][0].done()):
                future, stop = writing.popleft()
                if interrupted and future.exception() is not None:
                    return
                manifest["shards"].append(future.result())
                manifest["n_images_done"] = stop
                _write_json(path / MANIFEST, manifest)

        def flush() -> None:
            nonlocal pending, pending_bytes
            list_written(WRITERS - 1)
            manifest["d_in"] = {hook: pending[0].acts[hook].shape[-1] for hook in names}
            number = len(manifest["shards"]) + len(writing)
            writing.append((writers.submit(_write_shard, path, number, names, pending), pending[-1].stop))
            pending, pending_bytes = [], 0

        # rows are selected on the model's device, and only they are copied to the CPU, not whole activations
        batches = harvest(model, source, names, positions=positions, prompt=prompt, batch_size=batch_size,
                          start=manifest["n_images_done"], stop=settings["image_range"][1], dtype=dtype,
                          compiled=compiled, progress=progress, prefetch=prefetch, workers=workers,
                          preprocess=preprocess)
        while True:
            try:
                batch = next(batches, None)
            except BaseException:
                # the harvest failed (an image, the model, an interrupt): shards already handed to the writers are
                # whole, so they finish and are listed, and a resume keeps them (a failed manifest write is not
                # retried: it raises from list_written, as a crash there would leave the store)
                list_written(0, interrupted=True)
                raise
            if batch is None:
                break
            _start_copy_to_host(batch)
            pending.append(batch)
            pending_bytes += sum(a.numel() * a.element_size() for a in batch.acts.values())
            if pending_bytes >= shard_mb * 2**20:
                flush()
            list_written(WRITERS)
        if pending:
            flush()
        list_written(0)
    return ActivationStore(path)


def _start_copy_to_host(batch: Any) -> None:
    """Start copying a batch's rows from the GPU into pinned host memory without waiting for it (the writer
    thread waits, just before it writes them); rows already on the CPU stay as they are."""
    on_gpu = [rows for rows in batch.acts.values() if rows.is_cuda]
    if not on_gpu:
        return
    copies = {}
    for hook, rows in batch.acts.items():
        if rows.is_cuda:
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            rows = host
        copies[hook] = rows
    batch.copied = torch.cuda.Event()
    batch.copied.record()  # on the current stream, after the copies
    batch.acts = copies


def _finish_copy_to_host(batch: Any) -> None:
    copied = getattr(batch, "copied", None)
    if copied is not None:
        copied.synchronize()
        batch.copied = None


def _open_for_writing(path: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue from (a fresh one for a new folder); stray files from a crash are removed."""
    manifest_path = path / MANIFEST
    if manifest_path.is_file() and not overwrite:
        manifest = _read_manifest(manifest_path)
        different = [key for key in _SETTINGS if manifest.get(key) != settings[key]]
        if different:
            raise StoreMismatchError(
                f"{path} holds a store harvested with other {', '.join(different)}; harvest into another folder "
                "or pass overwrite=True to start it over"
            )
    else:
        if overwrite and path.is_dir():
            for file in path.glob("shard_*.safetensors*"):
                file.unlink()
            _remove_parts(path)
        manifest = {"format": FORMAT, **settings, "index_columns": list(INDEX_COLUMNS), "d_in": {},
                    "n_images_done": settings["image_range"][0], "shards": []}
        path.mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, manifest)
    _keep_good_shards(path, manifest)
    listed = {shard["file"] for shard in manifest["shards"]}
    for file in path.glob("shard_*"):
        if file.name not in listed:  # written after the last manifest update, or half-written: redone below
            file.unlink()
    return manifest


def _parts(path: Path) -> list[Path]:
    """The part folders (``rank-R-of-W``) of data-parallel harvests in ``path``."""
    return sorted(folder for folder in path.glob("rank-*-of-*") if folder.is_dir())


def _remove_parts(path: Path, keep: Sequence[str] = ()) -> None:
    for folder in _parts(path):
        if folder.name not in keep:
            shutil.rmtree(folder)


def _refuse_single_process_store(path: Path) -> None:
    manifest = path / MANIFEST
    if manifest.is_file() and "parts" not in _read_manifest(manifest):
        raise StoreMismatchError(
            f"{path} holds a store harvested by a single process; a data-parallel harvest writes parts next to it "
            "that could not be merged: harvest into another folder or pass overwrite=True to start it over"
        )


def merge_stores(path: str | os.PathLike) -> ActivationStore:
    """Merge the parts of a data-parallel harvest (the stores in ``path/rank-R-of-W``) into one store at ``path``.

    The manifest written at ``path`` lists every part's shards in image order; the shard files stay where the
    parts wrote them. The parts must share their settings (model, hooks, selector, prompt, dtype, batch size,
    images), be complete, and hold runs of images that neither overlap nor leave a gap; otherwise this raises,
    naming the parts and images at fault. ``harvest_to_store`` calls it under ``torchrun``; call it yourself when
    the ranks ran as separate jobs (``harvest_to_store(..., rank=r, world_size=w)``), once all of them are done.
    """
    path = Path(path)
    _refuse_single_process_store(path)
    parts = [ActivationStore(folder) for folder in _parts(path) if (folder / MANIFEST).is_file()]
    if not parts:
        raise FileNotFoundError(f"no parts of a data-parallel harvest (rank-R-of-W/{MANIFEST}) in {path}")
    parts.sort(key=lambda part: part.image_range)
    first = parts[0]
    for part in parts[1:]:
        different = [key for key in _SETTINGS if key != "image_range" and part.manifest[key] != first.manifest[key]]
        if different:
            raise StoreMismatchError(f"{part.path.name} and {first.path.name} in {path} were harvested with other "
                                     f"{', '.join(different)}")
    covered, previous = 0, None
    for part in parts:
        start, stop = part.image_range
        if start < covered:
            raise ValueError(f"{part.path.name} (images {start}:{stop}) overlaps {previous.path.name} (images "
                             f"{previous.image_range[0]}:{covered}) in {path}: remove the parts of an earlier "
                             "harvest (a harvest with overwrite=True does)")
        if start > covered:
            raise ValueError(f"no part in {path} holds images {covered}:{start} (parts: "
                             f"{', '.join(p.path.name for p in parts)})")
        covered, previous = stop, part
    if covered != len(first.image_ids):
        raise ValueError(f"no part in {path} holds images {covered}:{len(first.image_ids)} (parts: "
                         f"{', '.join(p.path.name for p in parts)})")
    unfinished = [f"{p.path.name} ({p.manifest['n_images_done'] - p.image_range[0]}/"
                  f"{p.image_range[1] - p.image_range[0]} images)" for p in parts if not p.complete]
    if unfinished:
        raise ValueError(f"parts not finished in {path}: {', '.join(unfinished)}; run their harvests again to "
                         "resume them")
    manifest = {
        **first.manifest,
        "image_range": [0, len(first.image_ids)],
        "n_images_done": len(first.image_ids),
        "d_in": {hook: d for part in parts for hook, d in part.manifest["d_in"].items()},
        "parts": [part.path.name for part in parts],
        "shards": [{**shard, "file": f"{part.path.name}/{shard['file']}"}
                   for part in parts for shard in part.manifest["shards"]],
    }
    _write_json(path / MANIFEST, manifest)
    return ActivationStore(path)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32"}


def _write_shard(path: Path, number: int, hook_names: list[str], batches: list[Any]) -> dict[str, Any]:
    """Write the rows of ``batches`` as one safetensors file, hashing as it goes: every batch's tensors are written
    where they lie (no concatenated copy, no file image in memory), and hashing and writing release the GIL."""
    for batch in batches:
        _finish_copy_to_host(batch)
    pieces: dict[str, list[Tensor]] = {}
    for hook in hook_names:
        pieces[f"acts/{hook}"] = [b.acts[hook] for b in batches]
        pieces[f"index/{hook}"] = [b.index[hook] for b in batches]
    header: dict[str, Any] = {}
    offset = 0
    for key, parts in pieces.items():
        first = parts[0]
        size = sum(p.numel() * p.element_size() for p in parts)
        shape = [sum(len(p) for p in parts), *first.shape[1:]]
        header[key] = {"dtype": _SAFETENSORS_DTYPES[first.dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    file = f"shard_{number:05d}.safetensors"
    temporary = path / (file + ".tmp")
    with open(temporary, "wb") as out:
        for chunk in (len(encoded).to_bytes(8, "little"), encoded):
            out.write(chunk)
            digest.update(chunk)
        for parts in pieces.values():
            for part in parts:
                if part.numel():
                    data = part.contiguous().view(-1).view(torch.uint8).numpy()
                    out.write(data)
                    digest.update(data)
    os.replace(temporary, path / file)
    return {
        "file": file,
        "images": [batches[0].start, batches[-1].stop],
        "rows": {hook: header[f"acts/{hook}"]["shape"][0] for hook in hook_names},
        "size": 8 + len(encoded) + offset,
        "sha256": digest.hexdigest(),
    }
