"""Synthetic activations with planted sparse features: a check that an SAE setup finds known directions.

Each row is a sparse, non-negative combination of ``n_features`` random unit directions in ``d_in`` dimensions
(each feature fires independently with probability ``active_per_row / n_features``, with a magnitude drawn
uniformly from ``magnitude``), plus optional Gaussian noise. An SAE trained on them should have, for most
planted directions, a decoder row pointing the same way: :func:`recovery` measures that.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE


@dataclass
class PlantedFeatures:
    """Known sparse features and a source of activations built from them."""

    directions: Float[Tensor, "n_features d_in"]  # unit rows
    active_per_row: float
    magnitude: tuple[float, float]
    noise: float
    seed: int

    def batches(self, batch_size: int) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Endless batches of rows (what sae_lens's trainer asks for)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        n_features, d_in = self.directions.shape
        p = self.active_per_row / n_features
        low, high = self.magnitude
        while True:
            fires = torch.rand(batch_size, n_features, generator=generator) < p
            sizes = low + (high - low) * torch.rand(batch_size, n_features, generator=generator)
            rows = (fires * sizes) @ self.directions
            if self.noise:
                rows = rows + self.noise * torch.randn(batch_size, d_in, generator=generator)
            yield rows


def planted_features(
    d_in: int = 64,
    n_features: int = 128,
    *,
    active_per_row: float = 4.0,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise: float = 0.0,
    seed: int = 0,
) -> PlantedFeatures:
    """``n_features`` random unit directions in ``d_in`` dimensions (more features than dimensions: superposition)."""
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(n_features, d_in, generator=generator), dim=-1)
    return PlantedFeatures(directions, active_per_row, magnitude, noise, seed)


@torch.no_grad()
def recovery(sae: SAE, directions: Float[Tensor, "n_features d_in"], threshold: float = 0.9) -> dict[str, float]:
    """How well ``sae``'s decoder recovers planted ``directions``.

    ``max_cosine[i]`` is the largest cosine between planted direction ``i`` and any decoder row. Returns the
    fraction of planted directions with ``max_cosine ≥ threshold`` (``recovered``), the mean and the minimum of
    ``max_cosine``.
    """
    decoder = F.normalize(sae.W_dec.detach().float().cpu(), dim=-1)
    max_cosine = (F.normalize(directions.float(), dim=-1) @ decoder.T).max(dim=1).values
    return {
        "recovered": float((max_cosine >= threshold).float().mean()),
        "mean_max_cosine": float(max_cosine.mean()),
        "min_max_cosine": float(max_cosine.min()),
        "threshold": threshold,
    }
