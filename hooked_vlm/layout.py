"""Where every position of every tower came from, and one vocabulary of position selectors.

An :class:`InputLayout` holds one :class:`TowerLayout` per token sequence the model runs (``vision``, ``text``,
``lm``, ...). A tower layout is a table over ``[batch, pos]``: the kind of each position (CLS, patch, text,
image token, newline, padding), and for image-derived positions the image index, tile and (row, col).
Position arguments (the vocabulary of :mod:`hooked_vlm.positions`: ``"all"``, ``"cls"``, ``"patches"``, ``"image"``,
indices, (row, col) pairs, patch masks, unions, callables) resolve against it to a ``[batch, pos]`` bool mask,
so caching, SAE harvesting, patching and steering all select positions the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class Kind(IntEnum):
    PAD = 0
    CLS = 1
    PATCH = 2
    TEXT = 3
    IMAGE = 4
    NEWLINE = 5
    REGISTER = 6  # a learned token appended to the sequence with no image content (DINOv2's registers)


#: a position argument; the whole vocabulary (indices, (row, col) pairs, unions, ...) is
#: :data:`hooked_vlm.positions.Positions`, which every ``mask`` here resolves
Selector = str | Tensor | Callable[["InputLayout"], Tensor] | int | Sequence[Any]


@dataclass
class TowerLayout:
    """Per-position facts of one token sequence, all ``[batch, pos]``; -1 where a field does not apply."""

    kind: Int[Tensor, "batch pos"]
    image: Int[Tensor, "batch pos"]
    tile: Int[Tensor, "batch pos"]
    row: Int[Tensor, "batch pos"]
    col: Int[Tensor, "batch pos"]
    #: ``(rows, cols)`` of the patch grid of each image, in image order.
    grids: list[tuple[int, int]] = field(default_factory=list)
    #: Free-form facts worth showing (e.g. that a grid was interpolated).
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)

    def mask(self, selector: Selector, layout: InputLayout | None = None) -> Bool[Tensor, "batch pos"]:
        """Resolve a position argument (:mod:`hooked_vlm.positions`) to a ``[batch, pos]`` bool mask over this tower."""
        from hooked_vlm.positions import resolve_tower  # positions builds on this module

        return resolve_tower(self, selector, layout)

    def patch_positions(self, batch_index: int = 0) -> Int[Tensor, "rows cols"]:
        """Sequence positions of the patches of one batch row, arranged as its ``[rows, cols]`` grid."""
        is_patch = torch.isin(self.kind, torch.tensor((Kind.PATCH, Kind.IMAGE)))
        is_patch[torch.arange(self.shape[0]) != batch_index] = False
        return _arrange(self, is_patch)[1]

    def grid_index(self, image: int, tile: int = 0) -> tuple[Int[Tensor, "rows cols"], Int[Tensor, "rows cols"]]:
        """``(batch index, position)`` of every patch / image token of ``image`` (and ``tile``) as a grid."""
        selected = torch.isin(self.kind, torch.tensor((Kind.PATCH, Kind.IMAGE)))
        selected &= (self.image == image) & (self.tile == tile)
        if not selected.any():
            raise ValueError(f"no patches of image {image}, tile {tile} in this sequence")
        return _arrange(self, selected)


def _arrange(tower: TowerLayout, selected: Tensor) -> tuple[Tensor, Tensor]:
    batch, position = selected.nonzero(as_tuple=True)
    rows, cols = tower.row[batch, position], tower.col[batch, position]
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    batch_grid = torch.full(shape, -1, dtype=torch.long)
    position_grid = torch.full(shape, -1, dtype=torch.long)
    batch_grid[rows, cols] = batch
    position_grid[rows, cols] = position
    if (position_grid < 0).any() or len(position) != shape[0] * shape[1]:
        raise ValueError("the selected patches do not form one full grid")
    return batch_grid, position_grid


@dataclass
class InputLayout:
    """The layout of one model input: a :class:`TowerLayout` per tower, and which tower each hook reads."""

    towers: dict[str, TowerLayout]
    #: hook-name prefix → tower key (e.g. ``"projector"`` → ``"vision"`` when the projector runs per patch);
    #: a dotted prefix (``"projector.hook_packed"``) overrides a shorter one, the longest match wins
    tower_of_prefix: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, tower: str) -> TowerLayout:
        return self.towers[tower]

    def tower_key(self, hook_name: str) -> str:
        """The key of the tower whose positions ``hook_name`` holds (``KeyError`` for a hook with none)."""
        parts = hook_name.split(".")
        prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
        key = next((self.tower_of_prefix[p] for p in prefixes if p in self.tower_of_prefix), parts[0])
        if key not in self.towers:
            raise KeyError(f"hook {hook_name!r} has no per-position layout (towers: {sorted(self.towers)})")
        return key

    def tower_for(self, hook_name: str) -> TowerLayout:
        return self.towers[self.tower_key(hook_name)]

    def mask(self, selector: Selector, hook_name: str) -> Bool[Tensor, "batch pos"]:
        """The positions of ``hook_name``'s sequence that ``selector`` picks, as a ``[batch, pos]`` bool mask."""
        from hooked_vlm.positions import resolve  # positions builds on this module

        return resolve(self, hook_name, selector)

    @property
    def image_token_mask(self) -> Bool[Tensor, "batch seq"]:
        """LM positions filled from images (``input_ids == image_token_id``): image and newline tokens, and the
        vision tower's CLS token where a model hands it on (LLaVA with ``vision_feature_select_strategy="full"``)."""
        if "lm" not in self.towers:
            raise KeyError(f"this input has no language-model sequence (towers: {sorted(self.towers)})")
        return torch.isin(self.towers["lm"].kind, torch.tensor((Kind.IMAGE, Kind.NEWLINE, Kind.CLS)))

    @property
    def main_tower(self) -> str:
        """The sequence whose rows are the inputs of a run: the LM's where there is one, else the first tower's."""
        return "lm" if "lm" in self.towers else next(iter(self.towers))

    def select_inputs(
        self, rows: Int[Tensor, " n"]
    ) -> tuple[InputLayout, dict[str, tuple[Int[Tensor, " rows"], Int[Tensor, " pos"] | None]]]:
        """The layout of the inputs ``rows`` (rows of :attr:`main_tower`) alone, and for every tower the indices
        ``(rows, positions)`` of its part that belongs to them (``positions`` None: every position of those rows);
        a batch slice of a cache indexes each tower's tensors with these.

        A tower with as many rows as the main one, each with the same images (or none), is indexed like it; a tower
        of other rows keeps the rows whose images all belong to the selected inputs (LLaVA's image tiles); a single
        row packing several images (Qwen2-VL's vision sequence) keeps the positions of the selected images. A tower
        of unrelated rows (captions counted apart from the images) cannot be sliced with the inputs: a
        ``ValueError``. The result is a plain :class:`InputLayout`: family extras (packing records) describe every
        row and are dropped; image indices keep their original numbers.
        """
        main_key = self.main_tower
        main = self.towers[main_key]
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        chosen = main.image[rows]
        chosen = chosen[chosen >= 0].unique()
        towers, index = {}, {}
        for key, tower in self.towers.items():
            has_image = tower.image >= 0
            positions = None
            if key == main_key or (
                tower.shape[0] == main.shape[0]
                and all(
                    torch.equal(a[a >= 0].unique(), b[b >= 0].unique()) or not (a >= 0).any()
                    for a, b in zip(tower.image, main.image, strict=True)
                )
            ):
                keep = rows
            elif tower.shape[0] == 1 and has_image.all():
                keep, positions = torch.zeros(1, dtype=torch.long), torch.isin(tower.image[0], chosen).nonzero()[:, 0]
            elif has_image.any(-1).all():
                keep = torch.isin(tower.image, chosen).any(-1).nonzero()[:, 0]
                if not torch.isin(tower.image[keep][has_image[keep]], chosen).all():
                    raise ValueError(f"rows of the {key!r} sequence mix images of selected and other inputs")
            else:
                raise ValueError(
                    f"the {key!r} sequence has {tower.shape[0]} rows that are not the {main.shape[0]} inputs of "
                    f"{main_key!r} (e.g. captions counted apart from the images), so it cannot be sliced with them"
                )
            index[key] = keep, positions
            picked = [keep] if positions is None else [keep[:, None], positions[None]]
            grids = list(tower.grids)
            if positions is None and len(grids) == tower.shape[0]:
                grids = [grids[i] for i in keep.tolist()]
            elif positions is not None:
                grids = [grids[i] for i in chosen.tolist() if i < len(grids)]
            towers[key] = TowerLayout(
                **{f: getattr(tower, f)[tuple(picked)] for f in ("kind", "image", "tile", "row", "col")},
                grids=grids,
                notes=list(tower.notes),
            )
        return InputLayout(towers, dict(self.tower_of_prefix)), index

    def to_patch_grid(self, hook_name: str, activation: Tensor) -> Tensor:
        """``[batch, pos, ...]`` → ``[batch, rows, cols, ...]`` over the image patches (CLS and text dropped)."""
        tower = self.tower_for(hook_name)
        if activation.shape[:2] != tower.shape:
            raise ValueError(
                f"{hook_name!r} has shape {tuple(activation.shape)}, not [batch, pos, ...] with batch, pos = {tower.shape}"
            )
        grids = [tower.patch_positions(b) for b in range(tower.shape[0])]
        if any(g.shape != grids[0].shape for g in grids):
            raise ValueError("batch rows have different patch grids; index one row at a time")
        index = torch.stack(grids).to(activation.device)  # [batch, rows, cols]
        batch = torch.arange(index.shape[0], device=activation.device)[:, None, None]
        return activation[batch, index]

    def image_grid(self, hook_name: str, activation: Tensor, image: int = 0, tile: int = 0) -> Tensor:
        """One image's patches (or LM image tokens) of ``[batch, pos, ...]`` as ``[rows, cols, ...]`` (for heatmaps)."""
        batch, position = self.tower_for(hook_name).grid_index(image, tile)
        return activation[batch.to(activation.device), position.to(activation.device)]


def grid_tower(
    batch: int, rows: int, cols: int, n_prefix: int = 1, image_offset: int = 0, n_registers: int = 0
) -> TowerLayout:
    """A ViT sequence: ``n_prefix`` tokens (CLS, then ``n_registers`` of them registers), then a row-major
    ``rows × cols`` patch grid."""
    if n_registers >= n_prefix and n_registers:
        raise ValueError(f"{n_registers} registers need a CLS token before them (n_prefix = {n_prefix})")
    n = n_prefix + rows * cols
    kind = torch.full((batch, n), int(Kind.PATCH), dtype=torch.long)
    kind[:, :n_prefix] = int(Kind.CLS)
    kind[:, n_prefix - n_registers : n_prefix] = int(Kind.REGISTER)
    row = torch.full((batch, n), -1, dtype=torch.long)
    col = torch.full((batch, n), -1, dtype=torch.long)
    patch = torch.arange(rows * cols)
    row[:, n_prefix:] = patch // cols
    col[:, n_prefix:] = patch % cols
    image = (torch.arange(batch) + image_offset)[:, None].expand(batch, n).clone()
    return TowerLayout(
        kind=kind, image=image, tile=torch.zeros_like(kind), row=row, col=col, grids=[(rows, cols)] * batch
    )


def padded_grids_tower(grids: Sequence[tuple[int, int]], length: int) -> TowerLayout:
    """Images of different patch grids, one per batch row, each a row-major ``rows × cols`` grid of patches
    followed by padding up to ``length`` positions (variable-resolution ViTs such as SigLIP2's NaFlex)."""
    batch = len(grids)
    kind = torch.full((batch, length), int(Kind.PAD), dtype=torch.long)
    row, col = torch.full_like(kind, -1), torch.full_like(kind, -1)
    for b, (rows, cols) in enumerate(grids):
        if rows * cols > length:
            raise ValueError(f"image {b}: a {rows}×{cols} patch grid does not fit in {length} positions")
        patch = torch.arange(rows * cols)
        kind[b, : rows * cols] = int(Kind.PATCH)
        row[b, : rows * cols], col[b, : rows * cols] = patch // cols, patch % cols
    image = torch.where(kind == Kind.PATCH, torch.arange(batch)[:, None], -1)
    tile = torch.where(kind == Kind.PATCH, 0, -1)
    return TowerLayout(kind=kind, image=image, tile=tile, row=row, col=col, grids=[tuple(g) for g in grids])


def text_tower(attention_mask: Tensor) -> TowerLayout:
    """A token sequence: text where ``attention_mask`` is 1, padding elsewhere."""
    attention_mask = attention_mask.cpu()
    kind = torch.where(attention_mask.bool(), int(Kind.TEXT), int(Kind.PAD)).long()
    minus = torch.full_like(kind, -1)
    return TowerLayout(kind=kind, image=minus, tile=minus.clone(), row=minus.clone(), col=minus.clone())
