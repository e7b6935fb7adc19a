# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""What a sweep patches: every (hook, positions, heads) target, in the C order of the result's labelled axes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from hooked_vlm.adapter import Prepared
from hooked_vlm.cache import axes
from hooked_vlm.names import block_parts
from hooked_vlm.patching.batching import _sequence
from hooked_vlm.positions import Positions, position_labels, resolve

Hooks = str | Sequence[str]

#: the ``[batch, pos]`` positions of ``hook_name``'s sequence that ``positions`` picks (one rule for every tool)
position_mask = resolve


def _cells(mask: Bool[Tensor, "batch pos"], what: str) -> Int[Tensor, "n 2"]:
    """The ``(row, position)`` pairs a mask picks, row by row."""
    cells = mask.nonzero()
    if len(cells) == 0:
        raise ValueError(f"{what} picks no position")
    return cells


def _hook_names(model: Any, hooks: Hooks) -> list[str]:
    return [hp.name for hp in model.resolve_names(hooks)]


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
