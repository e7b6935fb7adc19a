"""Residual-stream decomposition for every tower, with TransformerLens's cache-method names and meanings.

``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, ``get_full_resid_decomposition``,
``apply_ln_to_stack`` and ``logit_attrs`` follow ``transformer_lens.ActivationCache`` (3.x), with a ``tower=``
argument (``"vision"``, ``"text"``, ``"lm"``; default: the model's main tower, the LM of a VLM, the vision tower
of CLIP). They are thin methods of :class:`hooked_vlm.cache.ActivationCache`, computed here from the cached hooks
and the wrapped model's own modules (output projections, final norms, unembedding).

Differences from TransformerLens, all because the wrapped model is not weight-processed:

- **Norm weights are not folded.** ``apply_ln_to_stack`` divides by the cached run's scale (as TL does, so the
  map is linear in the stack) *and multiplies by the norm's weight* γ; the norm's bias β belongs to no
  component, so ``apply_ln_to_stack(stack).sum(0) + β`` is the model's normed output. The scale is computed from
  the residual the norm read in the cached run (``resid_pre``/``resid_mid``/final ``resid_post``): those hooks
  must be cached (TL reads ``hook_scale``, which wrapped models do not have).
- **"embed"** is the residual stream entering block 0 (``blocks.0.hook_resid_pre``): the patch + position
  embeddings (after ``ln_pre`` in CLIP), or the LM's input embeddings with the image features merged in. There is
  no separate ``pos_embed`` (rotary models have none; CLIP's is inside the embedding module).
- **"bias"** in ``get_full_resid_decomposition`` is the sum of the attention output biases of the layers covered
  (MLP output biases are inside ``mlp_out``, as TL does with ``expand_neurons=False``; neuron expansion is not
  offered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.utils import Slice

from hooked_vlm.head_results import HeadResultTap, per_head_results
from hooked_vlm.names import RESIDUAL_WRITES
from hooked_vlm.taps import submodule

if TYPE_CHECKING:
    from hooked_vlm.cache import ActivationCache
    from hooked_vlm.model import HookedVLM


def _slice(pos_slice: Any) -> Slice:
    return pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)


def main_tower(model: HookedVLM) -> str:
    names = [t.name for t in model.adapter.towers()]
    return "lm" if "lm" in names else names[0]


@dataclass
class Norm:
    """A LayerNorm or RMSNorm module of the wrapped model, and the residual hook it reads in a run."""

    module: nn.Module
    reads: str  # hook name of the residual stream the norm was applied to
    kind: str  # "LN" or "RMS"
    eps: float

    @property
    def weight(self) -> Tensor | None:
        """The per-channel gain the norm multiplies by. An RMSNorm's is read off the module applied to a vector of
        RMS 1, since variants store it differently (Gemma's RMSNorm multiplies by ``1 + weight``)."""
        weight = getattr(self.module, "weight", None)
        if weight is None or self.kind == "LN":
            return weight
        with torch.no_grad():
            return self.module(torch.ones_like(weight)) * (1 + self.eps) ** 0.5

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None) if self.kind == "LN" else None

    def scale(self, resid: Float[Tensor, "... d"]) -> Float[Tensor, "... 1"]:
        """The divisor this norm applied to ``resid`` (TransformerLens's ``hook_scale``)."""
        x = resid.float()
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt().to(resid.dtype)


def _norm(module: nn.Module, reads: str, where: str) -> Norm:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return Norm(module, reads, "LN", float(getattr(module, "eps", 1e-5)))
    if "RMSNorm" in name:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return Norm(module, reads, "RMS", float(eps))
    raise TypeError(f"{where} is a {name}, neither a LayerNorm nor an RMSNorm: apply_ln_to_stack cannot apply it")


class Tower:
    """What the decompositions need to know about one tower of a HookedVLM."""

    def __init__(self, model: HookedVLM, name: str | None = None):
        name = name or main_tower(model)
        infos = {t.name: t for t in model.adapter.towers()}
        if name not in infos:
            raise ValueError(f"tower={name!r}: this {model.adapter.family} model has towers {sorted(infos)}")
        self.model, self.name, self.info = model, name, infos[name]
        self.n_layers, self.n_heads = self.info.n_layers, self.info.n_heads

    def hook(self, layer: int, leaf: str) -> str:
        return f"{self.name}.blocks.{layer}.{leaf}"

    def _module(self, hook_name: str) -> nn.Module:
        return submodule(self.model.raw_model, self.model.hook_dict[hook_name].tap.module)

    def out_proj(self, layer: int) -> tuple[Float[Tensor, "d_model hd"], Float[Tensor, " d_model"] | None]:
        """``(weight, bias)`` of block ``layer``'s attention output into the residual stream (``W_O`` flattened,
        ``b_O``), with the block's layer scale (if any) folded in, so each head's part is what the block adds."""
        if self.hook(layer, "ln1_post.hook_in") in self.model.hook_dict:
            raise NotImplementedError(
                f"block {layer} of the {self.name} tower norms the attention output again (ln1_post) before it joins "
                "the residual stream, so the heads' z · W_O do not add up to hook_attn_out: per-head decompositions "
                "and attributions are not offered for this tower (decompose_resid, per layer, is exact)"
            )
        name = self.hook(layer, "attn.hook_result")
        if name not in self.model.hook_dict:
            raise KeyError(f"{name!r}: this tower has no per-head result hook, so no output projection is known")
        tap = self.model.hook_dict[name].tap
        module = submodule(self.model.raw_model, tap.module)
        if not isinstance(tap, HeadResultTap):  # open_clip: the block, whose nn.MultiheadAttention owns out_proj
            module = module.attn.out_proj
        weight, bias = module.weight, module.bias
        scale = self.layer_scale(layer)
        if scale is not None:
            weight, bias = scale[:, None] * weight, None if bias is None else scale * bias
        return weight, bias

    def layer_scale(self, layer: int) -> Float[Tensor, " d_model"] | None:
        return self.model.adapter.attn_layer_scale(self.name, layer)

    def head_results(self, cache: ActivationCache, layer: int) -> Float[Tensor, "batch pos head d_model"]:
        """``attn.hook_result`` of ``layer`` from the cache, or computed from a cached ``attn.hook_z``."""
        weight, _ = self.out_proj(layer)  # refuses where the heads do not add up to hook_attn_out
        name = self.hook(layer, "attn.hook_result")
        if name in cache.cache_dict:
            result, scale = cache.cache_dict[name], self.layer_scale(layer)
            return result if scale is None else result * scale.to(result.device, result.dtype)
        z_name = self.hook(layer, "attn.hook_z")
        if z_name not in cache.cache_dict:
            raise KeyError(f"neither {name!r} nor {z_name!r} is cached: cache '{self.name}.blocks.*.attn.hook_result'")
        z = cache.cache_dict[z_name]
        return per_head_results(z, weight.to(z.device))

    def final_norm(self) -> Norm:
        """The norm applied to the tower's last residual stream, as the model's next stage reads it."""
        final = self.hook(self.n_layers - 1, "hook_resid_post")
        candidates = {
            "lm": ["lm.ln_final.hook_normalized"],
            "text": ["text.ln_final.hook_normalized"],
            "vision": ["vision.hook_out", "vision.ln_final.hook_normalized", "projector.ln.hook_normalized"],
        }.get(self.name, [])
        for hook in candidates:
            if hook not in self.model.hook_dict:
                continue
            module = self._module(hook)
            if isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__:
                return _norm(module, final, f"{hook} ({self.model.hook_dict[hook].tap.module})")
        raise ValueError(
            f"the {self.name} tower of this {self.model.adapter.family} model has no final norm: the next stage reads "
            f"its residual stream directly ({final}), so there is nothing for apply_ln_to_stack to apply"
        )

    def block_norm(self, layer: int, mlp_input: bool) -> Norm:
        leaf, reads = ("ln2.hook_normalized", "hook_resid_mid") if mlp_input else ("ln1.hook_normalized", "hook_resid_pre")
        hook = self.hook(layer, leaf)
        return _norm(self._module(hook), self.hook(layer, reads), hook)

    def norm_at(self, layer: int | None, mlp_input: bool) -> Norm:
        if layer is None or layer == -1 or layer == self.n_layers:
            return self.final_norm()
        return self.block_norm(layer, mlp_input)

    def layer_arg(self, layer: int | None) -> int:
        if layer is None or layer == -1:
            return self.n_layers
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer={layer}: the {self.name} tower has layers 0..{self.n_layers} (n_layers = final)")
        return layer


def _get(cache: ActivationCache, name: str) -> Tensor:
    try:
        return cache.cache_dict[name]
    except KeyError:
        raise KeyError(f"{name!r} is not cached; the decomposition needs it (run_with_cache with it in names_filter)") from None


# ---------------------------------------------------------------------------------------------------------------
# TransformerLens cache methods.


def accumulated_resid(
    cache: ActivationCache,
    layer: int | None = None,
    incl_mid: bool = False,
    apply_ln: bool = False,
    pos_slice: Any = None,
    mlp_input: bool = False,
    return_labels: bool = False,
    tower: str | None = None,
):
    """``[n, batch, pos, d]``: ``resid_pre`` of layers ``0..layer`` (and ``resid_mid`` with ``incl_mid``), plus the
    final ``resid_post`` when ``layer`` is ``None``/``-1``/``n_layers``; labels ``0_pre``, ``0_mid``, ``final_post``.
    ``apply_ln`` applies the tower's final norm to each state with its own statistics (TL's ``recompute_ln``) at the
    final layer, and the cached scale of block ``layer``'s norm otherwise."""
    t = Tower(cache.model_or_raise(), tower)
    layer = t.layer_arg(layer)
    pos_slice = _slice(pos_slice)
    parts, labels = [], []
    for i in range(layer + 1):
        if i == t.n_layers:
            parts.append(_get(cache, t.hook(i - 1, "hook_resid_post")))
            labels.append("final_post")
            continue
        parts.append(_get(cache, t.hook(i, "hook_resid_pre")))
        labels.append(f"{i}_pre")
        if (incl_mid and i < layer) or (mlp_input and i == layer):
            parts.append(_get(cache, t.hook(i, "hook_resid_mid")))
            labels.append(f"{i}_mid")
    stack = torch.stack([pos_slice.apply(p, dim=-2) for p in parts])
    if apply_ln:
        if layer == t.n_layers:
            stack = t.final_norm().module(stack)  # each state with its own statistics, as TL's recompute_ln
        else:
            stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, tower=t.name)
    return (stack, labels) if return_labels else stack


def decompose_resid(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    mode: str = "all",
    apply_ln: bool = False,
    pos_slice: Any = None,
    incl_embeds: bool = True,
    return_labels: bool = False,
    tower: str | None = None,
):
    """``[n, batch, pos, d]``: ``embed``, then ``{l}_attn_out`` and ``{l}_mlp_out`` of each layer before ``layer``
    (``mode``: ``"all"``, ``"attn"``, ``"mlp"``); with ``mlp_input`` also layer ``layer``'s ``attn_out``. Sums to
    ``resid_pre`` of ``layer`` (the final ``resid_post`` by default)."""
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', not {mode!r}")
    t = Tower(cache.model_or_raise(), tower)
    layer = t.layer_arg(layer)
    pos_slice = _slice(pos_slice)
    parts, labels = [], []
    if incl_embeds:
        parts.append(_get(cache, t.hook(0, "hook_resid_pre")))
        labels.append("embed")
    for i in range(layer):
        if mode != "mlp":
            parts.append(_get(cache, t.hook(i, "hook_attn_out")))
            labels.append(f"{i}_attn_out")
        if mode != "attn":
            parts.append(_get(cache, t.hook(i, "hook_mlp_out")))
            labels.append(f"{i}_mlp_out")
    if mode == "all":
        writes, write_labels = _residual_writes(cache, t, layer)
        parts, labels = parts + writes, labels + write_labels
    if mlp_input and mode != "mlp" and layer < t.n_layers:
        parts.append(_get(cache, t.hook(layer, "hook_attn_out")))
        labels.append(f"{layer}_attn_out")
    stack = torch.stack([pos_slice.apply(p, dim=-2) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, tower=t.name)
    return (stack, labels) if return_labels else stack


def _residual_writes(cache: ActivationCache, t: Tower, layer: int) -> tuple[list[Tensor], list[str]]:
    """What enters the residual stream between the blocks before ``layer`` outside them (Qwen3-VL's DeepStack
    features, :data:`~hooked_vlm.names.RESIDUAL_WRITES`), labelled ``{l}_deepstack``. A write after the last block
    is not in its ``resid_post``, so it is left out."""
    parts, labels = [], []
    for i in range(min(layer, t.n_layers - 1)):
        for leaf in RESIDUAL_WRITES:
            if t.hook(i, leaf) in t.model.hook_dict:
                parts.append(_get(cache, t.hook(i, leaf)))
                labels.append(f"{i}_{leaf.removeprefix('hook_')}")
    return parts, labels


def stack_head_results(
    cache: ActivationCache,
    layer: int = -1,
    return_labels: bool = False,
    incl_remainder: bool = False,
    pos_slice: Any = None,
    apply_ln: bool = False,
    tower: str | None = None,
):
    """``[layer · head, batch, pos, d]``: each head's ``z @ W_O[head]`` (no bias) for the layers before ``layer``,
    labels ``L{l}H{h}``; ``incl_remainder`` appends ``resid_post[layer - 1]`` minus their sum (``remainder``)."""
    t = Tower(cache.model_or_raise(), tower)
    layer = t.layer_arg(layer)
    pos_slice = _slice(pos_slice)
    parts, labels = [], []
    for i in range(layer):
        result = pos_slice.apply(t.head_results(cache, i), dim=-3)  # [batch, pos, head, d]
        parts.append(result.movedim(-2, 0))
        labels.extend(f"L{i}H{h}" for h in range(result.shape[-2]))
    if parts:
        stack = torch.cat(parts)
    else:
        like = pos_slice.apply(_get(cache, t.hook(0, "hook_resid_pre")), dim=-2)
        stack = like.new_zeros((0, *like.shape))
    if incl_remainder:
        # layer 0 reads resid_post[-1], the final residual, as TransformerLens's negative index does
        final = pos_slice.apply(_get(cache, t.hook((layer - 1) % t.n_layers, "hook_resid_post")), dim=-2)
        stack = torch.cat([stack, (final - stack.sum(0))[None]])
        labels.append("remainder")
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, pos_slice=pos_slice, tower=t.name)
    return (stack, labels) if return_labels else stack


def get_full_resid_decomposition(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    expand_neurons: bool = False,
    apply_ln: bool = False,
    pos_slice: Any = None,
    return_labels: bool = False,
    project_output_onto: Tensor | None = None,
    tower: str | None = None,
):
    """``[n, batch, pos, d]``: every head (``L{l}H{h}``), every MLP (``{l}_mlp_out``), writes between blocks
    (``{l}_deepstack``), ``embed`` and ``bias`` (the attention output biases); sums exactly to ``resid_pre`` of ``layer`` (``resid_mid`` with ``mlp_input``; the
    final ``resid_post`` by default). ``project_output_onto`` (``[d]`` or ``[d, k]``) projects each component."""
    if expand_neurons:
        raise NotImplementedError("expand_neurons=True (per-neuron MLP results) is not offered; pass expand_neurons=False")
    t = Tower(cache.model_or_raise(), tower)
    layer = t.layer_arg(layer)
    pos_slice = _slice(pos_slice)
    head_layers = layer + (1 if mlp_input and layer < t.n_layers else 0)
    heads, labels = stack_head_results(cache, head_layers, return_labels=True, pos_slice=pos_slice, tower=t.name)
    mlps, mlp_labels = decompose_resid(
        cache, layer, mode="mlp", incl_embeds=False, pos_slice=pos_slice, return_labels=True, tower=t.name
    ) if layer > 0 else (heads[:0], [])
    writes, write_labels = _residual_writes(cache, t, layer)
    writes = [pos_slice.apply(w, dim=-2)[None] for w in writes]
    embed = pos_slice.apply(_get(cache, t.hook(0, "hook_resid_pre")), dim=-2)[None]
    bias = torch.zeros_like(embed[0, ..., :])
    for i in range(head_layers):
        b = t.out_proj(i)[1]
        if b is not None:
            bias = bias + b.to(bias.device, bias.dtype)
    stack = torch.cat([heads, mlps, *writes, embed, bias[None]])
    labels = [*labels, *mlp_labels, *write_labels, "embed", "bias"]
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice, tower=t.name)
    if project_output_onto is not None:
        stack = stack @ project_output_onto.to(stack.device, stack.dtype)
    return (stack, labels) if return_labels else stack


def _apply_norm(stack: Tensor, norm: Norm, scale: Tensor) -> Tensor:
    if norm.kind == "LN":
        stack = stack - stack.mean(-1, keepdim=True)
    stack = stack / scale
    if norm.weight is not None:
        stack = stack * norm.weight.to(stack.device, stack.dtype)
    return stack


def apply_ln_to_stack(
    cache: ActivationCache,
    residual_stack: Float[Tensor, "n *batch_pos d"],
    layer: int | None = None,
    mlp_input: bool = False,
    pos_slice: Any = None,
    batch_slice: Any = None,
    has_batch_dim: bool = True,
    tower: str | None = None,
) -> Float[Tensor, "n *batch_pos d"]:
    """Each component through the norm that reads the residual stream at ``layer`` (the tower's final norm by
    default; block ``layer``'s ln1, or ln2 with ``mlp_input``), with the scale of the cached run, so the result is
    linear in the stack: centred (LayerNorm), divided by the cached scale, multiplied by the norm's weight. The
    norm's bias is not added (no component owns it): ``result.sum(0) + norm.bias`` is the normed output."""
    t = Tower(cache.model_or_raise(), tower)
    norm = t.norm_at(layer, mlp_input)
    # the scale is taken from the residual the norm read in the cached run, sliced as the stack was
    resid = _slice(batch_slice).apply(_slice(pos_slice).apply(_get(cache, norm.reads), dim=-2), dim=0)
    if has_batch_dim:
        residual_stack = _slice(batch_slice).apply(residual_stack, dim=1)
    scale = norm.scale(resid)
    return _apply_norm(residual_stack, norm, scale.to(residual_stack.device))


def unembedding(model: HookedVLM) -> Float[Tensor, "vocab d_model"]:
    lm_head = model.raw_model.get_output_embeddings() if hasattr(model.raw_model, "get_output_embeddings") else None
    if lm_head is None:
        raise ValueError(f"this {model.adapter.family} model has no unembedding: logit_attrs needs a language model")
    return lm_head.weight


def _token_ids(model: HookedVLM, tokens: Any) -> Tensor:
    if isinstance(tokens, Tensor):
        return tokens
    if isinstance(tokens, int):
        return torch.tensor(tokens)
    from hooked_vlm.readouts import token_id

    if isinstance(tokens, str):
        return torch.tensor(token_id(tokens, model))
    return torch.tensor([token_id(t, model) for t in tokens])


def logit_attrs(
    cache: ActivationCache,
    residual_stack: Float[Tensor, "n *batch_pos d"],
    tokens: Any,
    incorrect_tokens: Any = None,
    pos_slice: Any = None,
    batch_slice: Any = None,
    has_batch_dim: bool = True,
    tower: str = "lm",
) -> Float[Tensor, "n ..."]:
    """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``'s): the stack
    through the final norm with the cached scale (:func:`apply_ln_to_stack`), dotted with the unembedding rows."""
    model = cache.model_or_raise()
    w_u = unembedding(model)
    directions = w_u[_token_ids(model, tokens).to(w_u.device)]
    if incorrect_tokens is not None:
        wrong = _token_ids(model, incorrect_tokens)
        if wrong.shape != _token_ids(model, tokens).shape:
            raise ValueError(f"tokens and incorrect_tokens must have the same shape ({tuple(wrong.shape)})")
        directions = directions - w_u[wrong.to(w_u.device)]
    scaled = apply_ln_to_stack(
        cache, residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim, tower=tower
    )
    return (scaled * directions.to(scaled.device, scaled.dtype)).sum(-1)


class BatchDimError(ValueError, AssertionError):
    """A batch-axis operation the cache cannot do (an ``AssertionError`` too, as TransformerLens raises one)."""


def _batch_size(cache: ActivationCache) -> int:
    """The number of inputs: rows of the layout's main sequence (without a layout, the commonest leading size)."""
    if cache.layout is not None:
        return cache.layout[cache.layout.main_tower].shape[0]
    from collections import Counter

    counts = Counter(v.size(0) for v in cache.cache_dict.values() if v.ndim > 0)
    return counts.most_common(1)[0][0] if counts else 1


def remove_batch_dim(cache: ActivationCache) -> ActivationCache:
    """Drop the batch axis of a batch-1 cache in place (TransformerLens's ``remove_batch_dim``)."""
    if not cache.has_batch_dim:
        import logging

        logging.warning("Tried removing batch dimension after already having removed it.")
        return cache
    batch = _batch_size(cache)
    if batch != 1:
        raise BatchDimError(f"cannot remove the batch dimension from a cache with batch size {batch}")
    for key, value in cache.cache_dict.items():
        if value.ndim > 0 and value.size(0) == 1:
            cache.cache_dict[key] = value[0]
    cache.has_batch_dim = False
    return cache


def apply_slice_to_batch_dim(cache: ActivationCache, batch_slice: Any) -> ActivationCache:
    """A new cache of the inputs ``batch_slice`` (an int, slice, list or ``Slice``) selects; an int removes the batch
    axis. It keeps the model and a layout of the kept rows (:meth:`InputLayout.select_inputs
    <hooked_vlm.layout.InputLayout.select_inputs>`): every tower's tensors are indexed with the rows of that tower
    that belong to the selected inputs (an image's tiles, say), and tensors with no per-position layout (pooled
    embeddings, logits) with the input rows. A tensor whose leading axis is neither is refused, not kept whole."""
    from hooked_vlm.cache import ActivationCache as Cache

    batch_slice = _slice(batch_slice)
    if not cache.has_batch_dim and batch_slice.mode != "empty":
        raise BatchDimError("cannot index into a cache without a batch dim")
    batch = _batch_size(cache)
    rows = batch_slice.apply(torch.arange(batch), dim=0).reshape(-1)
    layout, index = (None, {}) if cache.layout is None else cache.layout.select_inputs(rows)
    squeeze = batch_slice.mode == "int"
    sliced = {}
    for name, value in cache.cache_dict.items():
        tower = None
        if cache.layout is not None:
            try:
                tower = cache.layout.tower_key(name)
            except KeyError:  # no per-position layout (pooled embeddings, logits)
                pass
        if value.ndim == 0:
            sliced[name] = value
            continue
        if tower is not None and value.size(0) == cache.layout[tower].shape[0]:
            keep, positions = index[tower]
            aligned = positions is None and value.size(0) == batch and torch.equal(keep, rows)
            if positions is not None:  # one packed row: keep the selected inputs' positions
                sliced[name] = _packed_positions(name, value, positions, cache.layout[tower].shape[1])
                continue
        elif value.size(0) == batch:
            keep, aligned = rows, True
        elif cache.layout is None:
            sliced[name] = value  # no layout says what its rows are, as TransformerLens keeps them
            continue
        else:
            raise BatchDimError(
                f"{name!r} has {value.size(0)} rows, neither the {batch} inputs nor the rows of its sequence; "
                "it cannot be sliced by input"
            )
        kept = value[keep.to(value.device)]
        sliced[name] = kept[0] if squeeze and aligned else kept
    new = Cache(sliced, layout)
    new.model = cache.model
    new.has_batch_dim = not squeeze and cache.has_batch_dim
    return new


def _packed_positions(name: str, value: Tensor, positions: Tensor, length: int) -> Tensor:
    """``value``'s part at ``positions`` of a packed sequence of ``length``: along the position axis, and for
    attention scores and patterns (``[1, head, query, key]``) along both the query and the key axes."""
    from hooked_vlm.cache import PATTERN_HOOKS, axes

    axis = axes(name)[0]
    along = [axis, axis + 1] if name.rsplit(".", 1)[-1] in PATTERN_HOOKS else [axis]
    if any(value.ndim <= a or value.size(a) != length for a in along):
        raise BatchDimError(
            f"{name!r} ({tuple(value.shape)}) has no axis over the {length} positions of its packed sequence, so the "
            "selected inputs' part of it is not known; run those inputs on their own"
        )
    for a in along:
        value = value.index_select(a, positions.to(value.device))
    return value


def needed_hooks(tower: str = "*", heads: bool = True, model: HookedVLM | None = None) -> list[str]:
    """Glob patterns of the hooks the decompositions of ``tower`` read (pass as ``names_filter``). Pass ``model``
    for one with writes between blocks (Qwen3-VL's ``hook_deepstack``): their patterns are added where it has them
    (a pattern that matches nothing is an error in ``names_filter``)."""
    leaves = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]
    if heads:
        leaves.append("attn.hook_result")
    if model is not None:
        leaves += [leaf for leaf in RESIDUAL_WRITES if model.hook_names(f"{tower}.blocks.*.{leaf}")]
    return [f"{tower}.blocks.*.{leaf}" for leaf in leaves]


__all__: Sequence[str] = (
    "Tower",
    "accumulated_resid",
    "apply_ln_to_stack",
    "apply_slice_to_batch_dim",
    "decompose_resid",
    "get_full_resid_decomposition",
    "logit_attrs",
    "needed_hooks",
    "remove_batch_dim",
    "stack_head_results",
)
