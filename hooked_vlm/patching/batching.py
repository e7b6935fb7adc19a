"""Activation patching, attribution patching, ablation and attention knockout on images and prompts.

TransformerLens's patching functions take token ids only. Here the clean and corrupted inputs are anything
:meth:`HookedVLM.prepare_inputs` accepts (images, images with a prompt, processor outputs, ``Prepared``), so
they may differ in the image, the prompt, or both, as long as every patched hook has the same shape in both
(same image size / tile count, same prompt token count).

Every sweep runs its patches in batches: the base input is repeated along the batch axis (for Qwen2-VL's packed
vision tower, along the packed sequence) and each copy gets a different patch in the same forward. Results are
:class:`PatchingResult` s: the readout per patch, with labelled ``layer`` / ``position`` / ``head`` axes and the
input layout, so positions map back to (image, tile, row, col) and to heatmaps over the image.

- :func:`activation_patching`: exact patching, denoising (clean into corrupted) or noising (corrupted into clean).
- :func:`attribution_patching`: gradient × activation difference for every requested hook from one forward
  and one backward (plus the clean forward), or its integrated-gradients variant (``ig_steps``).
- :func:`ablation`: zero / mean / given-value ablation, swept like patching; :func:`ablation_hooks` for one run.
- :func:`attention_knockout`: block attention from source positions (image tokens) to target positions over a
  window of layers, swept over layers; :func:`knockout_hooks` for one run.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from hooked_vlm.adapter import Prepared
from hooked_vlm.cache import ActivationCache, axes
from hooked_vlm.layout import InputLayout, Kind, Selector, TowerLayout
from hooked_vlm.names import block_parts
from hooked_vlm.positions import (  # noqa: F401  (PositionLabel: a public name of this module)
    PositionLabel,
    Positions,
    on_image_grid,
    position_labels,
    resolve,
)
from hooked_vlm.readouts import Readout, normalize
from hooked_vlm.taps import OutputTap

Hooks = str | Sequence[str]


# ---------------------------------------------------------------------------------------------------------------
# Positions and their labels.


#: the ``[batch, pos]`` positions of ``hook_name``'s sequence that ``positions`` picks (one rule for every tool)
position_mask = resolve


def _cells(mask: Bool[Tensor, "batch pos"], what: str) -> Int[Tensor, "n 2"]:
    """The ``(row, position)`` pairs a mask picks, row by row."""
    cells = mask.nonzero()
    if len(cells) == 0:
        raise ValueError(f"{what} picks no position")
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Results.


@dataclass
class PatchingResult:
    """The readout under each patch, over labelled axes.

    ``values`` has one axis per name in ``axes``: ``"layer"`` (block index; ``"hook"`` with hook names when the
    hooks are not one per-block family), then ``"position"`` (:class:`PositionLabel` s) or ``"group"`` (group
    names), then ``"head"``. ``hook_names`` are the hooks along the first axis. For activation patching a value
    is the readout of the patched run; for attribution patching it is the base value plus the estimated change.
    """

    values: Float[Tensor, "*shape"]
    axes: tuple[str, ...]
    labels: dict[str, list]
    hook_names: list[str]
    layout: InputLayout
    method: str  # "activation patching", "attribution patching", "integrated gradients", "ablation"
    base_value: float  # the readout of the run that was patched into (corrupted when denoising)
    clean_value: float | None = None
    corrupted_value: float | None = None
    readout: str = ""

    def effect(self) -> Float[Tensor, "*shape"]:
        """``values - base_value``: how much each patch moved the readout."""
        return self.values - self.base_value

    def normalized(self) -> Float[Tensor, "*shape"]:
        """``(values - corrupted) / (clean - corrupted)``: 1 at the clean readout, 0 at the corrupted one (when
        denoising, the share of the gap a patch restores; when noising, the share that survives it)."""
        if self.clean_value is None or self.corrupted_value is None:
            raise ValueError(f"a {self.method} result has no clean/corrupted pair to normalise by; use effect()")
        return normalize(self.values, self.clean_value, self.corrupted_value)

    def select(self, **labels: Any) -> PatchingResult:
        """The result at one label of an axis, that axis dropped: ``result.select(head=3)``, ``select(layer=0)``."""
        values, axes_, kept, hook_names = self.values, list(self.axes), dict(self.labels), self.hook_names
        for axis, label in labels.items():
            if axis not in axes_:
                raise KeyError(f"no axis {axis!r}; axes are {tuple(axes_)}")
            entries = kept.pop(axis)
            index = next((i for i, e in enumerate(entries) if e == label or getattr(e, "position", None) == label), None)
            if index is None:
                raise KeyError(f"{label!r} is not on the {axis} axis")
            if axis == self.axes[0]:
                hook_names = [hook_names[index]]
            values = values.select(axes_.index(axis), index)
            axes_.remove(axis)
        return PatchingResult(values, tuple(axes_), kept, hook_names, self.layout, self.method, self.base_value,
                              self.clean_value, self.corrupted_value, self.readout)

    def grid(self, image: int = 0, tile: int = 0, what: str = "effect") -> Float[Tensor, "... rows cols"]:
        """The position axis arranged on one image's (tile's) patch grid, ``NaN`` where nothing was patched.

        ``what``: ``"effect"``, ``"normalized"`` or ``"values"``. LLaVA-OneVision LM image tokens: tile 0 is the
        base tile, tile 1 the high-res grid.
        """
        if "position" not in self.axes:
            raise ValueError(f"this result has no position axis (axes {self.axes})")
        data = self._data(what).movedim(self.axes.index("position"), -1)
        return on_image_grid(self.layout, self.hook_names[0], self.labels["position"], data, image, tile)

    def _data(self, what: str) -> Tensor:
        choices = {"effect": self.effect, "normalized": self.normalized, "values": lambda: self.values}
        if what not in choices:
            raise ValueError(f"what must be one of {sorted(choices)}, not {what!r}")
        return choices[what]().detach().float().cpu()

    def plot(self, path: str | Path, image: Any = None, *, what: str = "effect", tile: int = 0,
             image_index: int = 0, title: str | None = None) -> Figure:
        """A PNG of the result: with ``image`` and a position axis, one heatmap per layer over the image; otherwise
        ``[layer, head]`` as a head grid, ``[layer]`` as a curve, any other 1-D or 2-D result as a grid. Select a
        label of one axis first for 3-D results (``result.select(head=0).plot(...)``)."""
        from hooked_vlm import plotting

        data = self._data(what)
        label = {"effect": "change in readout", "normalized": "restored fraction", "values": "readout"}[what]
        signed = what != "values"  # effects and restored fractions: the diverging map, centred on 0, in every figure
        title = title or "\n".join(textwrap.wrap(f"{self.method} of {self._family()}; readout {self.readout}", 44))
        axes_ = self.axes
        if len(axes_) > 2:
            raise ValueError(f"cannot plot axes {axes_} directly; select() one label of an axis first")
        names = [[str(x) for x in self.labels[axis]] for axis in axes_]
        if image is not None and axes_[-1:] == ("position",):
            grids = self.grid(image_index, tile, what)
            grids = grids.reshape(-1, *grids.shape[-2:])  # a single panel without a layer axis
            panels = [f"{axes_[0]} {x}" for x in names[0]] if len(axes_) == 2 else [self._family()]
            return plotting.layer_heatmaps(image, grids, path, panels, title=title, label=label, signed=signed)
        if axes_ == ("layer", "head"):
            return plotting.head_grid(data, path, title=title, label=label, signed=signed)
        if axes_ in (("layer",), ("head",)):
            return plotting.layer_curves({label: (self.labels[axes_[0]], data)}, path, title=title, ylabel=label,
                                         xlabel=axes_[0])
        rows, columns = (names[0], names[1]) if len(axes_) == 2 else ([""], names[0])
        return plotting.layer_position_grid(data.reshape(len(rows), len(columns)), path, rows, columns, title=title,
                                            label=label, ylabel=axes_[0] if len(axes_) == 2 else "", xlabel=axes_[-1],
                                            signed=signed)

    def _family(self) -> str:
        name = self.hook_names[0]
        parts = block_parts(name)
        return f"{parts[0]}.blocks.*.{parts[2]}" if parts and len(self.hook_names) > 1 else name

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={len(self.labels[a])}" for a in self.axes)
        return f"PatchingResult({self.method}, {self._family()}, [{shape}], base={self.base_value:.4g})"


@dataclass
class KnockoutResult:
    """The readout with attention from ``source`` to ``target`` blocked in a window of layers around each layer."""

    values: Float[Tensor, " layer"]
    layers: list[int]  # the window centres
    windows: list[list[int]]  # the layers blocked for each centre
    base_value: float  # without knockout
    source: str = ""
    target: str = ""
    readout: str = ""

    def change(self) -> Float[Tensor, " layer"]:
        return self.values - self.base_value

    def relative_change(self) -> Float[Tensor, " layer"]:
        """``(values - base) / |base|``: e.g. -0.3 where the knockout removes 30 % of the readout."""
        return self.change() / abs(self.base_value)

    def plot(self, path: str | Path, *, relative: bool = True, title: str | None = None) -> Figure:
        from hooked_vlm import plotting

        data = 100 * self.relative_change() if relative else self.change()
        return plotting.layer_curves(
            {f"{self.source} → {self.target}": (self.layers, data)}, path,
            title=title or f"attention knockout, window of {len(max(self.windows, key=len))} layers\nreadout {self.readout}",
            ylabel="change in readout (%)" if relative else "change in readout", xlabel="layer (window centre)",
        )


# ---------------------------------------------------------------------------------------------------------------
# Repeating an input: k copies in one forward, each patched differently.


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


# ---------------------------------------------------------------------------------------------------------------
# What to patch.


@dataclass(frozen=True)
class _Target:
    hook: str
    cells: Tensor | None = None  # [n, 2] (batch row, position) pairs; None: every position of every row
    heads: Tensor | None = None  # head indices; None: all


@dataclass
class _Plan:
    targets: list[_Target]
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    labels: dict[str, list]
    hook_names: list[str]


def _plan(
    model: Any,
    prepared: Prepared,
    values: Mapping[str, Tensor],
    hook_names: list[str],
    positions: Positions | None,
    groups: Mapping[str, Positions] | None,
    heads: str | Sequence[int] | None,
) -> _Plan:
    """Every (hook, positions, heads) combination of a sweep, in C order of its axes."""
    if positions is not None and groups is not None:
        raise ValueError("pass positions= (each position on its own) or groups= (named sets), not both")
    layout = prepared.layout
    parts = [block_parts(n) for n in hook_names]
    by_layer = all(parts) and len({(p[0], p[2]) for p in parts}) == 1
    first_axis = ("layer", [p[1] for p in parts]) if by_layer else ("hook", list(hook_names))
    entries: list[Tensor | None] = [None]  # the cells of each entry of the position axis; None: all
    axes_, labels = [first_axis[0]], {first_axis[0]: first_axis[1]}
    if positions is not None or groups is not None:
        for name in hook_names:
            if _sequence(layout, name, values[name]) is None:
                raise ValueError(f"{name!r} has no position axis; patch it whole (positions=None, groups=None)")
        if len({id(layout.tower_for(name)) for name in hook_names}) > 1:
            raise ValueError("the hooks of one sweep must share a sequence (e.g. all lm.* or all vision.* hooks)")
        first = hook_names[0]
        if groups is not None:
            entries = [_cells(position_mask(layout, first, g), f"group {k!r}") for k, g in groups.items()]
            axes_.append("group")
            labels["group"] = list(groups)
        else:
            cells = _cells(position_mask(layout, first, positions), f"positions={positions!r}")
            entries = list(cells[:, None])
            axes_.append("position")
            labels["position"] = position_labels(layout, first, cells, prepared.kwargs.get("input_ids"), model.processor)
    head_entries: list[Tensor | None] = [None]
    if heads is not None:
        counts = set()
        for name in hook_names:
            head_axis = axes(name)[1]
            if head_axis is None:
                raise ValueError(f"{name!r} has no head axis; heads= applies to q/k/v/z, scores and pattern hooks")
            counts.add(values[name].shape[head_axis])
        if len(counts) != 1:
            raise ValueError(f"the hooks have different head counts {sorted(counts)}")
        chosen = range(counts.pop()) if heads == "each" else list(heads)
        head_entries = [torch.tensor([h]) for h in chosen]
        axes_.append("head")
        labels["head"] = list(chosen)
    targets = [_Target(name, p, h) for name in hook_names for p in entries for h in head_entries]
    shape = tuple(len(labels[a]) for a in axes_)
    return _Plan(targets, shape, tuple(axes_), labels, list(hook_names))


# ---------------------------------------------------------------------------------------------------------------
# Running.


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


_MISSING = object()


@contextmanager
def _shadow(model: Any, replacements: Mapping[_Attribute, Callable]):
    """Instance attributes of modules of the wrapped model replaced for the block (hooks on the modules still fire);
    whatever each instance had before is put back."""
    shadowed = []
    try:
        for (path, attribute), replacement in replacements.items():
            module = model.raw_model.get_submodule(path)
            shadowed.append((module, attribute, module.__dict__.get(attribute, _MISSING)))
            setattr(module, attribute, replacement)
        yield
    finally:
        for module, attribute, previous in reversed(shadowed):
            if previous is _MISSING:
                delattr(module, attribute)
            else:
                setattr(module, attribute, previous)


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


def _hook_names(model: Any, hooks: Hooks) -> list[str]:
    return [hp.name for hp in model.resolve_names(hooks)]


# ---------------------------------------------------------------------------------------------------------------
# Activation patching.


def activation_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    positions: Positions | None = None,
    groups: Mapping[str, Positions] | None = None,
    heads: str | Sequence[int] | None = None,
    direction: str = "denoise",
    prompt: Any = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Patch activations between a clean and a corrupted input and record the readout for every patch.

    ``hooks``: hook names or globs (``"lm.blocks.*.hook_resid_post"``); one sweep axis (``layer``).
    ``positions``: patch each position a selector picks on its own (``"image"``: every image token; ``"all"``;
    ``-1``; ``[3, 5]``), giving a ``position`` axis; ``groups``: patch named sets of positions together
    (``{"image": "image", "text": "text"}``), giving a ``group`` axis; neither: patch whole tensors.
    ``heads``: ``"each"`` or a list of heads, giving a ``head`` axis (q/k/v/z, scores, pattern hooks).
    ``direction``: ``"denoise"`` runs the corrupted input and patches in clean activations; ``"noise"`` runs the
    clean input and patches in corrupted ones. ``prompt`` is used for both inputs when they are images.
    ``batch_size`` patches run per forward. With ``reuse_prefix``, the blocks before the earliest patched block of
    a batch are not recomputed: they return the base run's outputs (exact; costs caching those outputs once).
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    names = _hook_names(model, hooks)
    clean_p, corrupted_p = model.prepare_inputs(clean, prompt=prompt), model.prepare_inputs(corrupted, prompt=prompt)
    clean_value, clean_cache = _cache(model, clean_p, names, readout)
    corrupted_value, corrupted_cache = _cache(model, corrupted_p, names, readout)
    _check_shapes(names, clean_cache, corrupted_cache)
    base, sources = (corrupted_p, clean_cache) if direction == "denoise" else (clean_p, corrupted_cache)
    plan = _plan(model, base, sources, names, positions, groups, heads)
    values = _sweep(model, base, sources, plan, readout, batch_size, progress, "activation patching", reuse_prefix)
    return PatchingResult(
        values.view(plan.shape), plan.axes, plan.labels, plan.hook_names, base.layout, "activation patching",
        corrupted_value if direction == "denoise" else clean_value, clean_value, corrupted_value, repr(readout),
    )


# ---------------------------------------------------------------------------------------------------------------
# Ablation.


def _ablation_values(
    name: str, value: Tensor, where: Bool[Tensor, "batch pos"] | None, replacement: str | Tensor
) -> Tensor:
    """What ``name`` is set to when ablated: zeros, its mean over the ablated positions, or a given value."""
    if isinstance(replacement, Tensor):
        return replacement.to(value.device, value.dtype).expand_as(value)
    if replacement == "zero":
        return torch.zeros_like(value)
    if replacement != "mean":
        raise ValueError(f"value must be 'zero', 'mean' or a tensor, not {replacement!r}")
    if where is None:
        raise ValueError(f"mean ablation of {name!r} needs positions: the mean is taken over the ablated positions")
    return value[where.to(value.device)].mean(0).expand_as(value)


def ablation(
    model: Any,
    inputs: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    positions: Positions | None = None,
    groups: Mapping[str, Positions] | None = None,
    heads: str | Sequence[int] | None = None,
    value: str | Tensor = "zero",
    mean_over: Positions | None = None,
    prompt: Any = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Ablate each (hook, positions, heads) target in turn and record the readout (axes as in patching).

    ``value``: ``"zero"``; ``"mean"``, the mean of the hook over ``mean_over`` (default: every position the
    sweep covers, the union of ``positions`` or ``groups``), as in mean-ablating image tokens; or a tensor
    broadcast to the hook's value (e.g. a data-set mean from :func:`mean_activation`). ``batch_size`` and
    ``reuse_prefix`` as in :func:`activation_patching`.
    """
    names = _hook_names(model, hooks)
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    base_value, cache = _cache(model, prepared, names, readout)
    layout = prepared.layout
    if mean_over is None and (positions is not None or groups is not None):
        mean_over = list(groups.values()) if groups is not None else positions
    sources = {}
    for name in names:
        where = None if mean_over is None else position_mask(layout, name, mean_over)
        sources[name] = _ablation_values(name, cache[name], where, value)
    plan = _plan(model, prepared, cache, names, positions, groups, heads)
    values = _sweep(model, prepared, sources, plan, readout, batch_size, progress, "ablation", reuse_prefix)
    return PatchingResult(values.view(plan.shape), plan.axes, plan.labels, plan.hook_names, layout, "ablation",
                          base_value, readout=repr(readout))


def ablation_hooks(
    model: Any,
    inputs: Any,
    hooks: Hooks,
    positions: Positions = "image",
    value: str | Tensor = "mean",
    mean_over: Positions | None = None,
    prompt: Any = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks ablating ``positions`` of ``hooks`` for runs on ``inputs`` (``run_with_hooks``, ``hooks()``,
    ``generate``: Neo et al. mean-ablate object tokens this way).

    ``value`` as in :func:`ablation`; ``"mean"`` is over ``mean_over`` (default: ``positions``) of one unhooked
    run of ``inputs``.
    """
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    names = _hook_names(model, hooks)
    # the mean is that of the unablated run, even where earlier ablations change a later hook's value
    means = _cache(model, prepared, names, None)[1] if isinstance(value, str) and value == "mean" else {}
    result = []
    for name in names:
        where = position_mask(prepared.layout, name, positions)
        over = where if mean_over is None else position_mask(prepared.layout, name, mean_over)
        fixed = _ablation_values(name, means[name], over, value) if name in means else None

        def ablate(tensor: Tensor, hook, where=where, fixed=fixed, name=name) -> Tensor | None:
            if tensor.shape[:2] != where.shape:
                if name.startswith("lm.") and tensor.shape[0] == where.shape[0] and tensor.shape[1] < where.shape[1]:
                    return None  # a decoding step of generate: new tokens only, none of them ablated
                raise ValueError(f"ablation hooks built for {name!r} of shape {tuple(where.shape)} [batch, pos] got "
                                 f"{tuple(tensor.shape)}: they apply to runs on the inputs they were built for")
            replacement = fixed if fixed is not None else _ablation_values(name, tensor, where, value)
            return torch.where(_broadcast(where, tensor), replacement.to(tensor.device, tensor.dtype), tensor)

        result.append((name, ablate))
    return result


def mean_activation(
    model: Any, inputs: Sequence[Any], hook_name: str, positions: Positions = "image", prompt: Any = None
) -> Float[Tensor, "*shape"]:
    """The mean of ``hook_name`` over ``positions`` of every input in ``inputs`` (a data-set mean for ablation)."""
    total, count = None, 0
    for item in tqdm(inputs, desc=f"mean of {hook_name}", disable=len(inputs) < 8):
        prepared = model.prepare_inputs(item, prompt=prompt)
        _, cache = _cache(model, prepared, [hook_name], None)
        value = cache[hook_name]
        picked = value[position_mask(prepared.layout, hook_name, positions).to(value.device)].float()
        total = picked.sum(0) if total is None else total + picked.sum(0)
        count += len(picked)
    return total / count


# ---------------------------------------------------------------------------------------------------------------
# Attribution patching.


@contextmanager
def _parameters_frozen(module: nn.Module):
    """No gradients for parameters during the block (only the activations' are needed); flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _broadcast(mask: Bool[Tensor, "batch pos"], value: Tensor) -> Tensor:
    """A ``[batch, pos]`` mask shaped to multiply a ``[batch, pos, ...]`` value."""
    return mask.to(value.device).view(*mask.shape, *[1] * (value.dim() - 2))


def _add(shift: Tensor, tensor: Tensor, hook) -> Tensor:
    return tensor + shift.to(tensor.device, tensor.dtype)


def _add_leaf(leaves: dict[str, Tensor], tensor: Tensor, hook) -> Tensor:
    """Add a zero that requires grad: its gradient is the readout's gradient with respect to the hook's value."""
    leaves[hook.name] = torch.zeros_like(tensor, requires_grad=True)
    return tensor + leaves[hook.name]


def default_interpolation(model: Any, layout: InputLayout) -> dict[str, Selector]:
    """Where integrated gradients interpolate between the inputs: the embeddings of every tower that takes input
    (``vision.hook_embed``, CLIP's ``text.hook_embed``) and, in VLMs, the LM's token embeddings at positions
    that do not come from the image (image tokens follow the interpolated vision tower)."""
    points: dict[str, Selector] = {}
    for name in ("vision.hook_embed", "text.hook_embed"):
        if name in model.hook_dict and name.split(".")[0] in layout.towers:
            points[name] = "all"
    if "lm.hook_embed" in model.hook_dict:
        points["lm.hook_embed"] = lambda lay: ~torch.isin(lay.towers["lm"].kind, torch.tensor((Kind.IMAGE, Kind.NEWLINE)))
    return points


def attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    positions: Positions | None = None,
    groups: Mapping[str, Positions] | None = None,
    heads: str | Sequence[int] | None = None,
    direction: str = "denoise",
    ig_steps: int | None = None,
    interpolate: str | Mapping[str, Selector] = "activations",
    prompt: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> PatchingResult:
    """Estimate activation patching for every target of every hook at once from gradients.

    Attribution patching (Nanda 2023; Syed et al. 2023): the change a patch makes is estimated as
    ``(source - base) · ∂readout/∂activation`` at the base run, summed over the patched entries. It costs the
    source forward, one base forward and one backward for all hooks, positions and heads together. Axes and
    arguments are those of :func:`activation_patching`; values are ``base + estimated change``.

    ``ig_steps``: integrated gradients. The gradient is averaged over ``ig_steps`` points between base and
    source (midpoints ``(j + ½) / ig_steps``), run as copies of the input in batches of ``batch_size``. Where the
    points lie is ``interpolate``:

    - ``"activations"`` (default; as in Marks et al. 2024): each hook's own value is interpolated, one hook per
      copy, so a hook's attributions summed over its entries converge to the exact effect of patching the whole
      hook. Costs ``len(hooks) · ig_steps`` copies.
    - ``"inputs"`` (EAP-IG, Hanna et al. 2024): the inputs are interpolated at :func:`default_interpolation` (the
      embeddings), and every hook's gradient is read from the same copies. Costs ``ig_steps`` copies.
    - a mapping ``hook → positions``: inputs interpolated there instead.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    if isinstance(interpolate, str) and interpolate not in ("activations", "inputs"):
        raise ValueError(f"interpolate must be 'activations', 'inputs' or a mapping hook → positions, not {interpolate!r}")
    names = _hook_names(model, hooks)
    clean_p, corrupted_p = model.prepare_inputs(clean, prompt=prompt), model.prepare_inputs(corrupted, prompt=prompt)
    base, source = (corrupted_p, clean_p) if direction == "denoise" else (clean_p, corrupted_p)
    per_hook = ig_steps is not None and interpolate == "activations"
    points: dict[str, Selector] = {}
    if ig_steps is not None:
        points = {name: "all" for name in names} if per_hook else dict(
            default_interpolation(model, base.layout) if interpolate == "inputs" else interpolate
        )
    cached = list(dict.fromkeys([*names, *points]))
    source_value, source_cache = _cache(model, source, cached, readout)
    base_value, base_cache = _cache(model, base, cached, readout)
    _check_shapes(cached, source_cache, base_cache)
    delta = {name: source_cache[name] - base_cache[name] for name in cached}
    plan = _plan(model, base, base_cache, names, positions, groups, heads)

    # One copy of the input per (owner hook, step): the owner's value is interpolated and only its gradient kept.
    # Without an owner (inputs interpolated, or no integrated gradients) every hook reads every copy.
    steps = ig_steps or 1
    alphas = (torch.arange(steps) + 0.5) / steps if ig_steps else torch.zeros(1)
    owners: list[str | None] = names if per_hook else [None]
    copies_plan = [(owner, alpha) for owner in owners for alpha in alphas.tolist()]
    masks = {
        name: position_mask(base.layout, name, where)
        for name, where in points.items()
        if not (isinstance(where, str) and where == "all")  # "all" also covers pooled hooks, which have no layout
    }
    grads = {name: torch.zeros_like(base_cache[name], dtype=torch.float32) for name in names}
    for chunk in _chunks(len(copies_plan), batch_size, progress, "attribution patching"):
        n = len(chunk)
        prepared = repeat_inputs(model, base, n, **_logits_kwargs(model, readout))
        copies = _Copies(base.layout, prepared.layout, n)
        owner = [copies_plan[i][0] for i in chunk]
        alpha = torch.tensor([copies_plan[i][1] for i in chunk])

        def weights(name: str, values: Tensor, owner=owner) -> Tensor:
            return values * torch.tensor([o is None or o == name for o in owner], dtype=values.dtype)

        leaves: dict[str, Tensor] = {}
        fwd_hooks = []
        for name in points:
            shift = delta[name] * _broadcast(masks[name], delta[name]) if name in masks else delta[name]
            fwd_hooks.append((name, partial(_add, copies.tile(name, shift, weights(name, alpha)))))
        fwd_hooks += [(name, partial(_add_leaf, leaves)) for name in names]
        with _parameters_frozen(model), torch.enable_grad():
            values = _evaluate(model, prepared, readout, fwd_hooks).float()
            rows = len(values) // n
            total = values.sum() / (rows * steps)  # each hook's gradient: the mean over batch rows and steps
            found = torch.autograd.grad(total, [leaves[name] for name in names], allow_unused=True)
        for name, grad in zip(names, found, strict=True):
            if grad is not None:
                grads[name] += copies.fold(name, base_cache[name], grad.float(), weights(name, torch.ones(n)))

    contributions = {name: delta[name].float() * grads[name] for name in names}
    estimates = torch.tensor(
        [float(contributions[t.hook][_entries(base.layout, t.hook, base_cache[t.hook], t)].sum()) for t in plan.targets]
    )
    clean_value, corrupted_value = (source_value, base_value) if direction == "denoise" else (base_value, source_value)
    return PatchingResult(
        (base_value + estimates).view(plan.shape), plan.axes, plan.labels, plan.hook_names, base.layout,
        "integrated gradients" if ig_steps else "attribution patching", base_value, clean_value, corrupted_value, repr(readout),
    )


# ---------------------------------------------------------------------------------------------------------------
# Attention knockout.


def _block_mask(layout: InputLayout, scores_hook: str, source: Positions, target: Positions) -> Bool[Tensor, "batch q k"]:
    """``[batch, query, key]``: True where a ``target`` query may not attend to a ``source`` key."""
    queries = position_mask(layout, scores_hook, target)
    keys = position_mask(layout, scores_hook, source)
    return queries[:, :, None] & keys[:, None, :]


def _knockout_hook(blocked: Bool[Tensor, "rows q k"], name: str) -> Callable:
    def knock_out(scores: Tensor, hook) -> Tensor:
        if scores.shape[-2:] != blocked.shape[-2:] or scores.shape[0] != blocked.shape[0]:
            raise ValueError(f"knockout hooks built for {name!r} of [batch, query, key] = {list(blocked.shape)} got "
                             f"scores {list(scores.shape)}: they apply to forward runs on the inputs they were built for")
        mask = blocked.to(scores.device)[:, None]
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        # a query with every key blocked would softmax to a uniform row over all keys, masked ones included
        if (scores.amax(-1) <= torch.finfo(scores.dtype).min / 2).any():
            raise ValueError(f"the knockout at {name!r} blocks every key of some query; it would attend uniformly")
        return scores

    return knock_out


def _scores_hooks(model: Any, tower: str, layers: Sequence[int]) -> list[str]:
    names = [f"{tower}.blocks.{layer}.attn.hook_attn_scores" for layer in layers]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"no attention-score hooks {missing[:3]}; {tower!r} has blocks 0..{_n_layers(model, tower) - 1}")
    return names


def _n_layers(model: Any, tower: str) -> int:
    return next(t.n_layers for t in model.adapter.towers() if t.name == tower)


def knockout_hooks(
    model: Any,
    inputs: Any,
    *,
    source: Positions = "image",
    target: Positions = -1,
    layers: Sequence[int],
    tower: str = "lm",
    prompt: Any = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks that stop ``target`` positions from attending to ``source`` positions in ``layers``.

    The hooks set the pre-softmax scores (``attn.hook_attn_scores``) of the blocked (query, key) pairs to the
    dtype's minimum, as an additive attention mask would, for runs on ``inputs`` (its layout picks positions).
    """
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    return [
        (name, _knockout_hook(_block_mask(prepared.layout, name, source, target), name))
        for name in _scores_hooks(model, tower, layers)
    ]


def attention_knockout(
    model: Any,
    inputs: Any,
    readout: Readout,
    *,
    source: Positions = "image",
    target: Positions = -1,
    window: int = 1,
    layers: Sequence[int] | None = None,
    tower: str = "lm",
    prompt: Any = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> KnockoutResult:
    """The readout with attention from ``source`` to ``target`` blocked in a window of ``window`` layers around
    each layer (``layers``, default all blocks of ``tower``), as in attention-knockout studies of LLaVA
    (Geva et al. 2023; Zhang et al. 2025; Kaduri et al. 2025). Windows run as copies of the input in batches.

    ``source`` / ``target``: positions (selectors or indices): ``"image"`` (add ``"newline"`` for
    LLaVA-OneVision's row ends: ``("image", "newline")``), ``"text"``, ``-1`` (the last token), ...
    ``batch_size`` and ``reuse_prefix`` as in :func:`activation_patching`.
    """
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    n_layers = _n_layers(model, tower)
    centres = list(layers) if layers is not None else list(range(n_layers))
    windows = [[j for j in range(c - (window - 1) // 2, c + window // 2 + 1) if 0 <= j < n_layers] for c in centres]
    names = _scores_hooks(model, tower, range(n_layers))
    blocked = {name: _block_mask(prepared.layout, name, source, target) for name in names}
    with torch.no_grad():
        base_value = float(_evaluate(model, prepared, readout).float().mean())
    extra = _logits_kwargs(model, readout)
    prefix = _Prefix(model, prepared, readout) if reuse_prefix else None
    values = torch.empty(len(windows))
    for chunk in _chunks(len(windows), batch_size, progress, "attention knockout"):
        n = len(chunk)
        repeated = repeat_inputs(model, prepared, n, **extra)
        single, copied = (x.layout.tower_for(names[0]).shape for x in (prepared, repeated))
        if copied != (n * single[0], single[1]):
            raise NotImplementedError(f"knockout in a packed sequence ({tower!r} holds several images in one row)")
        hooks = []
        for layer, name in enumerate(names):
            active = torch.tensor([layer in windows[w] for w in chunk])
            if active.any():
                rows = active.repeat_interleave(blocked[name].shape[0])
                hooks.append((name, _knockout_hook(blocked[name].repeat(n, 1, 1) & rows[:, None, None], name)))
        copies = _Copies(prepared.layout, repeated.layout, n)
        with torch.no_grad(), _replay(model, prefix.outputs([h for h, _ in hooks], copies) if prefix else {}):
            values[list(chunk)] = _evaluate(model, repeated, readout, hooks).float().view(n, -1).mean(1).cpu()
    return KnockoutResult(values, centres, windows, base_value, str(source), str(target), repr(readout))
