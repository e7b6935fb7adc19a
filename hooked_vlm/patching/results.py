# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Results of patching sweeps and of attention knockout, with their plots."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from hooked_vlm.layout import InputLayout
from hooked_vlm.names import block_parts
from hooked_vlm.positions import on_image_grid
from hooked_vlm.readouts import normalize


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
