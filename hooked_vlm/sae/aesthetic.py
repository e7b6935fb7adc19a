"""Phase 1's answer: which SAE units carry an aesthetic judgement.

- Scores (:func:`load_scores`): a column of a Hugging Face dataset saved to disk, a CSV (file name → score), a
  mapping, a boolean split of two folders (``"split:good,bad"``), or a readout computed on the fly
  (:func:`readout_scores`, :func:`aesthetic_readout`: the LAION aesthetic head, CLIP "a beautiful photo" vs "an
  ugly photo", a VLM's yes/no logit difference). Scores are aligned with the store's images by their ids.
- Association from the store, no model run (:mod:`hooked_vlm.sae.association`).
- Causal evidence on the model (:func:`causal_effects`): the readout's change when a feature is ablated or
  clamped through the spliced SAE (error term on: nothing else changes), and the first-order estimate
  (activation × gradient) for every feature from one backward, with their agreement.
- :func:`aesthetic_features`: one ranked table (CSV), galleries, scatter plots and a JSON summary;
  :func:`steering_from_summary` turns the summary's top features into steering vectors or clamps.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.readouts import ClipSimilarity, LogitDiff, Probe, Readout
from hooked_vlm.sae.association import (
    Association,
    ImageActivations,
    Rows,
    as_rows,
    associate,
    image_activations,
    locate_peaks,
)
from hooked_vlm.sae.harvesting import image_source, model_inputs
from hooked_vlm.steering import FeatureClamp, SteeringVector, steering_hooks

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_vlm.model import HookedVLM

#: the contrast CLIP readout, and the question a VLM answers yes / no
BEAUTY_TEXTS = ("a beautiful photo", "an ugly photo")
AESTHETIC_QUESTION = "Is this image aesthetically pleasing? Answer yes or no."
_ID_COLUMNS = ("file", "filename", "file_name", "image", "image_id", "id", "path", "name")
_SCORE_COLUMNS = ("score", "mean", "rating", "aesthetic", "label")


# ---------------------------------------------------------------------------------------------------------------
# Scores.


@dataclass
class ImageScores:
    """One score per store image (NaN: none), and where they came from."""

    values: Float[Tensor, " images"]
    description: str

    @property
    def n_scored(self) -> int:
        return int((~self.values.isnan()).sum())


def _align(mapping: Mapping[str, float], image_ids: Sequence[str], what: str) -> Tensor:
    """Scores by image id; ids that miss are tried by file name, then by file name without extension (a CSV of
    AVA ids next to a store of paths), and left NaN."""
    by_name: dict[str, float] = {}
    by_stem: dict[str, float] = {}
    for key, value in mapping.items():
        by_name.setdefault(os.path.basename(str(key)), value)
        by_stem.setdefault(os.path.splitext(os.path.basename(str(key)))[0], value)
    values = torch.full((len(image_ids),), math.nan, dtype=torch.float64)
    for i, image in enumerate(image_ids):
        base = os.path.basename(image)
        value = mapping.get(image, by_name.get(base, by_stem.get(os.path.splitext(base)[0])))
        if value is not None:
            values[i] = float(value)
    if not (~values.isnan()).any():
        raise ValueError(f"no image of the store has a score in {what}: store ids look like {list(image_ids[:3])}, "
                         f"score keys like {list(mapping)[:3]}")
    return values


def _read_csv(path: Path, column: str | None, id_column: str | None) -> dict[str, float]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        header = reader.fieldnames or []
        lowered = {name.lower(): name for name in header}
        ids = id_column or next((lowered[c] for c in _ID_COLUMNS if c in lowered), None)
        score = column or next((lowered[c] for c in _SCORE_COLUMNS if c in lowered), None)
        if ids is None or ids not in header:
            raise ValueError(f"{path}: no id column (tried {id_column or _ID_COLUMNS}; header {header}); pass id_column=")
        if score is None or score not in header:
            raise ValueError(f"{path}: no score column (tried {column or _SCORE_COLUMNS}; header {header}); pass column=")
        return {row[ids]: float(row[score]) for row in reader if row[score] not in ("", None)}


def split_scores(image_ids: Sequence[str], positive: str, negative: str) -> ImageScores:
    """1 for images under folder ``positive``, 0 under ``negative`` (ids are paths relative to the harvested
    folder, e.g. ``good/x.jpg``), NaN elsewhere."""
    values = torch.full((len(image_ids),), math.nan, dtype=torch.float64)
    for i, image in enumerate(image_ids):
        parts = Path(image).parts
        if positive in parts[:-1]:
            values[i] = 1.0
        elif negative in parts[:-1]:
            values[i] = 0.0
    if not (values == 1).any() or not (values == 0).any():
        raise ValueError(f"the split needs images under both {positive!r}/ and {negative!r}/; store ids look like "
                         f"{list(image_ids[:3])}")
    return ImageScores(values, f"split {positive} (1) vs {negative} (0)")


def load_scores(
    scores: Any, image_ids: Sequence[str], *, column: str | None = None, id_column: str | None = None
) -> ImageScores:
    """Scores aligned with ``image_ids`` (the store's ``image_ids``), from:

    - a CSV file (``id_column`` / ``column``, found by name otherwise: file/image/id/path, score/mean/rating);
    - a folder saved by ``datasets.Dataset.save_to_disk`` (``column``; ids are ``id_column`` values, else row
      indices, as the store records them for a harvested dataset);
    - ``"split:POS,NEG"``: 1 under folder POS, 0 under NEG (:func:`split_scores`);
    - a mapping id → score, or a sequence / tensor with one score per image, in store order;
    - an :class:`ImageScores`.
    """
    if isinstance(scores, ImageScores):
        return scores
    if isinstance(scores, str) and scores.startswith("split:"):
        names = scores.removeprefix("split:").split(",")
        if len(names) != 2:
            raise ValueError(f"a split is 'split:POSITIVE,NEGATIVE', not {scores!r}")
        return split_scores(image_ids, *names)
    if isinstance(scores, (str, os.PathLike)):
        path = Path(scores)
        if path.is_file():
            return ImageScores(_align(_read_csv(path, column, id_column), image_ids, str(path)),
                               f"{path} [{column or 'score'}]")
        if path.is_dir():
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
            if column is None or column not in dataset.column_names:
                raise ValueError(f"pass column= (one of {dataset.column_names}) for the scores of dataset {path}")
            keys = dataset[id_column] if id_column else range(len(dataset))
            return ImageScores(_align({str(k): v for k, v in zip(keys, dataset[column], strict=True)}, image_ids,
                                      str(path)), f"dataset {path} [{column}]")
        raise FileNotFoundError(f"scores {path}: no such file or folder")
    if isinstance(scores, Mapping):
        return ImageScores(_align({str(k): v for k, v in scores.items()}, image_ids, "the mapping"), "mapping")
    values = torch.as_tensor(np.asarray(scores, dtype=np.float64)).flatten()
    if len(values) != len(image_ids):
        raise ValueError(f"{len(values)} scores for the store's {len(image_ids)} images")
    return ImageScores(values, "given values")


def aesthetic_readout(model: HookedVLM, kind: str = "clip", *, path: str | os.PathLike | None = None) -> Readout:
    """A readout of aesthetic judgement: ``"clip"`` (cosine with "a beautiful photo" minus cosine with "an ugly
    photo"), ``"laion"`` (the LAION improved aesthetic predictor at ``path``, on CLIP ViT-L/14 embeddings), or
    ``"vlm"`` (logit of "Yes" minus "No", to be run with :data:`AESTHETIC_QUESTION` as the prompt)."""
    if kind == "clip":
        texts = list(BEAUTY_TEXTS)
        return ClipSimilarity.from_texts(model, texts, 0) - ClipSimilarity.from_texts(model, texts, 1)
    if kind == "laion":
        if path is None:
            raise ValueError("the LAION aesthetic readout needs path= (sac+logos+ava1-l14-linearMSE.pth)")
        return Probe.from_laion_aesthetic(path)
    if kind == "vlm":
        return LogitDiff("Yes", "No", tokenizer=model)
    raise ValueError(f"kind must be 'clip', 'laion' or 'vlm', not {kind!r}")


@torch.no_grad()
def readout_scores(
    model: HookedVLM, images: Any, readout: Readout, *, prompt: str | None = None, batch_size: int = 16,
    progress: bool = True,
) -> ImageScores:
    """``readout`` of every image (in the source's order: the order a store harvested from it holds)."""
    source = image_source(images)
    values = []
    for first in tqdm(range(0, len(source), batch_size), desc="scores", disable=not progress):
        prepared = model.prepare_inputs(**model_inputs(model, source.load(first, first + batch_size), prompt))
        values.append(evaluate_readout(model, prepared, readout).double().cpu())
    return ImageScores(torch.cat(values), repr(readout))


# ---------------------------------------------------------------------------------------------------------------
# Causal evidence.


def evaluate_readout(model: HookedVLM, prepared: Any, readout: Readout, fwd_hooks: Sequence = ()) -> Float[Tensor, " batch"]:
    """``readout`` (``[batch]``) of one run on ``prepared`` with ``fwd_hooks`` attached. The readout's hooks are
    kept with their autograd graph (``run_with_cache`` detaches), so the readout can be differentiated."""
    from hooked_vlm.cache import ActivationCache

    kept: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: Any) -> None:
        kept[hook.name] = tensor

    with model.hooks(fwd_hooks=[*fwd_hooks, *((name, keep) for name in readout.hook_names)]):
        output = model(prepared)
    return readout(output, ActivationCache(kept, lambda: prepared.layout))


@dataclass
class CausalEffects:
    """Per feature: the readout's mean change (over the images) when the feature is set to ``value`` through the
    spliced SAE (``exact``, for ``features``), and its first-order estimate for every feature (``estimate``)."""

    features: list[int]
    exact: Float[Tensor, " n"]  # mean over images of readout(edited) - readout(clean)
    estimate: Float[Tensor, " d_sae"]  # mean over images of Σ_positions (value - act) · ∂readout/∂act
    exact_per_image: Float[Tensor, "images n"]
    clean: Float[Tensor, " images"]
    mode: str
    value: float
    readout: str

    @property
    def agreement(self) -> float:
        """Pearson r of the exact effects and their first-order estimates over ``features``."""
        a, b = self.exact.double(), self.estimate[self.features].double()
        if len(a) < 2 or a.std() == 0 or b.std() == 0:
            return math.nan
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def causal_effects(
    model: HookedVLM,
    sae: SAE,
    images: Any,
    readout: Readout,
    features: Sequence[int],
    *,
    mode: str = "ablate",
    value: float | None = None,
    positions: Any = None,
    prompt: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CausalEffects:
    """Exact and first-order effects of SAE features on ``readout``, with the SAE spliced with its error term.

    ``mode="ablate"`` sets each of ``features`` to 0; ``"clamp"`` to ``value``, at ``positions`` (default: the
    positions the SAE was trained on), one :class:`~hooked_vlm.steering.FeatureClamp` forward per feature and
    image batch. The estimate for every feature comes from one forward and one backward per batch: the gradient
    of the readout with respect to ``hook_sae_acts_post``, times ``value - activation``.
    """
    from hooked_vlm.sae.evaluate import trained_positions
    from hooked_vlm.sae.splice import output_hook_name

    if mode not in ("ablate", "clamp"):
        raise ValueError(f"mode must be 'ablate' or 'clamp', not {mode!r}")
    if mode == "clamp" and value is None:
        raise ValueError("mode='clamp' needs value=")
    target = 0.0 if mode == "ablate" else float(value)
    positions = trained_positions(sae) if positions is None else positions
    hook = output_hook_name(sae)  # where the spliced SAE's features live (a transcoder's output hook)
    acts_name = f"{hook}.hook_sae_acts_post"
    source = image_source(images)
    features = [int(f) for f in features]
    estimates, exact, clean_values = [], [], []
    with model.saes(sae, use_error_term=True, sae_positions=positions):
        mask_of: dict[str, Tensor] = {}
        for first in tqdm(range(0, len(source), batch_size), desc="causal effects", disable=not progress):
            prepared = model.prepare_inputs(**model_inputs(model, source.load(first, first + batch_size), prompt))
            leaf: dict[str, Tensor] = {}

            def detach(acts: Tensor, hook: Any, leaf: dict[str, Tensor] = leaf) -> Tensor:
                # a leaf, so that one backward gives ∂readout/∂activation of every feature at every position
                leaf["acts"] = acts.detach().requires_grad_(True)
                return leaf["acts"]

            with torch.enable_grad():
                clean = evaluate_readout(model, prepared, readout, [(acts_name, detach)])
                (grad,) = torch.autograd.grad(clean.sum(), leaf["acts"])
            acts = leaf["acts"].detach()
            # only where the clamp acts (the SAE's positions): elsewhere the gradient is 0 already, but a clamp
            # at positions the SAE does not replace would be a no-op, and so must be its estimate
            where = _clamp_mask(model, prepared, hook, positions, acts, mask_of)
            delta = (target - acts) * grad * where
            estimates.append(delta.flatten(1, -2).sum(1).double().cpu() if delta.dim() > 2 else delta.double().cpu())
            clean_values.append(clean.detach().double().cpu())
            per_feature = []
            with torch.no_grad():
                for f in features:
                    clamp = FeatureClamp(hook, f, target, positions)
                    edited = evaluate_readout(model, prepared, readout, steering_hooks(model, clamp))
                    per_feature.append(edited.double().cpu() - clean_values[-1])
            exact.append(torch.stack(per_feature, 1) if per_feature else torch.zeros(len(clean), 0, dtype=torch.float64))
    per_image = torch.cat(exact)
    return CausalEffects(features, per_image.mean(0).float(), torch.cat(estimates).mean(0).float(), per_image.float(),
                         torch.cat(clean_values).float(), mode, target, repr(readout))


def _clamp_mask(model: HookedVLM, prepared: Any, hook: str, positions: Any, acts: Tensor, cache: dict) -> Tensor:
    """``[batch, pos, 1]`` (or ``[batch, 1]`` for pooled hooks): where a FeatureClamp at ``positions`` edits."""
    if acts.dim() == 2:
        return torch.ones(acts.shape[0], 1, device=acts.device, dtype=acts.dtype)
    from hooked_vlm.steering import steering_mask

    mask = steering_mask(prepared.layout, hook, positions, acts.shape[0], acts.shape[1])
    return mask.to(acts.device, acts.dtype).view(*mask.shape, *[1] * (acts.dim() - 2))


# ---------------------------------------------------------------------------------------------------------------
# The ranked answer.

TABLE_COLUMNS = ("rank", "feature", "direction", "spearman", "pearson", "cohens_d", "mean_top", "mean_bottom",
                 "density", "p_value", "p_feature", "q_value", "causal_effect", "causal_estimate", "top_images")


@dataclass
class AestheticFeatures:
    """The result of :func:`aesthetic_features`: table rows (best first), the statistics, and what was written."""

    rows: list[dict[str, Any]]
    association: Association
    activations: ImageActivations
    scores: ImageScores
    causal: CausalEffects | None
    summary: dict[str, Any]
    files: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int = 10, direction: int | None = None) -> list[dict[str, Any]]:
        """The first ``n`` rows, optionally only positive (``direction=1``) or negative (``-1``) features."""
        rows = [r for r in self.rows if direction is None or r["direction"] == direction]
        return rows[:n]


def _significant(row: dict[str, Any], alpha: float) -> bool:
    return row["q_value"] <= alpha


def aesthetic_features(
    store: Rows | str,
    sae: SAE,
    scores: Any,
    *,
    model: HookedVLM | None = None,
    images: Any = None,
    readout: Readout | None = None,
    out_dir: str | os.PathLike | None = None,
    hook_name: str | None = None,
    reduce: str = "max",
    statistic: str = "spearman",
    n_permutations: int = 1000,
    quantile: float = 0.2,
    alpha: float = 0.05,
    column: str | None = None,
    id_column: str | None = None,
    n_causal: int = 16,
    n_causal_images: int = 32,
    causal_mode: str = "ablate",
    n_gallery: int = 4,
    n_scatter: int = 4,
    n_top_images: int = 8,
    prompt: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> AestheticFeatures:
    """Rank the features of ``sae`` by their association with ``scores`` over the images of ``store``.

    ``scores`` is anything :func:`load_scores` takes, or a :class:`~hooked_vlm.readouts.Readout` (then computed
    on ``model`` over ``images``, the source the store was harvested from). With ``model``, ``images`` and a
    readout (``readout=``, else a readout given as ``scores``), the first ``n_causal`` features of the ranking
    are ablated (or clamped) through the spliced SAE on ``n_causal_images`` images, and every feature gets a
    first-order estimate. With ``model`` and ``images``, galleries of the top ``n_gallery`` positive and
    negative features are drawn. ``out_dir`` receives ``features.csv``, ``summary.json``, ``scatter_<f>.png``
    and ``gallery_<f>.png``.
    """
    store = as_rows(store)
    if isinstance(scores, Readout):
        if model is None or images is None:
            raise ValueError("scores given as a readout need model= and images= (the images the store was harvested from)")
        readout = readout or scores
        scores = readout_scores(model, images, scores, prompt=prompt, batch_size=batch_size, progress=progress)
    scores = load_scores(scores, store.image_ids, column=column, id_column=id_column)
    activations = image_activations(store, sae, hook_name=hook_name, reduce=reduce, progress=progress)
    assoc = associate(activations, scores.values, statistic=statistic, n_permutations=n_permutations,
                      quantile=quantile, seed=seed)
    order = assoc.ranking()
    stat = assoc.spearman if statistic == "spearman" else assoc.pearson

    # provenance of the rows written with images: the images where the feature is strongest, and the patch
    n_listed = max(n_causal, n_gallery * 2, n_scatter, 32)
    listed = order[:n_listed].tolist()
    used = assoc.images
    top_images = [used[activations.values[used, f].topk(min(n_top_images, len(used))).indices].tolist() for f in listed]
    peaks = dict(zip(listed, locate_peaks(store, sae, listed, top_images, hook_name=activations.hook_name), strict=True))

    causal = None
    causal_readout = readout
    if model is not None and images is not None and causal_readout is not None and n_causal > 0:
        chosen = image_source(images)
        subset = _subset(chosen, n_causal_images)
        causal = causal_effects(model, sae, subset, causal_readout, listed[:n_causal], mode=causal_mode, prompt=prompt,
                                batch_size=batch_size, progress=progress)
    exact = dict(zip(causal.features, causal.exact.tolist(), strict=True)) if causal else {}

    rows = []
    for rank, f in enumerate(order.tolist(), 1):
        rows.append({
            "rank": rank, "feature": f, "direction": int(math.copysign(1, float(stat[f]))) if stat[f] != 0 else 0,
            "spearman": float(assoc.spearman[f]), "pearson": float(assoc.pearson[f]),
            "cohens_d": float(assoc.cohens_d[f]), "mean_top": float(assoc.mean_top[f]),
            "mean_bottom": float(assoc.mean_bottom[f]), "density": float(assoc.density[f]),
            "p_value": float(assoc.p_value[f]), "p_feature": float(assoc.p_feature[f]), "q_value": float(assoc.q_value[f]),
            "causal_effect": exact.get(f, math.nan),
            "causal_estimate": float(causal.estimate[f]) if causal else math.nan,
            "top_images": peaks.get(f, []),
        })
    summary = _summary(rows, assoc, activations, scores, causal, sae, alpha)
    result = AestheticFeatures(rows, assoc, activations, scores, causal, summary)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.files["table"] = str(write_table(rows, out / "features.csv"))
        result.files["scatter"] = [str(scatter_plot(result, r["feature"], out / f"scatter_{r['feature']}.png"))
                                   for r in rows[:n_scatter]]
        if model is not None and images is not None and n_gallery > 0:
            result.files["gallery"] = _galleries(model, sae, result, images, out, n_gallery, prompt)
        summary["files"] = result.files
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        result.files["summary"] = str(out / "summary.json")
    return result


def _subset(source: Any, n: int) -> Any:
    """The first ``n`` images of a source, as a list with their ids."""
    n = min(n, len(source))
    return image_source(source.load(0, n), ids=source.ids[:n])


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (Tensor, np.ndarray)):
        return value.tolist()
    return str(value)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _summary(rows, assoc, activations, scores, causal, sae, alpha) -> dict[str, Any]:
    significant = [r for r in rows if _significant(r, alpha)]
    brief = lambda r: _clean({k: r[k] for k in TABLE_COLUMNS if k != "top_images"} | {"top_images": r["top_images"][:4]})  # noqa: E731
    return {
        "format": "hooked_vlm.aesthetic_features/1",
        "hook_name": activations.hook_name,
        "sae": {"d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae), "architecture": type(sae).__name__,
                "model_name": getattr(sae.cfg.metadata, "model_name", None),
                "positions": getattr(sae.cfg.metadata, "positions", None)},
        "store": activations.store_path,
        "scores": scores.description,
        "n_images": assoc.n_images,
        "reduce": activations.reduce,
        "statistic": assoc.statistic,
        "n_permutations": assoc.n_permutations,
        "quantile": assoc.quantile,
        "alpha": alpha,
        "n_significant": len(significant),
        "positive": [brief(r) for r in significant if r["direction"] > 0][:32],
        "negative": [brief(r) for r in significant if r["direction"] < 0][:32],
        "top": [brief(r) for r in rows[:32]],
        "causal": None if causal is None else {
            "mode": causal.mode, "value": causal.value, "readout": causal.readout, "n_features": len(causal.features),
            "n_images": int(causal.exact_per_image.shape[0]), "agreement_pearson": _clean({"r": causal.agreement})["r"],
        },
    }


def write_table(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The ranked table as CSV (``top_images``: ``id (value @ position p, tile t, row r, col c)``, ``; ``-joined)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(TABLE_COLUMNS)
        for row in rows:
            cells = []
            for column in TABLE_COLUMNS:
                value = row[column]
                if column == "top_images":
                    value = "; ".join(f"{e['image_id']} ({e['value']:.4g} @ position {e['position']}, tile {e['tile']}, "
                                      f"row {e['row']}, col {e['col']})" for e in value)
                elif isinstance(value, float):
                    value = "" if math.isnan(value) else f"{value:.6g}"
                cells.append(value)
            writer.writerow(cells)
    return path


def scatter_plot(result: AestheticFeatures, feature: int, path: str | os.PathLike) -> Path:
    """Score against the feature's image-level activation, one dot per scored image, with the statistics."""
    used = result.association.images
    x = result.activations.values[used, feature].numpy()
    y = result.scores.values[used].numpy()
    a = result.association
    fig = Figure(figsize=(5.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(x, y, s=8, alpha=0.6, color="#4477aa")
    ax.set_xlabel(f"feature {feature}: {result.activations.reduce} activation over the image's rows")
    ax.set_ylabel(result.scores.description[:60])
    ax.set_title(f"ρ {float(a.spearman[feature]):.3f} · r {float(a.pearson[feature]):.3f} · d "
                 f"{float(a.cohens_d[feature]):.2f} · q {float(a.q_value[feature]):.2g} · density "
                 f"{float(a.density[feature]):.1%}", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _galleries(model, sae, result: AestheticFeatures, images, out: Path, n: int, prompt) -> list[str]:
    """feature_gallery of the top ``n`` positive and ``n`` negative features, from a FeatureScan built out of the
    store's statistics (no scan over the images again)."""
    from hooked_vlm.sae.evaluate import trained_positions
    from hooked_vlm.sae.features import FeatureScan, feature_gallery
    from hooked_vlm.sae.harvesting import describe_positions

    source = image_source(images)
    if len(source) != len(result.activations.image_ids):
        raise ValueError(f"images= has {len(source)} images, the store {len(result.activations.image_ids)}: pass the "
                         "source the store was harvested from")
    chosen = [r for r in result.rows if r["direction"] > 0][:n] + [r for r in result.rows if r["direction"] < 0][:n]
    acts = result.activations
    d_sae, k = acts.values.shape[1], max([len(r["top_images"]) for r in chosen] + [1])
    top_values = torch.full((d_sae, k), -math.inf)
    top_images = torch.full((d_sae, k), -1, dtype=torch.long)
    top_patches = torch.full((d_sae, k, 3), -1, dtype=torch.long)
    for r in chosen:
        for j, e in enumerate(r["top_images"]):
            top_values[r["feature"], j] = e["value"]
            top_images[r["feature"], j] = e["image"]
            top_patches[r["feature"], j] = torch.tensor([e["tile"], e["row"], e["col"]])
    scan = FeatureScan(sae.cfg.metadata.model_name or "model", acts.hook_name, describe_positions(trained_positions(sae)),
                       prompt if prompt is not None else sae.cfg.metadata.prompt, source, acts.n_rows, acts.fired,
                       acts.activation_sum, top_values, top_images, top_patches)
    return [str(feature_gallery(model, sae, scan, r["feature"], out / f"gallery_{r['feature']}.png")) for r in chosen]


# ---------------------------------------------------------------------------------------------------------------
# Phase 2 / 3 hand-off.


def steering_from_summary(
    summary: dict[str, Any] | str | os.PathLike | AestheticFeatures,
    sae: SAE,
    *,
    n: int = 3,
    kind: str = "vector",
    direction: int = 1,
    strength: float = 1.0,
    positions: Any = "all",
) -> list[SteeringVector] | list[FeatureClamp]:
    """Interventions from the top ``n`` significant features of one ``direction`` (1: more aesthetic, -1: less).

    ``kind="vector"``: :meth:`SteeringVector.from_sae_feature` with ``scale = strength`` (no splice needed);
    ``"clamp"``: :meth:`FeatureClamp.from_sae` to ``strength`` times the feature's mean activation over the
    top score quantile (splice the SAE with its error term first).
    """
    if isinstance(summary, AestheticFeatures):
        summary = summary.summary
    elif not isinstance(summary, dict):
        summary = json.loads(Path(summary).read_text())
    rows = summary["positive" if direction > 0 else "negative"][:n]
    if not rows:
        raise ValueError(f"the summary lists no significant {'positive' if direction > 0 else 'negative'} feature "
                         f"(q ≤ {summary.get('alpha')})")
    if summary["hook_name"] != sae.cfg.metadata.hook_name:
        raise ValueError(f"the summary is for {summary['hook_name']!r}, the SAE for {sae.cfg.metadata.hook_name!r}")
    if kind == "vector":
        return [SteeringVector.from_sae_feature(sae, r["feature"], scale=strength, positions=positions) for r in rows]
    if kind == "clamp":
        return [FeatureClamp.from_sae(sae, r["feature"], strength * max(r["mean_top"], r["mean_bottom"]),
                                      positions=positions) for r in rows]
    raise ValueError(f"kind must be 'vector' or 'clamp', not {kind!r}")
