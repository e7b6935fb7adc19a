# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Running many patches in one forward: the input repeated along the batch axis (a packed sequence along its
positions), one patch per copy, and the blocks a patch cannot change replayed from the base run.

Replays and recorders replace instance attributes of modules (``forward``, the image-features method) through the
taps' own :class:`~hooked_vlm.taps.InstanceOverride`, so there is one mechanism for per-instance overrides."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.adapter import Prepared
from hooked_vlm.cache import ActivationCache, axes
from hooked_vlm.layout import InputLayout, TowerLayout
from hooked_vlm.names import block_parts
from hooked_vlm.readouts import Readout
from hooked_vlm.taps import InstanceOverride, OutputTap, remove_all

if TYPE_CHECKING:
    from hooked_vlm.patching.planning import _Plan, _Target


def repeat_inputs(model: Any, prepared: Prepared, n: int, **extra: Any) -> Prepared:
    """``prepared`` with every input tensor repeated ``n`` times along its first axis, re-prepared by the adapter
    (so the layout is the adapter's own). ``extra`` keyword arguments go to the model's forward."""
    if n == 1 and not extra:
        return prepared
    kwargs = {k: torch.cat([v] * n) if isinstance(v, Tensor) else v for k, v in prepared.kwargs.items()}
    return model.prepare_inputs(kwargs | extra)


class _Copies:
    """Where copy ``r`` of a repeated input sits in a hook's tensor, for hooks of the single input.

    A ``[batch, pos, ...]`` sequence is repeated along the batch axis (copy ``r`` = rows ``r·B ...``), except a
    packed sequence (Qwen2-VL's vision tower, LLaVA-OneVision's ``projector.hook_packed``: one row holding every
    image), which is repeated along its positions (copy ``r`` = positions ``r·P ...``). Pooled ``[batch, ...]``
    hooks repeat along the batch axis.
    """

    def __init__(self, single: InputLayout, repeated: InputLayout, n: int):
        self.single, self.repeated, self.n = single, repeated, n
        self._packed: dict[str, bool] = {}

    def packed(self, hook_name: str, value: Tensor) -> bool:
        """True if copies follow each other along the positions of ``hook_name`` (``value``: single-input value)."""
        if hook_name not in self._packed:
            self._packed[hook_name] = self._check(hook_name, value)
        return self._packed[hook_name]

    def _check(self, hook_name: str, value: Tensor) -> bool:
        tower = _sequence(self.single, hook_name, value)
        if tower is None or self.n == 1:
            return False
        repeated = self.repeated.tower_for(hook_name)
        batch, length = tower.shape
        if repeated.shape == (self.n * batch, length) and (repeated.kind.view(self.n, batch, length) == tower.kind).all():
            return False
        if batch == 1 and repeated.shape == (1, self.n * length) and (repeated.kind.view(self.n, length) == tower.kind).all():
            if axes(hook_name)[0] != 1:
                raise NotImplementedError(f"patching {hook_name!r} of a packed sequence (several images in one row)")
            return True
        raise ValueError(
            f"repeating the input {self.n} times gives {hook_name!r} a layout {repeated.shape} that is not "
            f"{self.n} copies of {tower.shape}; this input cannot be patched in batches"
        )

    def tile(self, hook_name: str, value: Tensor, weights: Tensor) -> Tensor:
        """Copy ``r`` of ``value`` times ``weights[r]``, laid out as the repeated input's tensor."""
        stacked = weights.to(value.device, value.dtype).view(-1, *[1] * value.dim()) * value  # [n, *value]
        if self.packed(hook_name, value):
            return stacked.transpose(0, 1).flatten(1, 2)
        return stacked.flatten(0, 1)

    def fold(self, hook_name: str, value: Tensor, repeated: Tensor, weights: Tensor) -> Tensor:
        """``Σ_r weights[r] · copy r`` of a repeated tensor, in single-input layout (``value`` gives that layout)."""
        weights = weights.to(repeated.device, repeated.dtype)
        if self.packed(hook_name, value):
            return torch.einsum("r,brp...->bp...", weights, repeated.unflatten(1, (self.n, -1)))
        return torch.einsum("r,r...->...", weights, repeated.unflatten(0, (self.n, -1)))

    def index(self, hook_name: str, value: Tensor, copy: int, target: _Target) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(destination, source)`` advanced indices of ``target``'s entries in copy ``copy`` of the repeated
        tensor and in the single-input ``value``."""
        source = _entries(self.single, hook_name, value, target)
        destination = list(source)
        if self.packed(hook_name, value):
            position_axis = axes(hook_name)[0]
            destination[position_axis] = source[position_axis] + copy * value.shape[position_axis]
        else:
            destination[0] = source[0] + copy * value.shape[0]
        return tuple(destination), source


def _entries(layout: InputLayout, hook_name: str, value: Tensor, target: _Target) -> tuple[Tensor, ...]:
    """Advanced indices (one per leading axis, in axis order) of the entries of ``value`` that ``target`` covers:
    its (batch row, position) cells × its heads. Indexing with them leaves the feature axes."""
    position_axis, head_axis = axes(hook_name)
    if _sequence(layout, hook_name, value) is None:  # pooled: every batch row
        index = {0: torch.arange(value.shape[0])}
    else:
        cells = target.cells
        if cells is None:
            cells = torch.ones(value.shape[0], value.shape[position_axis], dtype=torch.bool).nonzero()
        index = {0: cells[:, 0], position_axis: cells[:, 1]}
    # pattern hooks have their head axis before the positions: index every head explicitly there
    if target.heads is not None or (len(index) == 2 and head_axis is not None and head_axis < position_axis):
        heads = target.heads if target.heads is not None else torch.arange(value.shape[head_axis])
        n = len(index[0])
        index = {axis: x.repeat_interleave(len(heads)) for axis, x in index.items()}
        index[head_axis] = heads.repeat(n)
    return tuple(index[axis] for axis in sorted(index))


def _sequence(layout: InputLayout, hook_name: str, value: Tensor) -> TowerLayout | None:
    """The layout of ``hook_name``'s sequence, or ``None`` for a pooled value (no position axis)."""
    position_axis, _ = axes(hook_name)
    try:
        tower = layout.tower_for(hook_name)
    except KeyError:
        return None
    if value.dim() < position_axis + 2:  # [batch, d]: CLIP's pooled vision.hook_out, hook_image_embeds
        return None
    if (value.shape[0], value.shape[position_axis]) != tower.shape:
        raise ValueError(f"{hook_name!r} has shape {tuple(value.shape)}, which does not fit its layout {tower.shape}")
    return tower


def _evaluate(model: Any, prepared: Prepared, readout: Readout | None, fwd_hooks: Sequence = ()) -> Tensor | None:
    """The readout (``[batch]``) of one run with ``fwd_hooks`` attached; the readout's hooks see the patched values.
    Cached values keep their autograd graph (attribution patching differentiates readouts of hooks)."""
    store: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook) -> None:
        store[hook.name] = tensor

    reads = readout.hook_names if readout is not None else ()
    with model.hooks(fwd_hooks=[*fwd_hooks, *((name, keep) for name in reads)]):
        output = model(prepared)
    return None if readout is None else readout(output, ActivationCache(store, lambda: prepared.layout))


def _cache(
    model: Any, prepared: Prepared, names: Sequence[str], readout: Readout | None
) -> tuple[float | None, dict[str, Tensor]]:
    """The readout (mean over batch rows) and the activations of ``names`` of one unpatched run."""
    store: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook) -> None:
        store[hook.name] = tensor.detach()

    with torch.no_grad():
        value = _evaluate(model, prepared, readout, [(name, keep) for name in names])
    missing = [n for n in names if n not in store]
    if missing:
        raise ValueError(f"the hooks {missing} did not fire for this input (e.g. text hooks without text)")
    return None if value is None else float(value.float().mean()), store


def _check_shapes(names: Sequence[str], a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    for name in names:
        if a[name].shape != b[name].shape:
            raise ValueError(
                f"{name!r} is {tuple(a[name].shape)} in the clean run and {tuple(b[name].shape)} in the corrupted one; "
                "patching needs the same token layout in both (same image size / tiles, same prompt token count)"
            )


def _logits_kwargs(model: Any, readout: Readout) -> dict[str, Any]:
    """``logits_to_keep`` for the batched runs, when the model takes it and the readout reads only the last logits."""
    keep = readout.logits_to_keep
    if keep is None or "logits_to_keep" not in inspect.signature(model.raw_model.forward).parameters:
        return {}
    return {"logits_to_keep": keep}


def _chunks(n: int, size: int, progress: bool, desc: str) -> Iterator[range]:
    starts = range(0, n, size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2):
        yield range(start, min(n, start + size))


def _sweep(
    model: Any,
    base: Prepared,
    sources: Mapping[str, Tensor],
    plan: _Plan,
    readout: Readout,
    batch_size: int,
    progress: bool,
    desc: str,
    reuse_prefix: bool,
) -> Float[Tensor, " targets"]:
    """The readout (mean over batch rows) with each target of ``plan`` set to ``sources`` in one copy of ``base``."""
    extra = _logits_kwargs(model, readout)
    repeated: dict[int, tuple[Prepared, _Copies]] = {}
    prefix = _Prefix(model, base, readout) if reuse_prefix else None
    out = torch.empty(len(plan.targets))
    for chunk in _chunks(len(plan.targets), batch_size, progress, desc):
        n = len(chunk)
        if n not in repeated:  # every chunk but the last has the same size
            copies_input = repeat_inputs(model, base, n, **extra)
            repeated[n] = (copies_input, _Copies(base.layout, copies_input.layout, n))
        prepared, copies = repeated[n]
        placed: dict[str, list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]] = {}
        for copy, t in enumerate(chunk):
            target = plan.targets[t]
            placed.setdefault(target.hook, []).append(copies.index(target.hook, sources[target.hook], copy, target))
        hooks = [(name, _setter(sources[name], entries)) for name, entries in placed.items()]
        with torch.no_grad(), _replay(model, prefix.outputs(list(placed), copies) if prefix else {}):
            values = _evaluate(model, prepared, readout, hooks)
        out[list(chunk)] = values.float().view(n, -1).mean(1).cpu()
    return out


#: an instance attribute of a module of the wrapped model: ``(module path, attribute name)``
_Attribute = tuple[str, str]


class _Prefix:
    """What a patch cannot change, computed once in the base run and replayed for every copy of a batch.

    A patch at block ``l`` cannot change blocks ``0 .. l-1`` of its tower, so those blocks of every copy return
    what the unpatched base run computed instead of computing it again (exact; every block of the supported
    towers returns a plain tensor). Not used when the readout reads a hook inside those blocks. A patch in the
    language model cannot change the vision side either: where the adapter names the method that hands the image
    features to the LM (``image_features_method``), it answers with the base run's features, and the vision tower
    does not run at all (not when the readout reads a hook outside the LM). Values are cached on first need, once
    per sweep.
    """

    def __init__(self, model: Any, base: Prepared, readout: Readout):
        self.model, self.base, self.readout = model, base, readout
        self.cache: dict[str, Tensor] = {}
        self.image_features: list[Any] | None = None  # the base run's image-features result, once recorded

    def outputs(self, hook_names: Sequence[str], copies: _Copies) -> dict[_Attribute, Callable[[], Any]]:
        """Module attribute → a function giving its result for every copy (``forward`` of the blocks to replay,
        the image-features method)."""
        parts = [block_parts(name) for name in hook_names]
        if not all(parts) or len({p[0] for p in parts}) != 1:
            return {}
        tower, start = parts[0][0], min(p[1] for p in parts)
        read = [block_parts(name) for name in self.readout.hook_names]
        if any(r is not None and r[0] == tower and r[1] < start for r in read):
            return {}
        names = [f"{tower}.blocks.{j}.hook_resid_post" for j in range(start)]
        taps = [self.model.hook_point(name).tap for name in names]
        if not all(isinstance(tap, OutputTap) for tap in taps):
            return {}
        features = self.model.adapter.image_features_method
        if tower != "lm" or not all(name.startswith("lm.") for name in self.readout.hook_names):
            features = None
        if features and self.image_features is None:  # recorded in a run that stops where the LM starts
            self.image_features = []
            with _shadow(self.model, {features: _recorder(self.model, features, self.image_features)}):
                with torch.no_grad():
                    self.model.run_with_cache(self.base, names_filter="lm.blocks.0.hook_resid_pre")
        if not self.image_features:  # not asked for, or an input without images
            features = None
        known = {features: partial(_answer, lambda: self.image_features[0])} if features else {}
        missing = [name for name in names if name not in self.cache]
        if missing:
            with _shadow(self.model, known):
                self.cache.update(_cache(self.model, self.base, missing, None)[1])
        replayed: dict[_Attribute, Callable[[], Any]] = {
            (tap.module, "forward"): partial(self._tiled, tap, name, copies) for tap, name in zip(taps, names, strict=True)
        }
        if features:
            replayed[features] = partial(self._tiled_features, copies)
        return replayed

    def _tiled(self, tap: OutputTap, name: str, copies: _Copies) -> Tensor:
        """The block's output for every copy, as the block returns it (e.g. without the packed axis the hook adds)."""
        return tap.view.from_hook(None, copies.tile(name, self.cache[name], torch.ones(copies.n)))

    def _tiled_features(self, copies: _Copies) -> Any:
        """The base run's image features for every copy: copy ``r``'s images follow copy ``r - 1``'s."""
        (result,) = self.image_features
        return type(result)(pooler_output=(torch.cat(list(result.pooler_output)).repeat(copies.n, 1),))


@contextmanager
def _shadow(model: Any, replacements: Mapping[_Attribute, Callable]):
    """Instance attributes of modules of the wrapped model replaced for the block (hooks on the modules still fire),
    by the taps' own :class:`~hooked_vlm.taps.InstanceOverride`: whatever each instance had before is put back."""
    overrides: list[InstanceOverride] = []
    try:
        for (path, attribute), replacement in replacements.items():
            overrides.append(InstanceOverride(model.raw_model.get_submodule(path), attribute, replacement))
        yield
    finally:
        remove_all(overrides)


def _replay(model: Any, outputs: Mapping[_Attribute, Callable[[], Any]]):
    """The attributes answer with ``outputs[attribute]()`` instead of computing."""
    return _shadow(model, {attribute: partial(_answer, output) for attribute, output in outputs.items()})


def _answer(output: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
    return output()


def _recorder(model: Any, attribute: _Attribute, into: list[Any]) -> Callable:
    """The attribute's method, also appending each result to ``into``."""
    method = getattr(model.raw_model.get_submodule(attribute[0]), attribute[1])

    def record(*args: Any, **kwargs: Any) -> Any:
        into.append(method(*args, **kwargs))
        return into[-1]

    return record


def _setter(source: Tensor, entries: list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]) -> Callable:
    """A hook writing ``source`` values into a repeated run's tensor at the given (destination, source) indices."""
    destination = tuple(torch.cat(parts) for parts in zip(*(e[0] for e in entries), strict=True))
    picked = source[tuple(torch.cat(parts).to(source.device) for parts in zip(*(e[1] for e in entries), strict=True))]

    def patch(tensor: Tensor, hook) -> Tensor:
        tensor = tensor.clone()
        tensor[tuple(i.to(tensor.device) for i in destination)] = picked.to(tensor.device, tensor.dtype)
        return tensor

    return patch


def _broadcast(mask: Bool[Tensor, "batch pos"], value: Tensor) -> Tensor:
    """A ``[batch, pos]`` mask shaped to multiply a ``[batch, pos, ...]`` value."""
    return mask.to(value.device).view(*mask.shape, *[1] * (value.dim() - 2))
