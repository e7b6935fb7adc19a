"""Phase 1: sparse autoencoders on any hook point, through sae_lens.

- :func:`harvest` / :func:`activation_stream`: activation rows ``[n, d]`` of chosen positions from images
  (a list, a folder or a Hugging Face dataset), with early stop and a record of where every row came from.
- :func:`harvest_to_store` / :class:`ActivationStore`: a resumable on-disk store (sharded safetensors and a
  manifest), read back as a shuffled stream; data-parallel under ``torchrun`` (:func:`torchrun_group`), one part
  per rank, joined by :func:`merge_stores`.
- :func:`train_sae` / :func:`train_saes`: sae_lens training (any architecture) from a live model, a store or
  any iterator of activations; saved in sae_lens's format.
- ``model.add_sae(sae)`` / ``run_with_saes`` / ``run_with_cache_with_saes`` (on every ``HookedVLM``): splicing.
- :func:`evaluate_sae`: explained variance, L0, dead/dense features and the downstream cost of splicing.
- :func:`scan_features`, :func:`feature_gallery`, :func:`density_histogram`, :func:`feature_table`: analysis.
- :func:`aesthetic_features`: the features associated with (and causal for) an aesthetic score.
- :func:`feature_dashboard`: a static HTML page per SAE (top images with heatmaps, activation histograms, logit and
  readout effects of every feature) and an index of the pages.

Names are imported on first use, so ``import hooked_vlm`` does not import sae_lens (an optional extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "harvest": "harvesting",
    "activation_stream": "harvesting",
    "image_source": "harvesting",
    "HarvestBatch": "harvesting",
    "ImageSource": "harvesting",
    "INDEX_COLUMNS": "harvesting",
    "ActivationStore": "store",
    "harvest_to_store": "store",
    "default_store_path": "store",
    "StoreMismatchError": "store",
    "merge_stores": "store",
    "rank_images": "distributed",
    "torchrun_group": "distributed",
    "SAETrainingConfig": "train",
    "TrainedSAE": "train",
    "train_sae": "train",
    "train_saes": "train",
    "ARCHITECTURES": "train",
    "SAEHooksMixin": "splice",
    "SAEShapeError": "splice",
    "SplicedSAE": "splice",
    "SAEReport": "evaluate",
    "evaluate_sae": "evaluate",
    "FeatureScan": "features",
    "scan_features": "features",
    "feature_gallery": "features",
    "density_histogram": "features",
    "feature_table": "features",
    "feature_dashboard": "dashboard",
    "FeatureDashboard": "dashboard",
    "planted_features": "synthetic",
    "recovery": "synthetic",
    "image_activations": "association",
    "associate": "association",
    "TensorRows": "association",
    "aesthetic_features": "aesthetic",
    "AestheticFeatures": "aesthetic",
    "load_scores": "aesthetic",
    "readout_scores": "aesthetic",
    "aesthetic_readout": "aesthetic",
    "causal_effects": "aesthetic",
    "steering_from_summary": "aesthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
