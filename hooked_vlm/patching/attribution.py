# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Attribution patching: gradient × activation difference for every target from one forward and one backward.

:func:`gradient_patching` is the one implementation behind it and :func:`~hooked_vlm.patching.integrated_gradients`
(the gradient averaged over points between the two inputs instead of read at the base input alone)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vlm.layout import InputLayout, Selector
from hooked_vlm.patching.batching import (
    _broadcast,
    _cache,
    _check_shapes,
    _chunks,
    _Copies,
    _entries,
    _evaluate,
    _logits_kwargs,
    repeat_inputs,
)
from hooked_vlm.patching.planning import Hooks, _hook_names, _plan, position_mask
from hooked_vlm.patching.results import PatchingResult
from hooked_vlm.positions import Positions
from hooked_vlm.readouts import Readout


@contextmanager
def _parameters_frozen(module: nn.Module):
    """No gradients for parameters during the block (only the activations' are needed); flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _add(shift: Tensor, tensor: Tensor, hook) -> Tensor:
    return tensor + shift.to(tensor.device, tensor.dtype)


def _add_leaf(leaves: dict[str, Tensor], tensor: Tensor, hook) -> Tensor:
    """Add a zero that requires grad: its gradient is the readout's gradient with respect to the hook's value."""
    leaves[hook.name] = torch.zeros_like(tensor, requires_grad=True)
    return tensor + leaves[hook.name]


def attribution_patching(
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
    ig_steps: int | None = None,
    interpolate: str | Mapping[str, Selector] = "activations",
    prompt: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> PatchingResult:
    """Estimate activation patching for every target of every hook at once from gradients.

    Attribution patching (Nanda 2023; Syed et al. 2023): the change a patch makes is estimated as
    ``(source - base) · ∂readout/∂activation`` at the base run, summed over the patched entries. It costs the
    source forward, one base forward and one backward for all hooks, positions and heads together. Axes and
    arguments are those of :func:`activation_patching`; values are ``base + estimated change``.

    ``ig_steps`` / ``interpolate``: run :func:`~hooked_vlm.patching.integrated_gradients` with ``steps=ig_steps``
    instead (the same result as calling it).
    """
    common = dict(
        positions=positions,
        groups=groups,
        heads=heads,
        direction=direction,
        prompt=prompt,
        batch_size=batch_size,
        progress=progress,
    )
    if ig_steps is not None:
        from hooked_vlm.patching.integrated_gradients import integrated_gradients  # it builds on this module

        return integrated_gradients(
            model, clean, corrupted, readout, hooks, steps=ig_steps, interpolate=interpolate, **common
        )
    return gradient_patching(model, clean, corrupted, readout, hooks, **common)


def gradient_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    readout: Readout,
    hooks: Hooks,
    *,
    positions: Positions | None,
    groups: Mapping[str, Positions] | None,
    heads: str | Sequence[int] | None,
    direction: str,
    prompt: Any,
    batch_size: int,
    progress: bool,
    alphas: Float[Tensor, " steps"] | None = None,
    interpolation: Callable[[InputLayout, list[str]], dict[str, Selector]] | None = None,
    per_hook: bool = False,
) -> PatchingResult:
    """``(source - base) · gradient`` summed over each target's entries, the gradient averaged over the points
    ``base + alpha · (source - base)`` of ``alphas`` (none: the base run alone, i.e. attribution patching).

    ``interpolation(base layout, hook names)`` says at which hooks and positions the points are made;
    ``per_hook``: each hook's own value is moved, one hook per copy, and only that hook's gradient is kept."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    names = _hook_names(model, hooks)
    clean_p, corrupted_p = model.prepare_inputs(clean, prompt=prompt), model.prepare_inputs(corrupted, prompt=prompt)
    base, source = (corrupted_p, clean_p) if direction == "denoise" else (clean_p, corrupted_p)
    points = interpolation(base.layout, names) if interpolation is not None else {}
    cached = list(dict.fromkeys([*names, *points]))
    source_value, source_cache = _cache(model, source, cached, readout)
    base_value, base_cache = _cache(model, base, cached, readout)
    _check_shapes(cached, source_cache, base_cache)
    delta = {name: source_cache[name] - base_cache[name] for name in cached}
    plan = _plan(model, base, base_cache, names, positions, groups, heads)

    # One copy of the input per (owner hook, step): the owner's value is interpolated and only its gradient kept.
    # Without an owner (inputs interpolated, or no integrated gradients) every hook reads every copy.
    alphas = torch.zeros(1) if alphas is None else alphas
    steps = len(alphas)
    owners: list[str | None] = names if per_hook else [None]
    copies_plan = [(owner, alpha) for owner in owners for alpha in alphas.tolist()]
    masks = {
        name: position_mask(base.layout, name, where)
        for name, where in points.items()
        if not (isinstance(where, str) and where == "all")  # "all" also covers pooled hooks, which have no layout
    }
    grads = {name: torch.zeros_like(base_cache[name], dtype=torch.float32) for name in names}
    for chunk in _chunks(len(copies_plan), batch_size, progress, "attribution patching"):
        n = len(chunk)
        prepared = repeat_inputs(model, base, n, **_logits_kwargs(model, readout))
        copies = _Copies(base.layout, prepared.layout, n)
        owner = [copies_plan[i][0] for i in chunk]
        alpha = torch.tensor([copies_plan[i][1] for i in chunk])

        def weights(name: str, values: Tensor, owner=owner) -> Tensor:
            return values * torch.tensor([o is None or o == name for o in owner], dtype=values.dtype)

        leaves: dict[str, Tensor] = {}
        fwd_hooks = []
        for name in points:
            shift = delta[name] * _broadcast(masks[name], delta[name]) if name in masks else delta[name]
            fwd_hooks.append((name, partial(_add, copies.tile(name, shift, weights(name, alpha)))))
        fwd_hooks += [(name, partial(_add_leaf, leaves)) for name in names]
        with _parameters_frozen(model), torch.enable_grad():
            values = _evaluate(model, prepared, readout, fwd_hooks).float()
            rows = len(values) // n
            total = values.sum() / (rows * steps)  # each hook's gradient: the mean over batch rows and steps
            found = torch.autograd.grad(total, [leaves[name] for name in names], allow_unused=True)
        for name, grad in zip(names, found, strict=True):
            if grad is not None:
                grads[name] += copies.fold(name, base_cache[name], grad.float(), weights(name, torch.ones(n)))

    contributions = {name: delta[name].float() * grads[name] for name in names}
    estimates = torch.tensor(
        [float(contributions[t.hook][_entries(base.layout, t.hook, base_cache[t.hook], t)].sum()) for t in plan.targets]
    )
    clean_value, corrupted_value = (source_value, base_value) if direction == "denoise" else (base_value, source_value)
    return PatchingResult(
        (base_value + estimates).view(plan.shape),
        plan.axes,
        plan.labels,
        plan.hook_names,
        base.layout,
        "attribution patching" if interpolation is None else "integrated gradients",
        base_value,
        clean_value,
        corrupted_value,
        repr(readout),
    )
