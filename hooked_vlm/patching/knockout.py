# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Attention knockout: block attention from source to target positions over a window of layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from hooked_vlm.layout import InputLayout
from hooked_vlm.patching.batching import (
    _chunks,
    _Copies,
    _evaluate,
    _logits_kwargs,
    _Prefix,
    _replay,
    repeat_inputs,
)
from hooked_vlm.patching.planning import position_mask
from hooked_vlm.patching.results import KnockoutResult
from hooked_vlm.positions import Positions
from hooked_vlm.readouts import Readout


def _block_mask(layout: InputLayout, scores_hook: str, source: Positions, target: Positions) -> Bool[Tensor, "batch q k"]:
    """``[batch, query, key]``: True where a ``target`` query may not attend to a ``source`` key."""
    queries = position_mask(layout, scores_hook, target)
    keys = position_mask(layout, scores_hook, source)
    return queries[:, :, None] & keys[:, None, :]


def _knockout_hook(blocked: Bool[Tensor, "rows q k"], name: str) -> Callable:
    def knock_out(scores: Tensor, hook) -> Tensor:
        if scores.shape[-2:] != blocked.shape[-2:] or scores.shape[0] != blocked.shape[0]:
            raise ValueError(f"knockout hooks built for {name!r} of [batch, query, key] = {list(blocked.shape)} got "
                             f"scores {list(scores.shape)}: they apply to forward runs on the inputs they were built for")
        mask = blocked.to(scores.device)[:, None]
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        # a query with every key blocked would softmax to a uniform row over all keys, masked ones included
        if (scores.amax(-1) <= torch.finfo(scores.dtype).min / 2).any():
            raise ValueError(f"the knockout at {name!r} blocks every key of some query; it would attend uniformly")
        return scores

    return knock_out


def _scores_hooks(model: Any, tower: str, layers: Sequence[int]) -> list[str]:
    names = [f"{tower}.blocks.{layer}.attn.hook_attn_scores" for layer in layers]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"no attention-score hooks {missing[:3]}; {tower!r} has blocks 0..{_n_layers(model, tower) - 1}")
    return names


def _n_layers(model: Any, tower: str) -> int:
    return next(t.n_layers for t in model.adapter.towers() if t.name == tower)


def knockout_hooks(
    model: Any,
    inputs: Any,
    *,
    source: Positions = "image",
    target: Positions = -1,
    layers: Sequence[int],
    tower: str = "lm",
    prompt: Any = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks that stop ``target`` positions from attending to ``source`` positions in ``layers``.

    The hooks set the pre-softmax scores (``attn.hook_attn_scores``) of the blocked (query, key) pairs to the
    dtype's minimum, as an additive attention mask would, for runs on ``inputs`` (its layout picks positions).
    """
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    return [
        (name, _knockout_hook(_block_mask(prepared.layout, name, source, target), name))
        for name in _scores_hooks(model, tower, layers)
    ]


def attention_knockout(
    model: Any,
    inputs: Any,
    readout: Readout,
    *,
    source: Positions = "image",
    target: Positions = -1,
    window: int = 1,
    layers: Sequence[int] | None = None,
    tower: str = "lm",
    prompt: Any = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> KnockoutResult:
    """The readout with attention from ``source`` to ``target`` blocked in a window of ``window`` layers around
    each layer (``layers``, default all blocks of ``tower``), as in attention-knockout studies of LLaVA
    (Geva et al. 2023; Zhang et al. 2025; Kaduri et al. 2025). Windows run as copies of the input in batches.

    ``source`` / ``target``: positions (selectors or indices): ``"image"`` (add ``"newline"`` for
    LLaVA-OneVision's row ends: ``("image", "newline")``), ``"text"``, ``-1`` (the last token), ...
    ``batch_size`` and ``reuse_prefix`` as in :func:`activation_patching`.
    """
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    n_layers = _n_layers(model, tower)
    centres = list(layers) if layers is not None else list(range(n_layers))
    windows = [[j for j in range(c - (window - 1) // 2, c + window // 2 + 1) if 0 <= j < n_layers] for c in centres]
    names = _scores_hooks(model, tower, range(n_layers))
    blocked = {name: _block_mask(prepared.layout, name, source, target) for name in names}
    with torch.no_grad():
        base_value = float(_evaluate(model, prepared, readout).float().mean())
    extra = _logits_kwargs(model, readout)
    prefix = _Prefix(model, prepared, readout) if reuse_prefix else None
    values = torch.empty(len(windows))
    for chunk in _chunks(len(windows), batch_size, progress, "attention knockout"):
        n = len(chunk)
        repeated = repeat_inputs(model, prepared, n, **extra)
        single, copied = (x.layout.tower_for(names[0]).shape for x in (prepared, repeated))
        if copied != (n * single[0], single[1]):
            raise NotImplementedError(f"knockout in a packed sequence ({tower!r} holds several images in one row)")
        hooks = []
        for layer, name in enumerate(names):
            active = torch.tensor([layer in windows[w] for w in chunk])
            if active.any():
                rows = active.repeat_interleave(blocked[name].shape[0])
                hooks.append((name, _knockout_hook(blocked[name].repeat(n, 1, 1) & rows[:, None, None], name)))
        copies = _Copies(prepared.layout, repeated.layout, n)
        with torch.no_grad(), _replay(model, prefix.outputs([h for h, _ in hooks], copies) if prefix else {}):
            values[list(chunk)] = _evaluate(model, repeated, readout, hooks).float().view(n, -1).mean(1).cpu()
    return KnockoutResult(values, centres, windows, base_value, str(source), str(target), repr(readout))
