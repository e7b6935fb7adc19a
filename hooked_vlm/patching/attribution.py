# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Attribution patching: gradient × activation difference for every target from one forward and one backward,
and its integrated-gradients variant (``ig_steps``; :mod:`hooked_vlm.patching.integrated_gradients`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hooked_vlm.layout import Selector
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
from hooked_vlm.patching.integrated_gradients import interpolation_points, midpoints
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

    ``ig_steps``: integrated gradients. The gradient is averaged over ``ig_steps`` points between base and
    source (midpoints ``(j + ½) / ig_steps``), run as copies of the input in batches of ``batch_size``. Where the
    points lie is ``interpolate``:

    - ``"activations"`` (default; as in Marks et al. 2024): each hook's own value is interpolated, one hook per
      copy, so a hook's attributions summed over its entries converge to the exact effect of patching the whole
      hook. Costs ``len(hooks) · ig_steps`` copies.
    - ``"inputs"`` (EAP-IG, Hanna et al. 2024): the inputs are interpolated at :func:`default_interpolation` (the
      embeddings), and every hook's gradient is read from the same copies. Costs ``ig_steps`` copies.
    - a mapping ``hook → positions``: inputs interpolated there instead.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    if isinstance(interpolate, str) and interpolate not in ("activations", "inputs"):
        raise ValueError(f"interpolate must be 'activations', 'inputs' or a mapping hook → positions, not {interpolate!r}")
    names = _hook_names(model, hooks)
    clean_p, corrupted_p = model.prepare_inputs(clean, prompt=prompt), model.prepare_inputs(corrupted, prompt=prompt)
    base, source = (corrupted_p, clean_p) if direction == "denoise" else (clean_p, corrupted_p)
    per_hook = ig_steps is not None and interpolate == "activations"
    points = interpolation_points(model, base.layout, names, interpolate) if ig_steps is not None else {}
    cached = list(dict.fromkeys([*names, *points]))
    source_value, source_cache = _cache(model, source, cached, readout)
    base_value, base_cache = _cache(model, base, cached, readout)
    _check_shapes(cached, source_cache, base_cache)
    delta = {name: source_cache[name] - base_cache[name] for name in cached}
    plan = _plan(model, base, base_cache, names, positions, groups, heads)

    # One copy of the input per (owner hook, step): the owner's value is interpolated and only its gradient kept.
    # Without an owner (inputs interpolated, or no integrated gradients) every hook reads every copy.
    steps = ig_steps or 1
    alphas = midpoints(steps) if ig_steps else torch.zeros(1)
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
        (base_value + estimates).view(plan.shape), plan.axes, plan.labels, plan.hook_names, base.layout,
        "integrated gradients" if ig_steps else "attribution patching", base_value, clean_value, corrupted_value, repr(readout),
    )
