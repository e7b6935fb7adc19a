# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Ablation: zero / mean / given-value ablation swept like patching, hooks for one run, and data-set means."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.patching.batching import (
    _broadcast,
    _cache,
    _sweep,
)
from hooked_vlm.patching.planning import Hooks, _hook_names, _plan, position_mask
from hooked_vlm.patching.results import PatchingResult
from hooked_vlm.positions import Positions
from hooked_vlm.readouts import Readout


def _ablation_values(
    name: str, value: Tensor, where: Bool[Tensor, "batch pos"] | None, replacement: str | Tensor
) -> Tensor:
    """What ``name`` is set to when ablated: zeros, its mean over the ablated positions, or a given value."""
    if isinstance(replacement, Tensor):
        return replacement.to(value.device, value.dtype).expand_as(value)
    if replacement == "zero":
        return torch.zeros_like(value)
    if replacement != "mean":
        raise ValueError(f"value must be 'zero', 'mean' or a tensor, not {replacement!r}")
    if where is None:
        raise ValueError(f"mean ablation of {name!r} needs positions: the mean is taken over the ablated positions")
    return value[where.to(value.device)].mean(0).expand_as(value)


def ablation(
    model: Any,
    inputs: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    positions: Positions | None = None,
    groups: Mapping[str, Positions] | None = None,
    heads: str | Sequence[int] | None = None,
    value: str | Tensor = "zero",
    mean_over: Positions | None = None,
    prompt: Any = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Ablate each (hook, positions, heads) target in turn and record the readout (axes as in patching).

    ``value``: ``"zero"``; ``"mean"``, the mean of the hook over ``mean_over`` (default: every position the
    sweep covers, the union of ``positions`` or ``groups``), as in mean-ablating image tokens; or a tensor
    broadcast to the hook's value (e.g. a data-set mean from :func:`mean_activation`). ``batch_size`` and
    ``reuse_prefix`` as in :func:`activation_patching`.
    """
    names = _hook_names(model, hooks)
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    base_value, cache = _cache(model, prepared, names, readout)
    layout = prepared.layout
    if mean_over is None and (positions is not None or groups is not None):
        mean_over = list(groups.values()) if groups is not None else positions
    sources = {}
    for name in names:
        where = None if mean_over is None else position_mask(layout, name, mean_over)
        sources[name] = _ablation_values(name, cache[name], where, value)
    plan = _plan(model, prepared, cache, names, positions, groups, heads)
    values = _sweep(model, prepared, sources, plan, readout, batch_size, progress, "ablation", reuse_prefix)
    return PatchingResult(values.view(plan.shape), plan.axes, plan.labels, plan.hook_names, layout, "ablation",
                          base_value, readout=repr(readout))


def ablation_hooks(
    model: Any,
    inputs: Any,
    hooks: Hooks,
    positions: Positions = "image",
    value: str | Tensor = "mean",
    mean_over: Positions | None = None,
    prompt: Any = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks ablating ``positions`` of ``hooks`` for runs on ``inputs`` (``run_with_hooks``, ``hooks()``,
    ``generate``: Neo et al. mean-ablate object tokens this way).

    ``value`` as in :func:`ablation`; ``"mean"`` is over ``mean_over`` (default: ``positions``) of one unhooked
    run of ``inputs``.
    """
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    names = _hook_names(model, hooks)
    # the mean is that of the unablated run, even where earlier ablations change a later hook's value
    means = _cache(model, prepared, names, None)[1] if isinstance(value, str) and value == "mean" else {}
    result = []
    for name in names:
        where = position_mask(prepared.layout, name, positions)
        over = where if mean_over is None else position_mask(prepared.layout, name, mean_over)
        fixed = _ablation_values(name, means[name], over, value) if name in means else None

        def ablate(tensor: Tensor, hook, where=where, fixed=fixed, name=name) -> Tensor | None:
            if tensor.shape[:2] != where.shape:
                if name.startswith("lm.") and tensor.shape[0] == where.shape[0] and tensor.shape[1] < where.shape[1]:
                    return None  # a decoding step of generate: new tokens only, none of them ablated
                raise ValueError(f"ablation hooks built for {name!r} of shape {tuple(where.shape)} [batch, pos] got "
                                 f"{tuple(tensor.shape)}: they apply to runs on the inputs they were built for")
            replacement = fixed if fixed is not None else _ablation_values(name, tensor, where, value)
            return torch.where(_broadcast(where, tensor), replacement.to(tensor.device, tensor.dtype), tensor)

        result.append((name, ablate))
    return result


def mean_activation(
    model: Any, inputs: Sequence[Any], hook_name: str, positions: Positions = "image", prompt: Any = None
) -> Float[Tensor, "*shape"]:
    """The mean of ``hook_name`` over ``positions`` of every input in ``inputs`` (a data-set mean for ablation)."""
    total, count = None, 0
    for item in tqdm(inputs, desc=f"mean of {hook_name}", disable=len(inputs) < 8):
        prepared = model.prepare_inputs(item, prompt=prompt)
        _, cache = _cache(model, prepared, [hook_name], None)
        value = cache[hook_name]
        picked = value[position_mask(prepared.layout, hook_name, positions).to(value.device)].float()
        total = picked.sum(0) if total is None else total + picked.sum(0)
        count += len(picked)
    return total / count
