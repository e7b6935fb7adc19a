"""Association of SAE features with an image-level score, from an activation store (no model run).

:func:`image_activations` encodes the store's rows through the SAE in chunks (one matmul per chunk) and reduces
them per image (max or mean over the image's rows, with a scatter reduction), so a store of 10,000 images ×
256 positions × 16,384 features is a few minutes on a CPU. :func:`associate` then gives, for every feature at
once: Pearson and Spearman correlation with the score, the contrast of the top and bottom score quantiles
(Cohen's d), and a permutation test done as one matmul of standardised activations against a matrix of
permuted standardised scores, with Benjamini–Hochberg q-values. :func:`locate_peaks` traces a feature's
statistics back to images and patches.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.sae.store import ActivationStore

if TYPE_CHECKING:
    from sae_lens import SAE

STATISTICS = ("spearman", "pearson")


@dataclass
class TensorRows:
    """Rows held in memory with the store's reading interface (one shard): synthetic checks and benchmarks,
    or rows harvested without writing a store. ``index`` has the store's ``INDEX_COLUMNS``."""

    hook_name: str
    rows: Float[Tensor, "n d"]
    index: Int[Tensor, "n 6"]
    image_ids: list[str]
    path: str = "<memory>"

    @property
    def hook_names(self) -> list[str]:
        return [self.hook_name]

    @property
    def n_shards(self) -> int:
        return 1

    @property
    def n_rows(self) -> dict[str, int]:
        return {self.hook_name: len(self.rows)}

    def d_in(self, hook_name: str) -> int:
        return self.rows.shape[1]

    def shard(self, i: int, hook_names: Any = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return {self.hook_name: self.rows}, {self.hook_name: self.index}


Rows = ActivationStore | TensorRows


def as_rows(store: Rows | str) -> Rows:
    """An :class:`ActivationStore` from its folder; a store or :class:`TensorRows` as they are."""
    return store if isinstance(store, (ActivationStore, TensorRows)) else ActivationStore(store)


@dataclass
class ImageActivations:
    """Per image, per feature: the feature's activation reduced over the image's selected store rows."""

    values: Float[Tensor, "images d_sae"]
    image_ids: list[str]  # ``store.image_ids``: row ``i`` of ``values`` is store image ``i``
    has_rows: Bool[Tensor, " images"]  # images with at least one selected row (others are left out of statistics)
    fired: Int[Tensor, " d_sae"]  # selected rows where the feature is active (> 0)
    activation_sum: Float[Tensor, " d_sae"]
    n_rows: int
    hook_name: str
    reduce: str
    store_path: str = ""

    @property
    def density(self) -> Float[Tensor, " d_sae"]:
        """Fraction of the images (with rows) on which each feature fires somewhere."""
        values = self.values[self.has_rows]
        return (values > 0).float().mean(0)


def _row_chunks(store: Rows, hook: str, chunk_rows: int) -> Any:
    """``(rows [n, d], index [n, 6])`` in harvest order, at most ``chunk_rows`` rows at a time (shard by shard)."""
    for i in range(store.n_shards):
        acts, index = store.shard(i, hook)
        acts, index = acts[hook], index[hook]
        for start in range(0, len(acts), chunk_rows):
            yield acts[start:start + chunk_rows], index[start:start + chunk_rows]


def _resolve_hook(store: Rows, sae: SAE, hook_name: str | None) -> str:
    hook = hook_name or sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("the SAE has no cfg.metadata.hook_name; pass hook_name=")
    if hook not in store.hook_names:
        raise KeyError(f"hook {hook!r} is not in the store {store.path} (hooks: {store.hook_names}); pass hook_name=")
    if store.d_in(hook) != sae.cfg.d_in:
        raise ValueError(f"the SAE has d_in={sae.cfg.d_in} but the store's rows of {hook!r} have width {store.d_in(hook)}")
    return hook


def _encode(sae: SAE, x: Tensor) -> Float[Tensor, "n d_sae"]:
    """``sae.encode(x)`` in float32. For ReLU and JumpReLU SAEs (sae_lens's ``StandardSAE`` / ``JumpReLUSAE``,
    with a ReLU activation), the same computation with the bias fused into the matmul and the activation applied
    in place in float32: on a CPU, bf16 element-wise passes over ``[n, d_sae]`` cost more than the matmul."""
    from sae_lens import JumpReLUSAE, StandardSAE

    if type(sae) not in (StandardSAE, JumpReLUSAE) or getattr(sae.cfg, "activation_fn", "relu") not in (None, "relu"):
        return sae.encode(x).float()
    hidden = torch.addmm(sae.b_enc, sae.process_sae_in(x), sae.W_enc).float()
    if type(sae) is JumpReLUSAE:
        hidden.masked_fill_(hidden <= sae.threshold.float(), 0.0)
    return hidden.relu_()


@torch.no_grad()
def image_activations(
    store: Rows | str,
    sae: SAE,
    *,
    hook_name: str | None = None,
    reduce: str = "max",
    rows: Callable[[Int[Tensor, "n 6"]], Bool[Tensor, " n"]] | None = None,
    chunk_rows: int = 8192,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ImageActivations:
    """Every image's activation of every feature: ``reduce`` (``"max"`` or ``"mean"``) over the image's rows.

    ``rows`` optionally selects rows by their index (``INDEX_COLUMNS``: image, batch_row, position, tile, row,
    col), e.g. ``lambda index: index[:, 3] == 0`` for the base tile only; by default every stored row counts
    (the store already holds only the positions harvested). Rows are encoded with ``sae.encode`` as stored
    (already flattened over heads for per-head hooks), on the SAE's device, in the SAE's dtype unless ``dtype``
    says otherwise: ``torch.bfloat16`` encodes 4-5× faster on CPUs with AMX (and on GPUs), with activations to
    about 3 significant digits, which the rank statistics do not notice; the reductions are in float32.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', not {reduce!r}")
    store = as_rows(store)
    hook = _resolve_hook(store, sae, hook_name)
    if dtype is not None and dtype != sae.W_dec.dtype:
        sae = copy.deepcopy(sae).to(dtype)  # a copy: the caller's SAE keeps its weights and dtype
    n_images, d_sae = len(store.image_ids), sae.cfg.d_sae
    device = sae.W_dec.device
    # -inf so that the max is right whatever sign an architecture's activations take; images without rows are
    # set to 0 at the end and flagged in has_rows
    values = torch.full((n_images, d_sae), -math.inf if reduce == "max" else 0.0, device=device)
    counts = torch.zeros(n_images, device=device)
    fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    activation_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
    n_rows = 0
    total = store.n_rows.get(hook, 0)
    bar = tqdm(total=total, desc="encode store rows", unit="row", disable=not progress)
    for acts, index in _row_chunks(store, hook, chunk_rows):
        bar.update(len(acts))
        if rows is not None:
            keep = rows(index)
            acts, index = acts[keep], index[keep]
            if not len(acts):
                continue
        features = _encode(sae, acts.to(device=device, dtype=sae.W_dec.dtype))
        image = index[:, 0].to(device)
        if reduce == "max":
            values.index_reduce_(0, image, features, "amax", include_self=True)
        else:
            values.index_add_(0, image, features)
        counts.index_add_(0, image, torch.ones(len(image), device=device))
        fired += (features > 0).sum(0)
        activation_sum += features.sum(0, dtype=torch.float64)
        n_rows += len(features)
    bar.close()
    has_rows = counts > 0
    if reduce == "mean":
        values /= counts.clamp(min=1)[:, None]
    values[~has_rows] = 0.0
    return ImageActivations(values.cpu(), store.image_ids, has_rows.cpu(), fired.cpu(), activation_sum.float().cpu(),
                            n_rows, hook, reduce, str(store.path))


# ---------------------------------------------------------------------------------------------------------------
# Statistics.


def average_ranks(x: Float[Tensor, "n f"]) -> Float[Tensor, "n f"]:
    """Ranks (1-based) of each column, ties given their average rank (as ``scipy.stats.rankdata``): sparse
    features are mostly exact zeros, so ties are the rule, not the exception."""
    columns = x.T.contiguous()
    ordered = columns.sort(dim=1).values
    left = torch.searchsorted(ordered, columns, right=False)
    right = torch.searchsorted(ordered, columns, right=True)
    return ((left + right + 1).to(torch.float32) / 2).T


def _unit_columns(x: Float[Tensor, "n f"]) -> tuple[Float[Tensor, "n f"], Bool[Tensor, " f"]]:
    """Columns centred and scaled to unit norm (so a dot product of two is their Pearson r); constant columns
    are zero and flagged."""
    centred = x - x.mean(0, keepdim=True)
    norm = centred.norm(dim=0)
    constant = norm <= 1e-12 * (1 + x.abs().amax(0))
    return centred / torch.where(constant, torch.ones_like(norm), norm), constant


def bh_qvalues(p: Float[Tensor, " m"]) -> Float[Tensor, " m"]:
    """Benjamini–Hochberg adjusted p-values (q-values): ``min_{j ≥ i} p_(j) · m / j``, capped at 1."""
    m = len(p)
    order = p.argsort()
    scaled = p[order].double() * m / torch.arange(1, m + 1, dtype=torch.float64)
    adjusted = scaled.flip(0).cummin(0).values.flip(0).clamp(max=1.0)
    q = torch.empty(m, dtype=torch.float64)
    q[order] = adjusted
    return q.float()


def cohens_d(
    x: Float[Tensor, "n f"], top: Bool[Tensor, " n"], bottom: Bool[Tensor, " n"]
) -> tuple[Float[Tensor, " f"], Float[Tensor, " f"], Float[Tensor, " f"]]:
    """``(mean over top, mean over bottom, Cohen's d)`` per column, d with the pooled standard deviation
    (0 where both groups are constant and equal)."""
    n1, n0 = int(top.sum()), int(bottom.sum())
    if n1 < 2 or n0 < 2:
        raise ValueError(f"the score quantiles hold {n1} (top) and {n0} (bottom) images; need at least 2 each")
    a, b = x[top].double(), x[bottom].double()
    mean1, mean0 = a.mean(0), b.mean(0)
    pooled = (((n1 - 1) * a.var(0) + (n0 - 1) * b.var(0)) / (n1 + n0 - 2)).sqrt()
    diff = mean1 - mean0
    d = torch.where(pooled > 0, diff / pooled.clamp(min=1e-300), torch.zeros_like(diff))
    return mean1.float(), mean0.float(), d.float()


@dataclass
class Association:
    """Per-feature association statistics of image activations with a score (index = feature id)."""

    pearson: Float[Tensor, " f"]
    spearman: Float[Tensor, " f"]
    mean_top: Float[Tensor, " f"]  # mean image activation over the images of the top score quantile
    mean_bottom: Float[Tensor, " f"]
    cohens_d: Float[Tensor, " f"]
    p_feature: Float[Tensor, " f"]  # permutation p from the feature's own null (resolution 1 / (P + 1))
    p_value: Float[Tensor, " f"]  # permutation p from the null pooled over features of similar density
    q_value: Float[Tensor, " f"]  # Benjamini–Hochberg over all features, from p_value
    density: Float[Tensor, " f"]  # fraction of the scored images where the feature fires
    constant: Bool[Tensor, " f"]  # features with one value on every scored image (dead): r = 0, p = 1
    statistic: str
    n_images: int
    n_permutations: int
    quantile: float
    images: Int[Tensor, " n"]  # store image indices the statistics used (scored, with rows)
    meta: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> Int[Tensor, " f"]:
        """Features from most to least associated: by q-value, then by |statistic| (ties at the smallest
        attainable q are common)."""
        stat = (self.spearman if self.statistic == "spearman" else self.pearson).abs()
        order = torch.argsort(-stat, stable=True)
        return order[torch.argsort(self.q_value[order], stable=True)]


@torch.no_grad()
def associate(
    activations: ImageActivations | Float[Tensor, "images f"],
    scores: Float[Tensor, " images"],
    *,
    statistic: str = "spearman",
    n_permutations: int = 1000,
    quantile: float = 0.2,
    density_bins: int = 10,
    chunk_features: int = 4096,
    seed: int = 0,
) -> Association:
    """Association of every feature with ``scores`` (aligned with the activations' images; NaN = no score).

    ``statistic`` is what the permutation test permutes (``"spearman"``: robust to the heavy tails of sparse
    activations; ``"pearson"``), two-sided. Each feature gets a permutation p from its own null
    (``p_feature``, at best ``1 / (P + 1)``) and one from the null pooled over the features whose density
    falls in the same of ``density_bins`` quantile bins (``p_value``, at best ``1 / (P · features in the bin
    + 1)``), which resolves the small p-values that FDR control over thousands of features needs, while a
    dense feature is still compared with dense ones (whose null is the narrowest).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, not {statistic!r}")
    if not 0 < quantile <= 0.5:
        raise ValueError(f"quantile must be in (0, 0.5], not {quantile}")
    if isinstance(activations, ImageActivations):
        values, usable = activations.values, activations.has_rows
    else:
        values, usable = activations, torch.ones(len(activations), dtype=torch.bool)
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if len(scores) != len(values):
        raise ValueError(f"{len(scores)} scores for {len(values)} images")
    usable = usable & ~scores.isnan()
    images = usable.nonzero()[:, 0]
    x, s = values[images].float(), scores[images]
    n, f = x.shape
    if n < 4:
        raise ValueError(f"only {n} images have both a score and store rows")
    s_unit, s_constant = _unit_columns(s[:, None].float())
    if bool(s_constant):
        raise ValueError("the scores are constant over the images")
    s_rank_unit, _ = _unit_columns(average_ranks(s[:, None].float()))
    high, low = torch.quantile(s, 1 - quantile), torch.quantile(s, quantile)
    top, bottom = s >= high, s <= low
    generator = torch.Generator().manual_seed(seed)
    permutations = torch.stack([torch.randperm(n, generator=generator) for _ in range(n_permutations)], 1)
    base = s_rank_unit if statistic == "spearman" else s_unit
    null_scores = base[:, 0][permutations]  # [n, P]: each column a permuted standardised score

    pearson, spearman = torch.empty(f), torch.empty(f)
    null = torch.empty(f, n_permutations)
    constant = torch.empty(f, dtype=torch.bool)
    for start in range(0, f, chunk_features):
        chunk = x[:, start:start + chunk_features]
        unit, const = _unit_columns(chunk)
        rank_unit, _ = _unit_columns(average_ranks(chunk))
        pearson[start:start + len(const)] = (unit.T @ s_unit)[:, 0]
        spearman[start:start + len(const)] = (rank_unit.T @ s_rank_unit)[:, 0]
        null[start:start + len(const)] = (rank_unit if statistic == "spearman" else unit).T @ null_scores
        constant[start:start + len(const)] = const
    observed = (spearman if statistic == "spearman" else pearson).abs()
    null = null.abs()
    # a hair below the observed value, so that float rounding of the identity permutation still counts
    tolerance = 1e-6
    p_feature = (1 + (null >= observed[:, None] - tolerance).sum(1)) / (n_permutations + 1)
    density = (x > 0).float().mean(0)
    p_value = torch.ones(f)
    alive = (~constant).nonzero()[:, 0]
    if len(alive):
        bins = min(density_bins, max(1, len(alive) // 50))  # at least ~50 features per bin, so a pool is a pool
        edges = torch.quantile(density[alive].double(), torch.linspace(0, 1, bins + 1, dtype=torch.float64))[1:-1]
        which = torch.bucketize(density[alive].double(), edges)
        for b in which.unique():
            members = alive[which == b]
            pool = null[members].flatten().sort().values
            exceed = len(pool) - torch.searchsorted(pool, observed[members] - tolerance, right=False)
            p_value[members] = (1 + exceed).float() / (len(pool) + 1)
    p_feature[constant], p_value[constant] = 1.0, 1.0
    pearson[constant], spearman[constant] = 0.0, 0.0
    mean_top, mean_bottom, d = cohens_d(x, top, bottom)
    return Association(pearson, spearman, mean_top, mean_bottom, d, p_feature.float(), p_value, bh_qvalues(p_value),
                       density, constant, statistic, n, n_permutations, quantile, images,
                       {"seed": seed, "density_bins": density_bins})


# ---------------------------------------------------------------------------------------------------------------
# Provenance.


@torch.no_grad()
def locate_peaks(
    store: Rows | str,
    sae: SAE,
    features: Sequence[int],
    images: Sequence[Sequence[int]],
    *,
    hook_name: str | None = None,
    chunk_rows: int = 8192,
) -> list[list[dict[str, Any]]]:
    """For each ``features[j]`` and each store image in ``images[j]``: the row where the feature peaks in that
    image (store row number, value, and the row's index columns: position, tile, row, col). One pass over the
    store that encodes only the rows of the images asked about."""
    from hooked_vlm.sae.harvesting import INDEX_COLUMNS

    store = as_rows(store)
    hook = _resolve_hook(store, sae, hook_name)
    wanted = torch.tensor(sorted({int(i) for group in images for i in group}), dtype=torch.long)
    columns = torch.tensor([int(f) for f in features], dtype=torch.long)
    groups = [torch.tensor([int(i) for i in group], dtype=torch.long) for group in images]
    best: dict[tuple[int, int], tuple[float, int, list[int]]] = {}
    offset = 0
    for acts, index in _row_chunks(store, hook, chunk_rows):
        keep = torch.isin(index[:, 0], wanted).nonzero()[:, 0]
        if len(keep):
            values = _encode(sae, acts[keep].to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)).cpu()[:, columns]
            kept_images = index[keep, 0]
            for j, group in enumerate(groups):
                mine = torch.isin(kept_images, group).nonzero()[:, 0]
                if not len(mine):
                    continue
                # strongest row first, then the first row of each image is its peak in this chunk
                order = mine[values[mine, j].argsort(descending=True, stable=True)]
                first = np.unique(kept_images[order].numpy(), return_index=True)[1]
                for r in order[first].tolist():
                    image, value, row = int(kept_images[r]), float(values[r, j]), int(keep[r])
                    if (j, image) not in best or value > best[(j, image)][0]:
                        best[(j, image)] = (value, offset + row, index[row].tolist())
        offset += len(acts)
    out = []
    for j, group in enumerate(images):
        entries = []
        for image in group:
            value, row, entry = best.get((j, int(image)), (float("nan"), -1, [int(image)] + [-1] * 5))
            entries.append({"image": int(image), "image_id": store.image_ids[int(image)], "store_row": row,
                            "value": value, **dict(zip(INDEX_COLUMNS[1:], entry[1:], strict=True))})
        out.append(entries)
    return out
