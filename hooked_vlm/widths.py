"""The width of each hook point: the length of the vector it carries at one position (``head · d_head`` for the
hooks split into heads), which is what an SAE, a probe or a steering vector there must read.

An adapter states every hook's width through :meth:`Adapter.hook_widths <hooked_vlm.adapter.Adapter.hook_widths>`.
Its default derives them here, from the model itself rather than from config fields (which families name and
size differently: Qwen2.5-VL's merger writes ``out_hidden_size``, not the vision width):

- per-block hooks from the tower's :class:`~hooked_vlm.adapter.TowerInfo` (the block hook set is shared);
- other hooks from the module their tap sits on: a ``Linear``'s ``out_features`` / ``in_features``, a conv's
  channels, an embedding's dimension, a norm's ``normalized_shape`` (or its 1-D ``weight``); a container's
  output is its last such child's, its input its first's; a module without parameters (an activation) keeps
  the width of the sibling before it.

Where that rule cannot see the width (a family tap that is not a module boundary, a projection held as a bare
parameter) the adapter adds the entry itself; ``tests/test_sae_width.py`` compares every declared width with
the width seen in a run, for every family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hooked_vlm.cache import NORMED_HEAD_HOOKS
from hooked_vlm.names import MLP_SUFFIXES, RESIDUAL_WIDTH_SUFFIXES, block_parts
from hooked_vlm.taps import InputTap, OutputTap, Tap, module_exists

if TYPE_CHECKING:
    from hooked_vlm.adapter import TowerInfo

#: hooks whose values are attention scores ``[batch, head, q_pos, k_pos]``: no per-position vector, no width
PATTERN_SUFFIXES = ("attn.hook_attn_scores", "attn.hook_pattern")


def block_hook_width(tower: TowerInfo, suffix: str) -> int | None:
    """The width of ``{tower}.blocks.{i}.{suffix}`` from the tower's facts (``None`` for a suffix it does not size)."""
    kv_heads = tower.n_kv_heads or tower.n_heads
    heads = {"attn.hook_q": tower.n_heads, "attn.hook_rot_q": tower.n_heads, "attn.hook_z": tower.n_heads}
    heads |= {"attn.hook_k": kv_heads, "attn.hook_rot_k": kv_heads, "attn.hook_v": kv_heads}
    heads |= {f"attn.{norm}": heads[f"attn.{kind}"] for norm, kind in NORMED_HEAD_HOOKS.items()}
    if suffix in heads:
        return heads[suffix] * tower.d_head
    if suffix == "attn.hook_result":  # each head's write into the residual stream
        return tower.n_heads * tower.d_model
    if suffix in MLP_SUFFIXES:
        return tower.d_mlp
    if suffix in RESIDUAL_WIDTH_SUFFIXES:
        return tower.d_model
    return None


def stated_width(module: nn.Module, output: bool) -> int | None:
    """The width a module states itself on one side, for certain (``None``: a container, or nothing stated)."""
    if isinstance(module, nn.Linear):
        return module.out_features if output else module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if output else module.in_channels
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if output else None  # its input is token ids
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    weight = module._parameters.get("weight")
    if not module._modules and weight is not None and weight.dim() == 1:  # RMSNorm and other per-channel norms
        return weight.shape[0]
    return None


def _is_shapeless(module: nn.Module) -> bool:
    """A module with no parameters and no children (activation, dropout): it keeps its input's width."""
    return not module._modules and next(module.parameters(recurse=False), None) is None


def output_width(module: nn.Module) -> int | None:
    """The width of ``module``'s output as its own structure states it."""
    width = stated_width(module, output=True)
    if width is not None or not module._modules:
        return width
    for child in reversed(list(module.children())):
        if not _is_shapeless(child) and (width := output_width(child)) is not None:
            return width
    return None


def input_width(module: nn.Module) -> int | None:
    """The width of ``module``'s first input as its own structure states it."""
    width = stated_width(module, output=False)
    if width is not None or not module._modules or isinstance(module, nn.Embedding):
        return width
    for child in module.children():
        if not _is_shapeless(child) and (width := input_width(child)) is not None:
            return width
    return None


def tap_width(root: nn.Module, tap: Tap) -> int | None:
    """The width at the boundary ``tap`` sits on (its views keep the width, heads flattened), or ``None`` when the
    modules do not state it (a family tap that is not a plain input or output)."""
    if type(tap) not in (OutputTap, InputTap) or not module_exists(root, tap.module):
        return None
    module = root.get_submodule(tap.module)
    if not _is_shapeless(module):
        return output_width(module) if isinstance(tap, OutputTap) else input_width(module)
    parent_path, _, leaf = tap.module.rpartition(".")
    siblings = list(root.get_submodule(parent_path)._modules.items())
    before = [child for name, child in siblings[: [name for name, _ in siblings].index(leaf)]]
    for child in reversed(before):
        if not _is_shapeless(child) and (width := output_width(child)) is not None:
            return width
    return None


def derived_hook_widths(root: nn.Module, hook_map: dict[str, Tap], towers: list[TowerInfo]) -> dict[str, int | None]:
    """Hook name → width for every name of ``hook_map`` (``None`` where neither rule applies, and for attention
    scores and patterns, which have none)."""
    by_name = {tower.name: tower for tower in towers}
    widths: dict[str, int | None] = {}
    for name, tap in hook_map.items():
        parts = block_parts(name)
        if parts is not None and parts[2] in PATTERN_SUFFIXES:
            widths[name] = None
            continue
        width = None
        if parts is not None and parts[0] in by_name:
            width = block_hook_width(by_name[parts[0]], parts[2])
        widths[name] = width if width is not None else tap_width(root, tap)
    return widths
