# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Activation patching: denoising (clean into corrupted) or noising (corrupted into clean), swept in batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hooked_vlm.patching.batching import (
    _cache,
    _check_shapes,
    _sweep,
)
from hooked_vlm.patching.planning import Hooks, _hook_names, _plan
from hooked_vlm.patching.results import PatchingResult
from hooked_vlm.positions import Positions
from hooked_vlm.readouts import Readout


def activation_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    positions: Positions | None = None,
    groups: Mapping[str, Positions] | None = None,
    heads: str | Sequence[int] | None = None,
    direction: str = "denoise",
    prompt: Any = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Patch activations between a clean and a corrupted input and record the readout for every patch.

    ``hooks``: hook names or globs (``"lm.blocks.*.hook_resid_post"``); one sweep axis (``layer``).
    ``positions``: patch each position a selector picks on its own (``"image"``: every image token; ``"all"``;
    ``-1``; ``[3, 5]``), giving a ``position`` axis; ``groups``: patch named sets of positions together
    (``{"image": "image", "text": "text"}``), giving a ``group`` axis; neither: patch whole tensors.
    ``heads``: ``"each"`` or a list of heads, giving a ``head`` axis (q/k/v/z, scores, pattern hooks).
    ``direction``: ``"denoise"`` runs the corrupted input and patches in clean activations; ``"noise"`` runs the
    clean input and patches in corrupted ones. ``prompt`` is used for both inputs when they are images.
    ``batch_size`` patches run per forward. With ``reuse_prefix``, the blocks before the earliest patched block of
    a batch are not recomputed: they return the base run's outputs (exact; costs caching those outputs once).
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    names = _hook_names(model, hooks)
    clean_p, corrupted_p = model.prepare_inputs(clean, prompt=prompt), model.prepare_inputs(corrupted, prompt=prompt)
    clean_value, clean_cache = _cache(model, clean_p, names, readout)
    corrupted_value, corrupted_cache = _cache(model, corrupted_p, names, readout)
    _check_shapes(names, clean_cache, corrupted_cache)
    base, sources = (corrupted_p, clean_cache) if direction == "denoise" else (clean_p, corrupted_cache)
    plan = _plan(model, base, sources, names, positions, groups, heads)
    values = _sweep(model, base, sources, plan, readout, batch_size, progress, "activation patching", reuse_prefix)
    return PatchingResult(
        values.view(plan.shape), plan.axes, plan.labels, plan.hook_names, base.layout, "activation patching",
        corrupted_value if direction == "denoise" else clean_value, clean_value, corrupted_value, repr(readout),
    )
