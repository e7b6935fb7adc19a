# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Integrated gradients: attribution patching with the gradient averaged along the path from the base input to
the source, so that a hook's attributions add up to the effect of patching all of it (completeness). Where the
path is taken (the hooks themselves or the inputs) and at which points; the gradient accumulation is
:func:`~hooked_vlm.patching.attribution.gradient_patching`, shared with attribution patching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.layout import InputLayout, Selector
from hooked_vlm.patching.attribution import gradient_patching
from hooked_vlm.patching.planning import Hooks
from hooked_vlm.patching.results import PatchingResult
from hooked_vlm.positions import Positions
from hooked_vlm.readouts import Readout


def integrated_gradients(
    model: Any,
    clean: Any,
    corrupted: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    steps: int = 16,
    interpolate: str | Mapping[str, Selector] = "activations",
    positions: Positions | None = None,
    groups: Mapping[str, Positions] | None = None,
    heads: str | Sequence[int] | None = None,
    direction: str = "denoise",
    prompt: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> PatchingResult:
    """Estimate activation patching for every target of every hook from gradients integrated along a path.

    Like :func:`~hooked_vlm.patching.attribution_patching` (same axes, arguments and result: ``base + estimated
    change``), but the gradient is averaged over ``steps`` points between base and source (midpoints
    ``(j + ½) / steps``), run as copies of the input in batches of ``batch_size``. Where the points lie is
    ``interpolate``:

    - ``"activations"`` (default; as in Marks et al. 2024): each hook's own value is interpolated, one hook per
      copy, so a hook's attributions summed over all its entries converge to the exact effect of patching the
      whole hook (for a hook every path goes through, ``readout(source) - readout(base)``), where first-order
      attribution patching misses what the readout does between the two. Costs ``len(hooks) · steps`` copies.
    - ``"inputs"`` (EAP-IG, Hanna et al. 2024): the inputs are interpolated at :func:`default_interpolation` (the
      embeddings), and every hook's gradient is read from the same copies. Costs ``steps`` copies.
    - a mapping ``hook → positions``: inputs interpolated there instead.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive number of points along the path, not {steps!r}")
    if isinstance(interpolate, str) and interpolate not in ("activations", "inputs"):
        raise ValueError(
            f"interpolate must be 'activations', 'inputs' or a mapping hook → positions, not {interpolate!r}"
        )
    return gradient_patching(
        model,
        clean,
        corrupted,
        readout,
        hooks,
        positions=positions,
        groups=groups,
        heads=heads,
        direction=direction,
        prompt=prompt,
        batch_size=batch_size,
        progress=progress,
        alphas=midpoints(steps),
        interpolation=partial(interpolation_points, model, interpolate=interpolate),
        per_hook=interpolate == "activations",
    )


def default_interpolation(model: Any, layout: InputLayout) -> dict[str, Selector]:
    """Where integrated gradients interpolate between the inputs: the embeddings of every tower that takes input
    (``vision.hook_embed``, CLIP's ``text.hook_embed``) and, in VLMs, the LM's token embeddings at positions
    that do not come from the image (image tokens follow the interpolated vision tower)."""
    points: dict[str, Selector] = {}
    for name in ("vision.hook_embed", "text.hook_embed"):
        if name in model.hook_dict and name.split(".")[0] in layout.towers:
            points[name] = "all"
    if "lm.hook_embed" in model.hook_dict:
        points["lm.hook_embed"] = lambda lay: ~lay.image_token_mask
    return points


def interpolation_points(
    model: Any, layout: InputLayout, names: Sequence[str], interpolate: str | Mapping[str, Selector]
) -> dict[str, Selector]:
    """Hook → positions where integrated gradients interpolate: each hook itself (``"activations"``), the
    embeddings (``"inputs"``, :func:`default_interpolation`), or the given mapping."""
    if interpolate == "activations":
        return {name: "all" for name in names}
    return dict(default_interpolation(model, layout) if interpolate == "inputs" else interpolate)


def midpoints(steps: int) -> Float[Tensor, " steps"]:
    """The interpolation coefficients ``(j + ½) / steps``: the midpoint rule over ``[0, 1]``."""
    return (torch.arange(steps) + 0.5) / steps
