# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Integrated gradients (``attribution_patching(..., ig_steps=)``): where the inputs are interpolated and at which
points. The gradient accumulation is attribution patching's (:mod:`hooked_vlm.patching.attribution`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.layout import InputLayout, Selector


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
