"""Feature analysis: where SAE features fire over an image set, drawn and tabulated.

:func:`scan_features` goes once over the images and keeps, per feature, how often it fires (its density), its
mean and maximum activation, and its top-activating images with the patch where it peaks in each. From the
scan: :func:`feature_gallery` draws a feature's top images with its per-patch activation as a heatmap over each
(PNG), :func:`density_histogram` the distribution of feature densities (PNG), and :func:`feature_table` writes
one CSV row per feature. Figures default to ``models/features/`` (the research layout).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.layout import Selector
from hooked_vlm.sae.evaluate import trained_positions
from hooked_vlm.sae.harvesting import ImageSource, describe_positions, image_source, model_inputs, row_index, take
from hooked_vlm.sae.splice import encode_at
from hooked_vlm.sae.store import checkpoint_name, slug

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_vlm.model import HookedVLM

DEFAULT_ROOT = Path("models/features")

@dataclass
class FeatureScan:
    """Per-feature statistics of one SAE over one image set (top lists sorted, strongest first)."""

    model_name: str
    hook_name: str
    positions: Any
    prompt: str | None
    source: ImageSource = field(repr=False)
    n_rows: int
    fired: Int[Tensor, " d_sae"]  # rows where the feature is active (> 0)
    activation_sum: Float[Tensor, " d_sae"]
    top_values: Float[Tensor, "d_sae k"]  # the feature's maximum over each of its top images
    top_images: Int[Tensor, "d_sae k"]  # source index of those images (-1: fewer images than k)
    top_patches: Int[Tensor, "d_sae k 3"]  # (tile, row, col) of the row where it peaks in each (-1: not a patch)

    @property
    def density(self) -> Float[Tensor, " d_sae"]:
        """Fraction of rows where each feature fires."""
        return self.fired.double() / self.n_rows

    @property
    def mean_activation(self) -> Float[Tensor, " d_sae"]:
        """Mean activation of each feature where it fires (0 for dead features)."""
        return (self.activation_sum.double() / self.fired.clamp(min=1)).float()

    def __repr__(self) -> str:
        # a summary: the dataclass repr would print every [d_sae, k] tensor in full
        d_sae, k = self.top_values.shape
        density = self.density
        dead = int((self.fired == 0).sum())
        strongest = self.top_values[:, 0] if k else torch.zeros(d_sae)
        best = [int(i) for i in strongest.argsort(descending=True)[:5] if strongest[i] > 0]
        return (
            f"FeatureScan({self.model_name}, {self.hook_name}, positions={self.positions!r}, "
            f"{len(self.source.ids)} images, {self.n_rows} rows, d_sae={d_sae}, top {k} per feature; "
            f"dead {dead}, median density {float(density.median()):.3g}, "
            f"dense (> 10%) {int((density > 0.1).sum())}; strongest features {best})"
        )

    def top(self, feature: int) -> list[tuple[str, float, tuple[int, int, int]]]:
        """``(image id, max activation, (tile, row, col))`` of the feature's top images, strongest first."""
        return [
            (self.source.ids[int(i)], float(v), tuple(p.tolist()))
            for v, i, p in zip(self.top_values[feature], self.top_images[feature], self.top_patches[feature], strict=True)
            if i >= 0 and v > 0
        ]


@torch.no_grad()
def scan_features(
    model: HookedVLM,
    sae: SAE,
    images: Any,
    *,
    positions: Selector | None = None,
    prompt: str | None = None,
    top_k: int = 16,
    batch_size: int = 16,
    progress: bool = True,
) -> FeatureScan:
    """One pass over ``images``: density, mean and max activation, and top ``top_k`` images of every feature.

    ``positions`` (default: the selector the SAE was trained with) are the rows looked at; an image's score
    for a feature is its maximum over that image's rows.
    """
    hook = sae.cfg.metadata.hook_name
    model.hook_point(hook)
    positions = trained_positions(sae) if positions is None else positions
    prompt = sae.cfg.metadata.prompt if prompt is None else prompt
    source = image_source(images)
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae, dtype=torch.long)
    activation_sum = torch.zeros(d_sae, dtype=torch.float64)
    top_values = torch.full((d_sae, top_k), -math.inf)
    top_images = torch.full((d_sae, top_k), -1, dtype=torch.long)
    top_patches = torch.full((d_sae, top_k, 3), -1, dtype=torch.long)
    n_rows = 0
    for features, index in feature_rows(model, sae, source, positions, prompt, batch_size, progress):
        n_rows += len(features)
        fired += (features > 0).sum(0)
        activation_sum += features.double().sum(0)
        # per image: the feature's maximum over the image's rows, and the row where it is reached
        for image in index[:, 0].unique():
            rows = (index[:, 0] == image).nonzero()[:, 0]
            peak, where = features[rows].max(0)
            values = torch.cat([top_values, peak[:, None]], 1)
            images_ = torch.cat([top_images, torch.full((d_sae, 1), int(image))], 1)
            patches = torch.cat([top_patches, index[rows[where]][:, None, 3:]], 1)
            top_values, order = values.topk(top_k, dim=1)
            top_images = images_.gather(1, order)
            top_patches = patches.gather(1, order[..., None].expand(-1, -1, 3))
    name = sae.cfg.metadata.model_name or checkpoint_name(model)
    return FeatureScan(name, hook, describe_positions(positions), prompt, source, n_rows, fired, activation_sum.float(),
                       top_values, top_images, top_patches)


def feature_rows(
    model: HookedVLM, sae: SAE, source: ImageSource, positions: Selector, prompt: str | None, batch_size: int,
    progress: bool = True, desc: str = "scan features",
) -> Iterator[tuple[Float[Tensor, "n d_sae"], Int[Tensor, "n 6"]]]:
    """``(feature activations, row index)`` of the selected rows of ``source``, a batch of images at a time: every
    pass over an image set that reads an SAE's features goes through here (the row index's image column counts
    from the source's first image)."""
    hook = sae.cfg.metadata.hook_name
    for first in tqdm(range(0, len(source), batch_size), desc=desc, disable=not progress):
        _, cache = model.run_with_cache(
            **model_inputs(model, source.load(first, first + batch_size), prompt), names_filter=[hook]
        )
        act = cache[hook]
        features = take(cache.layout, hook, encode_at(sae, hook, act), positions).float().cpu()
        yield features, row_index(cache.layout, hook, act.shape, positions, first)


def _default_path(scan: FeatureScan, file: str) -> Path:
    """``models/features/<model>/<hook>/<file>`` (the research layout)."""
    return DEFAULT_ROOT / slug(scan.model_name) / slug(scan.hook_name) / file


def model_view(model: HookedVLM, image: Image.Image) -> Image.Image:
    """The part of ``image`` the patch grid covers: CLIP processors centre-crop a square; LLaVA-OneVision's base
    tile and Qwen2-VL see the whole image (stretched to their grid)."""
    if not model.adapter.centre_crops_images:
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def feature_gallery(
    model: HookedVLM,
    sae: SAE,
    scan: FeatureScan,
    feature: int,
    path: str | Path | None = None,
    *,
    n: int = 12,
    columns: int = 4,
    tile: int = 0,
    color: str = "#ff00cc",
) -> Path:
    """The top ``n`` images of ``feature`` (from ``scan``), each with the feature's activation on every patch of
    grid ``tile`` drawn over it: one hue (``color``) whose opacity is the activation, on one scale for the whole
    gallery, so strength reads the same over any image colours and patches where it is off stay clear. Tile 0 is
    the view of the whole image in every family (LLaVA-OneVision's base tile); for LLaVA-OneVision's LM image
    tokens, ``tile=1`` is the finer high-res grid, which covers the whole image too. Titles give each image's
    peak over all its rows, and where it is (tile, row, col). Saved as PNG at ``path`` (default
    ``models/features/<model>/<hook>/feature_<i>.png``); returns the path.
    """
    top = [(i, v, tuple(p)) for i, v, p in zip(scan.top_images[feature].tolist(), scan.top_values[feature].tolist(),
                                                scan.top_patches[feature].tolist(), strict=True) if i >= 0 and v > 0][:n]
    path = Path(path) if path is not None else _default_path(scan, f"feature_{feature}.png")
    rows_ = max(1, math.ceil(len(top) / columns))
    fig_width = max(7.0, 3.0 * min(columns, len(top)))  # wide enough for the title, also for one image or none
    fig = Figure(figsize=(fig_width, 3.2 * rows_ + 0.6), layout="constrained")
    fig.suptitle(f"{scan.hook_name} · feature {feature} · density {float(scan.density[feature]):.2%} "
                 f"· positions {scan.positions}", fontsize=10)
    if not top:
        fig.text(0.5, 0.5, "this feature never fires on the scanned images", ha="center", va="center")
        return _save(fig, path)
    pictures, grids = _heatmaps(model, sae, scan, feature, [i for i, _, _ in top], tile)
    vmax = max((float(g.max()) for g in grids if g is not None), default=1.0) or 1.0
    axes = fig.subplots(rows_, min(columns, len(top)), squeeze=False).ravel()
    for ax, (image, value, (peak_tile, row, col)), picture, grid in zip(axes, top, pictures, grids, strict=False):
        height, width = np.asarray(picture).shape[:2]
        ax.imshow(picture, extent=(0, width, height, 0))
        if grid is not None:
            overlay = np.zeros((*grid.shape, 4))
            overlay[..., :3] = to_rgb(color)
            overlay[..., 3] = 0.85 * np.clip(grid / vmax, 0, 1)
            ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
        where = f" @ tile {peak_tile} ({row}, {col})" if row >= 0 else ""
        ax.set_title(f"{scan.source.ids[image]}\nmax {value:.3g}{where}", fontsize=8)
        ax.set_axis_off()
    for ax in axes[len(top):]:
        ax.set_axis_off()
    if any(grid is not None for grid in grids):
        scale = LinearSegmentedColormap.from_list("opacity", [(*to_rgb(color), 0.0), (*to_rgb(color), 0.85)])
        fig.colorbar(ScalarMappable(Normalize(0, vmax), scale), ax=list(axes), shrink=0.8,
                     label=f"feature {feature} activation (tile {tile})")
    return _save(fig, path)


@torch.no_grad()
def _heatmaps(
    model: HookedVLM, sae: SAE, scan: FeatureScan, feature: int, images: Sequence[int], tile: int
) -> tuple[list[Image.Image], list[np.ndarray | None]]:
    """Each image as the model saw it, and the feature's ``[rows, cols]`` activation over grid ``tile`` of it
    (``None`` where the hook has no such grid: pooled hooks, text-only sequences, an image with fewer tiles)."""
    loaded = [scan.source.load(i, i + 1)[0] for i in images]
    _, cache = model.run_with_cache(**model_inputs(model, loaded, scan.prompt), names_filter=[scan.hook_name])
    act = cache[scan.hook_name]
    pictures = [model_view(model, image) for image in loaded]
    if act.dim() == 2:  # pooled: one value per image, no patch grid
        return pictures, [None] * len(loaded)
    values = encode_at(sae, scan.hook_name, act)[..., feature]
    grids: list[np.ndarray | None] = []
    for j in range(len(loaded)):
        try:
            grids.append(cache.layout.image_grid(scan.hook_name, values, image=j, tile=tile).float().cpu().numpy())
        except ValueError:  # this hook's sequence holds no patch grid of the image (e.g. text tokens only)
            grids.append(None)
    return pictures, grids


def density_histogram(scan: FeatureScan, path: str | Path | None = None, bins: int = 50) -> Path:
    """Histogram of log10 feature density (dead features counted apart); PNG at ``path``."""
    density = scan.density
    alive = density[density > 0]
    path = Path(path) if path is not None else _default_path(scan, "density.png")
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    if len(alive):
        ax.hist(alive.log10().numpy(), bins=bins, color="#4477aa")
    ax.set_xlabel("log10 density (fraction of rows where the feature fires)")
    ax.set_ylabel("features")
    dead = int((density == 0).sum())
    ax.set_title(f"{scan.hook_name}: {len(density)} features, {dead} dead ({dead / len(density):.1%}), "
                 f"{scan.n_rows} rows", fontsize=9)
    return _save(fig, path)


def feature_table(scan: FeatureScan, path: str | Path | None = None, features: Sequence[int] | None = None,
                  n_top: int = 5) -> Path:
    """CSV, one row per feature: density, mean and max activation, and its top images (id, activation,
    tile/row/col of the peak)."""
    path = Path(path) if path is not None else _default_path(scan, "features.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    features = range(len(scan.fired)) if features is None else features
    density, mean = scan.density, scan.mean_activation
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["feature", "density", "mean_activation", "max_activation", "top_images"])
        for f in features:
            top = scan.top(f)[:n_top]
            writer.writerow([
                f,
                f"{float(density[f]):.6g}",
                f"{float(mean[f]):.6g}",
                f"{top[0][1]:.6g}" if top else "0",
                "; ".join(f"{image} ({value:.4g} @ tile {t} row {r} col {c})" for image, value, (t, r, c) in top),
            ])
    return path


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
