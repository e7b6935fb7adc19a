# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""One vocabulary of positions: every form, its resolver against an :class:`InputLayout`, its label, its JSON form.

Caching (``run_with_cache(positions=...)``, ``cache.select``), SAE harvesting, patching, ablation, knockout,
steering, probes and the logit lens all resolve positions here, so one argument means the same positions
everywhere. A position argument resolves, for one hook, to a ``[batch, pos]`` bool mask over that hook's
sequence (:func:`resolve`):

- ``"all"`` (every position but padding; ``"prompt"`` is the same), ``"cls"``, ``"patches"`` (``"patch"``),
  ``"registers"`` (``"register"``: DINOv2's register tokens), ``"image"``, ``"text"``, ``"newline"``: positions of
  that kind. A name that matches nothing in the sequence
  raises, so a selection cannot come out empty by accident.
- ``"generated"``: no prompt position (steering adds the tokens ``generate`` produces; elsewhere it raises).
- an ``int`` or a sequence of ints: sequence indices on every row (negative counts from the end; prompts are
  left-padded, so ``-1`` is every row's last token).
- ``(row, col)`` pairs (a sequence of them) or :class:`Patches`: those cells of every image's patch grid
  (grids of any size); a ``[rows, cols]`` bool tensor: a patch mask, which must match the grid.
- a sequence of any other forms (e.g. ``("image", "newline")``, ``["cls", -1]``): their union.
- a callable ``f(layout) -> [batch, pos] bool``: anything else.

:func:`describe` gives a short label, :func:`to_json` / :func:`from_json` the form saved in activation-store
manifests and steering-vector files (callables cannot be saved).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooked_vlm.layout import Kind, Selector, TowerLayout

if TYPE_CHECKING:
    from hooked_vlm.layout import InputLayout

#: sequence positions of a kind, by name
NAMED: dict[str, tuple[Kind, ...]] = {
    "cls": (Kind.CLS,),
    "patches": (Kind.PATCH,),
    "patch": (Kind.PATCH,),
    "text": (Kind.TEXT,),
    "image": (Kind.IMAGE,),
    "newline": (Kind.NEWLINE,),
    "registers": (Kind.REGISTER,),
    "register": (Kind.REGISTER,),
}
#: names that are not a kind: every prompt position, and the tokens generation adds (none of the prompt)
ALL, PROMPT, GENERATED = "all", "prompt", "generated"
NAMES = (ALL, PROMPT, GENERATED, *NAMED)


@dataclass(frozen=True)
class Patches:
    """Patch (or LM image-token) positions chosen by ``(row, col)`` on their grid, read from the layout.

    Unlike a ``[rows, cols]`` bool mask, the cells apply to grids of any size (e.g. LLaVA-OneVision's base tile
    and its larger high-res grid, or Qwen2-VL images of different sizes); ``image`` and ``tile`` narrow the
    choice to one image (its index over the input) and one tile (LLaVA-OneVision: 0 = base tile, 1 = high-res
    grid in the LM, the tile index in the vision tower).
    """

    cells: tuple[tuple[int, int], ...]
    image: int | None = None
    tile: int | None = None

    def __post_init__(self):
        try:
            cells = tuple((int(r), int(c)) for r, c in self.cells)
        except (TypeError, ValueError):
            raise ValueError(f"Patches takes (row, col) pairs, e.g. Patches([(0, 1), (2, 3)]), not {self.cells!r}") from None
        object.__setattr__(self, "cells", cells)

    def mask(self, tower: TowerLayout) -> Bool[Tensor, "batch pos"]:
        picked = torch.isin(tower.kind, torch.tensor((Kind.PATCH, Kind.IMAGE)))
        if self.image is not None:
            picked &= tower.image == self.image
        if self.tile is not None:
            picked &= tower.tile == self.tile
        cell = torch.zeros_like(picked)
        for row, col in self.cells:
            cell |= (tower.row == row) & (tower.col == col)
        return picked & cell


#: every form a position argument takes (see the module docstring)
Positions = Selector | Patches


def _is_index(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_pair(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_index(v) for v in x)


def normalize(positions: Positions) -> Positions:
    """The canonical form of ``positions``: sequences become tuples, ``(row, col)`` pairs :class:`Patches`,
    a 1-D integer tensor a tuple of indices. What :func:`resolve` picks does not change."""
    if isinstance(positions, Tensor) and positions.dim() == 1 and not positions.dtype.is_floating_point \
            and positions.dtype != torch.bool:
        return tuple(int(i) for i in positions.tolist())
    if isinstance(positions, (list, tuple)):
        if not positions:
            raise ValueError("positions is an empty sequence; give indices, names, (row, col) pairs or a selector")
        if all(_is_index(p) for p in positions):
            return tuple(int(p) for p in positions)
        if all(_is_pair(p) for p in positions):
            return Patches(tuple(positions))
        return tuple(normalize(p) for p in positions)
    if _is_index(positions):
        return int(positions)
    return positions


def resolve(
    layout: InputLayout, hook_name: str, positions: Positions, *, generated: bool = False
) -> Bool[Tensor, "batch pos"]:
    """The ``[batch, pos]`` positions of ``hook_name``'s sequence that ``positions`` picks.

    ``generated``: accept ``"generated"`` (it picks no prompt position; steering applies it to new tokens)."""
    return resolve_tower(layout.tower_for(hook_name), positions, layout, generated=generated, what=hook_name)


def resolve_tower(
    tower: TowerLayout, positions: Positions, layout: InputLayout | None = None, *, generated: bool = False,
    what: str | None = None,
) -> Bool[Tensor, "batch pos"]:
    """:func:`resolve` over one tower (``layout`` is needed for callables only)."""
    where = f"{what!r}'s sequence" if what else "this sequence"
    positions = normalize(positions)
    if isinstance(positions, tuple) and all(_is_index(p) for p in positions) or _is_index(positions):
        indices = torch.as_tensor(positions).reshape(-1)
        length = tower.shape[1]
        if ((indices < -length) | (indices >= length)).any():
            raise ValueError(f"position indices {positions} are outside {where} of length {length}")
        mask = torch.zeros(tower.shape, dtype=torch.bool)
        mask[:, indices] = True
        return mask
    if isinstance(positions, tuple):  # a union: members may be empty, the union may not
        mask = torch.stack([_one(tower, p, layout, generated, where, union=True) for p in positions]).any(0)
        if not mask.any():
            raise ValueError(f"the positions {describe(positions)} select nothing in {where} (it has: {_kinds(tower)})")
        return mask
    return _one(tower, positions, layout, generated, where)


def _kinds(tower: TowerLayout) -> list[str]:
    return sorted(Kind(int(k)).name.lower() for k in tower.kind.unique().tolist())


def _one(tower: TowerLayout, selector: Any, layout: InputLayout | None, generated: bool, where: str,
         union: bool = False) -> Tensor:
    if _is_index(selector) or isinstance(selector, tuple):
        return resolve_tower(tower, selector, layout, generated=generated)
    if isinstance(selector, str):
        if selector in (ALL, PROMPT):
            return tower.kind != Kind.PAD
        if selector == GENERATED:
            if not generated:
                raise ValueError("positions='generated' picks the tokens generate adds; only steering takes it")
            return torch.zeros(tower.shape, dtype=torch.bool)
        if selector not in NAMED:
            raise ValueError(
                f"unknown position selector {selector!r}; expected one of {[ALL, *sorted(NAMED)]}, sequence indices, "
                "(row, col) pairs, a [rows, cols] bool patch mask, a tuple of these, or a callable over the layout"
            )
        picked = torch.isin(tower.kind, torch.tensor(NAMED[selector]))
        if not picked.any() and not union:
            raise ValueError(f"selector {selector!r} matches no position of {where} (it has: {_kinds(tower)})")
        return picked
    if isinstance(selector, Patches):
        picked = selector.mask(tower)
        if not picked.any() and not union:
            raise ValueError(f"the positions {describe(selector)} select nothing in {where} (it has: {_kinds(tower)})")
        return picked
    if isinstance(selector, Tensor):
        if selector.dtype != torch.bool or selector.dim() != 2:
            raise ValueError(
                f"a patch-mask selector must be a 2-D bool tensor [rows, cols], got {selector.dtype} "
                f"{tuple(selector.shape)} (sequence indices: a list of ints)"
            )
        rows, cols = selector.shape
        if not tower.grids or any(g != (rows, cols) for g in tower.grids):
            raise ValueError(f"patch mask of shape {(rows, cols)} does not match the image grids {tower.grids}")
        on_grid = (tower.row >= 0) & (tower.row < rows) & (tower.col >= 0) & (tower.col < cols)
        picked = torch.zeros_like(on_grid)
        picked[on_grid] = selector[tower.row[on_grid], tower.col[on_grid]]
        return picked
    if callable(selector):
        if layout is None:
            raise ValueError("a callable selector needs the whole InputLayout")
        mask = selector(layout)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tower.shape:
            raise ValueError(f"a callable selector must return a bool tensor of shape {tower.shape}")
        return mask
    raise TypeError(f"unsupported position selector of type {type(selector).__name__}")


def describe(positions: Positions) -> str:
    """A short label: ``'image'``, ``(3, 5)``, ``Patches([(0, 1)], image=None, tile=None)``, ``a (4, 4) patch mask``."""
    positions = normalize(positions)
    if isinstance(positions, (str, int)):
        return repr(positions)
    if isinstance(positions, tuple):
        if all(_is_index(p) for p in positions):
            return repr(positions)
        return "(" + " | ".join(describe(p) for p in positions) + ")"
    if isinstance(positions, Patches):
        return f"Patches({list(positions.cells)}, image={positions.image}, tile={positions.tile})"
    if isinstance(positions, Tensor):
        return f"a {tuple(positions.shape)} patch mask"
    return getattr(positions, "__name__", type(positions).__name__)


def to_json(positions: Positions) -> Any:
    """The JSON form of ``positions`` (names and indices as they are, a union as a list, :class:`Patches` and
    patch masks as tagged objects); a callable raises ``TypeError``."""
    positions = normalize(positions)
    if isinstance(positions, (str, int)):
        return positions
    if isinstance(positions, tuple):
        return [to_json(p) for p in positions]
    if isinstance(positions, Patches):
        return {"patches": [list(c) for c in positions.cells], "image": positions.image, "tile": positions.tile}
    if isinstance(positions, Tensor):
        return {"patch_mask": positions.int().tolist()}
    raise TypeError(
        f"positions given as {describe(positions)} cannot be saved; use names, indices, (row, col) pairs, Patches "
        "or a [rows, cols] bool mask"
    )


def from_json(spec: Any) -> Positions:
    """``positions`` back from :func:`to_json` (a patch mask also from bools)."""
    if isinstance(spec, (str, int)):
        return spec
    if isinstance(spec, list):
        return normalize([from_json(p) for p in spec])
    if isinstance(spec, dict) and "patches" in spec:
        return Patches(tuple(map(tuple, spec["patches"])), image=spec.get("image"), tile=spec.get("tile"))
    if isinstance(spec, dict) and "patch_mask" in spec:
        return torch.tensor(spec["patch_mask"], dtype=torch.bool)
    raise ValueError(f"not a saved position argument: {spec!r}")


def record(positions: Positions) -> Any:
    """:func:`to_json`, or for a callable its qualified name (``"callable:module.name"``): a record of what was
    used, for manifests, that cannot be read back."""
    try:
        return to_json(positions)
    except TypeError:
        return f"callable:{getattr(positions, '__module__', '?')}.{getattr(positions, '__qualname__', repr(positions))}"


# ---------------------------------------------------------------------------------------------------------------
# Labels of single positions (patching results, the logit lens).


@dataclass(frozen=True)
class PositionLabel:
    """What one sequence position is: its batch row and index, its kind, and for image-derived positions (image,
    tile, row, col). The batch row is a prompt (or an image, for CLIP) or, in LLaVA-OneVision's vision tower, a tile."""

    batch: int
    position: int
    kind: Kind
    image: int = -1
    tile: int = -1
    row: int = -1
    col: int = -1
    token: str | None = None  # the token at a text position, when the input has token ids

    def __str__(self) -> str:
        row = f"[{self.batch}] " if self.batch else ""
        if self.kind in (Kind.PATCH, Kind.IMAGE):
            tile = f" t{self.tile}" if self.tile > 0 else ""
            return f"{row}{self.position}: img{self.image}{tile} ({self.row},{self.col})"
        if self.token is not None:
            return f"{row}{self.position}: {self.token!r}"
        return f"{row}{self.position}: {self.kind.name.lower()}"


def position_labels(
    layout: InputLayout, hook_name: str, cells: Int[Tensor, "n 2"], input_ids: Tensor | None = None, tokenizer: Any = None
) -> list[PositionLabel]:
    """Labels of the ``(batch row, position)`` cells of ``hook_name``'s sequence, with tokens at text positions
    when the sequence is the one ``input_ids`` spell (the LM's, or CLIP's text tower's) and a tokenizer is given."""
    from hooked_vlm.readouts import resolve_tokenizer  # readouts imports the cache, which imports this module

    tower = layout.tower_for(hook_name)
    tokenizer = resolve_tokenizer(tokenizer)
    is_text = any(tower is layout.towers.get(key) for key in ("lm", "text"))
    spell = is_text and input_ids is not None and hasattr(tokenizer, "convert_ids_to_tokens")
    labels = []
    for b, p in cells.tolist():
        kind = Kind(int(tower.kind[b, p]))
        token = tokenizer.convert_ids_to_tokens(int(input_ids[b, p])) if spell and kind == Kind.TEXT else None
        fields = (int(getattr(tower, f)[b, p]) for f in ("image", "tile", "row", "col"))
        labels.append(PositionLabel(b, p, kind, *fields, token=token))
    return labels


def on_image_grid(
    layout: InputLayout, hook_name: str, labels: Sequence[PositionLabel], values: Float[Tensor, "*lead pos"],
    image: int = 0, tile: int = 0,
) -> Float[Tensor, "*lead rows cols"]:
    """``values`` over labelled positions placed on one image's (tile's) grid of ``hook_name``'s sequence,
    ``NaN`` at cells without a value."""
    batch_grid, position_grid = layout.tower_for(hook_name).grid_index(image, tile)
    index = {(label.batch, label.position): i for i, label in enumerate(labels)}
    out = torch.full((*values.shape[:-1], *position_grid.shape), float("nan"))
    for (r, c), p in np.ndenumerate(position_grid.numpy()):
        i = index.get((int(batch_grid[r, c]), int(p)))
        if i is not None:
            out[..., r, c] = values[..., i].float()
    return out
