"""Figures for reports and examples: how an image flows through a model, heatmaps over images, head grids.

Every function draws on its own matplotlib ``Figure`` with the Agg canvas (no pyplot state: nothing leaks when
called in a loop, nothing needs a display), saves it as a PNG at ``path`` and returns the figure. Figures are
saved without ``bbox_inches="tight"``, so an axes' ``get_window_extent()`` is where it sits in the PNG.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from PIL import Image
from torch import Tensor

from hooked_vlm.cache import ActivationCache
from hooked_vlm.layout import Kind, TowerLayout
from hooked_vlm.names import block_parts, describe_hook

# ---------------------------------------------------------------------------------------------------------------
# The image → embeddings flow.

#: Hooks on CLIP's text path; the flow diagram follows the image.
_TEXT_PATH = ("text.", "hook_text_embeds")

_KIND_LABELS = {Kind.CLS: "CLS", Kind.PATCH: "patches", Kind.TEXT: "text", Kind.IMAGE: "image tokens", Kind.NEWLINE: "newlines",
               Kind.REGISTER: "registers"}

_COLORS = {"input": "#eeeeee", "vision": "#d6e6f5", "projector": "#fbe3c8", "lm": "#d9efd5"}
_OTHER_COLOR = "#ece1f3"


@dataclass
class Stage:
    """One box of the flow diagram: a hook (or a stack of blocks), its real shape, and what it is."""

    title: str
    lines: list[str]
    group: str  # colour: input, vision, projector, lm, or anything else


def flow_stages(
    model: Any, cache: ActivationCache, image: Image.Image | None = None, inputs: Mapping[str, Any] | None = None
) -> list[Stage]:
    """The stages an image passes through, in forward order, with the shapes ``cache`` recorded.

    Generic over adapters: stages are the model's tower-level hooks present in ``cache``, each tower's blocks
    collapsed into one stage described by ``adapter.towers()``, and, at the first stage of every token
    sequence, what its positions are (from ``cache.layout``). ``inputs`` are the model inputs (their tensor
    shapes are shown); CLIP's text path is left out.
    """
    stages: list[Stage] = []
    first = [f"image {image.width}×{image.height} px"] if image is not None else []
    first += [f"{key} {_shape(value)}" for key, value in (inputs or {}).items() if isinstance(value, Tensor)]
    if first:
        stages.append(Stage("input", first, "input"))
    towers = {info.name: info for info in model.adapter.towers()}
    described: list[TowerLayout] = []
    block_stacks: set[str] = set()
    for name in model.hook_names():
        if name not in cache or name.startswith(_TEXT_PATH):
            continue
        block = block_parts(name)
        if block is not None:
            tower, _, suffix = block
            if tower in block_stacks:
                continue
            block_stacks.add(tower)
            stage = Stage(f"{tower} blocks", [], tower)
            info = towers.get(tower)
            if info is not None:
                stage.title = f"{tower} blocks × {info.n_layers}"
                kv = f" ({info.n_kv_heads} kv heads)" if info.n_kv_heads not in (None, info.n_heads) else ""
                mlp = f", d_mlp {info.d_mlp}" if info.d_mlp else ""
                stage.lines.append(f"d_model {info.d_model}, {info.n_heads} heads × d_head {info.d_head}{kv}{mlp}")
            stage.lines.append(f"{suffix} {_shape(cache[name])}")
        else:
            group = name.split(".")[0] if "." in name else "output"
            stage = Stage(name, [_shape(cache[name]), describe_hook(name)[1]], group)
        sequence = _sequence_of(cache, name)
        if sequence is not None and not any(sequence is seen for seen in described):
            described.append(sequence)
            stage.lines.insert(0, positions_summary(sequence))
        stages.append(stage)
    return stages


def positions_summary(tower: TowerLayout) -> str:
    """What the positions of one token sequence are, e.g. ``1 CLS + 256 patches = 257 positions; grid 16×16``.

    Counts are those of batch row 0 (every row of a ViT batch, or tile, has the same layout).
    """
    kinds = tower.kind[0]
    parts = [f"{int((kinds == kind).sum())} {label}" for kind, label in _KIND_LABELS.items() if (kinds == kind).any()]
    text = f"{' + '.join(parts)} = {tower.shape[1]} positions"
    if tower.shape[0] > 1:
        text += f", × {tower.shape[0]} batch rows (images / tiles)"
    grids = list(dict.fromkeys(tower.grids))
    if grids:
        text += "; grid " + ", ".join(f"{rows}×{cols}" for rows, cols in grids)
    return text


def _sequence_of(cache: ActivationCache, name: str) -> TowerLayout | None:
    if cache.layout is None:
        return None
    try:
        return cache.layout.tower_for(name)
    except KeyError:  # a pooled or packed output: not one position per token of a sequence
        return None


def _shape(tensor: Tensor) -> str:
    return str(list(tensor.shape))


def flow_diagram(
    model: Any,
    cache: ActivationCache,
    path: str | Path,
    image: Image.Image | None = None,
    inputs: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Figure:
    """A PNG of how an image becomes embeddings (and LM tokens): one box per :func:`flow_stages` stage with the
    real shapes of one run, and the adapter's structure facts (``adapter.describe()``) beside it."""
    stages = flow_stages(model, cache, image, inputs)
    if not stages:
        raise ValueError("the cache holds none of the model's image-path hooks; run the model on an image first")
    for stage in stages:
        stage.lines = [wrapped for line in stage.lines for wrapped in textwrap.wrap(line, 92)]
    heights = [0.42 + 0.17 * len(stage.lines) for stage in stages]  # inches
    gap = 0.32
    total = sum(heights) + gap * (len(stages) - 1)
    fig = Figure(figsize=(13, total + 0.9))
    flow = fig.add_axes((0.01, 0.2 / (total + 0.9), 0.6, total / (total + 0.9)))
    flow.set_xlim(0, 1)
    flow.set_ylim(total, 0)  # inches from the top
    flow.axis("off")
    top = 0.0
    for i, (stage, height) in enumerate(zip(stages, heights, strict=True)):
        color = _COLORS.get(stage.group, _OTHER_COLOR)
        flow.add_patch(
            FancyBboxPatch((0.03, top), 0.94, height, boxstyle="round,pad=0,rounding_size=0.08", fc=color, ec="0.35")
        )
        flow.text(0.5, top + 0.2, stage.title, ha="center", va="center", fontsize=10.5, weight="bold")
        flow.text(0.5, top + 0.33, "\n".join(stage.lines), ha="center", va="top", fontsize=8.5, linespacing=1.35)
        if i < len(stages) - 1:
            bottom = top + height
            flow.annotate("", xy=(0.5, bottom + gap), xytext=(0.5, bottom), arrowprops=dict(arrowstyle="-|>", color="0.3"))
        top += height + gap

    adapter = model.adapter
    facts = [f"family: {adapter.family} ({type(adapter.model).__name__})"]
    facts += [f"{key}: {value}" for key, value in adapter.describe().items()]
    facts += [
        f"{t.name}: {t.n_layers} blocks, d {t.d_model}, {t.n_heads} heads × {t.d_head}"
        + (f", {t.n_kv_heads} kv heads" if t.n_kv_heads else "")
        for t in adapter.towers()
    ]
    side = fig.add_axes((0.64, 0.02, 0.35, 0.9))
    side.axis("off")
    text = "\n".join(textwrap.fill(fact, 52, subsequent_indent="  ") for fact in facts)
    side.text(0, 1, "structure\n\n" + text, va="top", fontsize=9, family="monospace")
    fig.suptitle(title or f"{adapter.family}: image → embeddings", fontsize=13, y=1 - 0.15 / (total + 0.9))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Heatmaps over images and over [layer, head].


def patch_heatmap(
    image: Image.Image | np.ndarray,
    values: Tensor | np.ndarray,
    path: str | Path,
    title: str | None = None,
    label: str | None = None,
    cmap: str | None = None,
    signed: bool | None = None,
) -> Figure:
    """``values[rows, cols]`` (one per patch, row 0 at the top) as an opaque heatmap beside ``image``, on the same
    axes extent so patch (r, c) sits where its pixels sit in the picture on the left.

    The heatmap is never blended into the picture: a blend mixes the picture's colours into the map's, and the
    colour bar can no longer be read. Signed values get a diverging map centred on 0 (see :func:`_value_scale`);
    pass ``signed=True`` for a signed quantity (an attribution, an effect) so it keeps that map even when every
    value of this image happens to share one sign.
    Pass the image as the model saw it (e.g. the centre crop a CLIP processor keeps). Get the grid from a cache
    with ``cache.layout.image_grid(name, tensor)``.
    """
    grid = _numpy(values)
    if grid.ndim != 2:
        raise ValueError(
            f"values must be a [rows, cols] grid, got shape {grid.shape}; cache.layout.image_grid(name, tensor) "
            "turns a [batch, pos] activation into one"
        )
    picture = np.asarray(image)
    height, width = picture.shape[:2]
    cmap, vmin, vmax = _value_scale(grid, cmap, sequential="inferno", signed=signed)
    panel = 4.2
    fig = Figure(figsize=(2 * panel + 1.0, max(2.5, min(9.0, panel * height / width)) + 0.9), layout="constrained")
    # the heatmap is the figure's first axes (code reading values back off the figure finds it first), drawn right
    right = fig.add_subplot(1, 2, 2)
    left = fig.add_subplot(1, 2, 1)
    extent = (0, width, height, 0)  # (left, right, bottom, top): row 0 of both arrays at the top
    left.imshow(picture, extent=extent)
    left.set_title("image", fontsize=9)
    heat = right.imshow(grid, extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    right.set_title(f"{grid.shape[0]}×{grid.shape[1]} patches", fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(heat, ax=right, shrink=0.85, label=label)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def attention_map(
    image: Image.Image | np.ndarray,
    pattern: Tensor | np.ndarray,
    path: str | Path,
    grid: tuple[int, int] | None = None,
    title: str = "attention",
) -> Figure:
    """Attention from one query to every patch, over the image: ``pattern`` is ``[rows * cols]`` (row-major,
    patches only, e.g. ``cache[...hook_pattern][0, head, 0, 1:]`` for CLS → patches) or a ``[rows, cols]`` grid.

    A flat pattern is arranged as ``grid`` (rows, cols), square if ``grid`` is not given.
    """
    weights = _numpy(pattern)
    if weights.ndim == 1:
        if grid is None:
            side = int(round(weights.size**0.5))
            if side * side != weights.size:
                raise ValueError(f"{weights.size} weights do not form a square grid; pass grid=(rows, cols)")
            grid = (side, side)
        if grid[0] * grid[1] != weights.size:
            raise ValueError(f"{weights.size} weights do not fill a {grid[0]}×{grid[1]} grid")
        weights = weights.reshape(grid)
    return patch_heatmap(image, weights, path, title=title, label="attention weight", cmap="viridis")


def head_grid(
    values: Tensor | np.ndarray, path: str | Path, title: str | None = None, label: str | None = None,
    cmap: str | None = None, signed: bool | None = None,
) -> Figure:
    """``values[layer, head]`` as a grid: layer 0 at the top, head 0 on the left, each cell labelled if few."""
    grid = _numpy(values)
    if grid.ndim != 2:
        raise ValueError(f"values must be [layer, head], got shape {grid.shape}")
    layers, heads = grid.shape
    fig = Figure(figsize=(min(16.0, 2.0 + 0.55 * heads), min(14.0, 1.4 + 0.4 * layers)), layout="constrained")
    ax = fig.add_subplot()
    cmap, vmin, vmax = _value_scale(grid, cmap, signed=signed)
    image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    if layers * heads <= 400:
        for (layer, head), value in np.ndenumerate(grid):
            ax.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize=7,
                    color=_text_colour(image, value))
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def _text_colour(image: Any, value: float) -> str:
    """Black on light cells and white on dark ones, judged from the cell's own colour (a diverging map is dark at
    both ends and light in the middle, so a threshold on the value alone gets half the cells wrong)."""
    if not np.isfinite(value):
        return "black"
    red, green, blue, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def _save(fig: Figure, path: str | Path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: patching, knockout and logit-lens figures.


def _value_scale(
    data: np.ndarray, cmap: str | None, sequential: str = "viridis", signed: bool | None = None
) -> tuple[str, float | None, float | None]:
    """A colormap and limits: diverging and centred on 0 for signed quantities (patching effects, attributions:
    ``signed=True``, or any data with a negative value when ``signed`` is None), else sequential. The same signed
    quantity then reads the same in every figure, whichever sign its values happen to take."""
    finite = data[np.isfinite(data)]
    if signed is None:
        signed = finite.size > 0 and finite.min() < 0
    if cmap is not None or finite.size == 0 or not signed:
        return cmap or sequential, None, None
    bound = float(np.abs(finite).max()) or 1.0
    return "RdBu_r", -bound, bound


def layer_position_grid(
    values: Tensor | np.ndarray,
    path: str | Path,
    layer_labels: list[str],
    position_labels: list[str],
    title: str | None = None,
    label: str | None = None,
    ylabel: str = "layer",
    xlabel: str = "position",
    cmap: str | None = None,
    signed: bool | None = None,
) -> Figure:
    """``values[layer, position]`` as a grid (layer 0 at the top); signed values get a diverging map centred on 0."""
    grid = _numpy(values)
    if grid.shape != (len(layer_labels), len(position_labels)):
        raise ValueError(f"values {grid.shape} do not match {len(layer_labels)} layer and {len(position_labels)} position labels")
    cmap, vmin, vmax = _value_scale(grid, cmap, signed=signed)
    layers, positions = grid.shape
    fig = Figure(figsize=(min(24.0, 4.0 + 0.22 * positions), min(14.0, 3.2 + 0.35 * layers)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    step = max(1, positions // 60)  # at most ~60 readable labels
    ax.set_xticks(range(0, positions, step))
    ax.set_xticklabels(position_labels[::step], rotation=90, fontsize=7)
    ax.set_yticks(range(layers))
    ax.set_yticklabels(layer_labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def layer_heatmaps(
    image: Image.Image | np.ndarray,
    grids: Tensor | np.ndarray,
    path: str | Path,
    titles: list[str],
    title: str | None = None,
    label: str | None = None,
    cmap: str | None = None,
    columns: int = 6,
    signed: bool | None = None,
) -> Figure:
    """``grids[layer, rows, cols]``, one opaque panel per layer with one shared colour scale, after a first panel
    with ``image`` itself (``NaN`` cells stay blank). As :func:`patch_heatmap`, pass the image as the model saw
    it; the heatmaps are not blended into it, so their colours read straight off the colour bar."""
    data = _numpy(grids)
    if data.ndim != 3 or len(titles) != data.shape[0]:
        raise ValueError(f"grids must be [layer, rows, cols] with one title per layer, got {data.shape} and {len(titles)}")
    cmap, vmin, vmax = _value_scale(data, cmap, signed=signed)
    if vmin is None:
        finite = data[np.isfinite(data)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    picture = np.asarray(image)
    height, width = picture.shape[:2]
    n = data.shape[0]
    cols = min(columns, n + 1)
    rows = -(-(n + 1) // cols)
    panel = 2.6
    fig = Figure(figsize=(panel * cols + 1.2, panel * rows * height / width + 0.8), layout="constrained")
    axes_ = fig.subplots(rows, cols, squeeze=False)
    extent = (0, width, height, 0)
    heat = None
    for i, ax in enumerate(axes_.flat):
        ax.set_axis_off()
        if i == 0:
            ax.imshow(picture, extent=extent)
            ax.set_title("image", fontsize=9)
        elif i <= n:
            heat = ax.imshow(data[i - 1], extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(titles[i - 1], fontsize=9)
    fig.colorbar(heat, ax=axes_, shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def layer_curves(
    curves: Mapping[str, tuple[Any, Tensor | np.ndarray]],
    path: str | Path,
    title: str | None = None,
    xlabel: str = "layer",
    ylabel: str | None = None,
) -> Figure:
    """One line per ``label → (layers, values)``, e.g. knockout curves (readout change by window centre)."""
    from matplotlib.ticker import MaxNLocator  # here: the functions above this section need none of it

    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), _numpy(ys), marker="o", markersize=3.5, label=name)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def patch_tokens(
    image: Image.Image | np.ndarray,
    tokens: list[list[str]],
    values: Tensor | np.ndarray,
    path: str | Path,
    title: str | None = None,
    label: str | None = None,
    cmap: str | None = None,
) -> Figure:
    """A token written on each cell of an opaque heatmap of ``values[rows, cols]`` (``tokens[row][col]``), beside
    ``image``: e.g. the logit lens's top token and its probability at each image token."""
    grid = _numpy(values)
    picture = np.asarray(image)
    height, width = picture.shape[:2]
    rows, cols = grid.shape
    size = max(5.0, min(14.0, 0.55 * cols))
    cmap, vmin, vmax = _value_scale(grid, cmap)
    fig = Figure(figsize=(size * 1.5 + 1.2, size * height / width + 0.8), layout="constrained")
    beside, ax = fig.subplots(1, 2, width_ratios=(1, 2))
    extent = (0, width, height, 0)
    beside.imshow(picture, extent=extent)
    beside.set_axis_off()
    beside.set_title("image", fontsize=9)
    heat = ax.imshow(grid, extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fontsize = max(5.0, min(10.0, 110.0 / cols))
    for r in range(rows):
        for c in range(cols):
            text = tokens[r][c]
            if text:
                ax.text((c + 0.5) * width / cols, (r + 0.5) * height / rows, text[:8], ha="center", va="center",
                        fontsize=fontsize, color=_text_colour(heat, grid[r, c]))
    ax.set_axis_off()
    fig.colorbar(heat, ax=ax, shrink=0.85, label=label)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
