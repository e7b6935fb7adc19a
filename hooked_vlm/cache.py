"""ActivationCache: the activations of one run, keyed by canonical hook name, with the input layout attached."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from hooked_vlm.layout import InputLayout, Selector
from hooked_vlm.positions import resolve_tower

HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k", "hook_result")  # [batch, pos, head, d_head]
PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]
QUERY_HEAD_HOOKS = ("hook_q", "hook_z", "hook_result", "hook_rot_q", *PATTERN_HOOKS)  # head axis counts query heads (GQA)


#: per-head hooks named after the norm that makes them (QK norm: Qwen3-VL, Gemma 3), and the hook they are a kind of
NORMED_HEAD_HOOKS = {"q_norm.hook_normalized": "hook_q", "k_norm.hook_normalized": "hook_k"}


def leaf(name: str) -> str:
    """What a hook's tensor is, by the end of its name: ``hook_resid_post``, ``hook_q``, ... (a per-head QK-norm
    output counts as the queries or keys it norms, ``[batch, pos, head, d_head]`` like them)."""
    parts = name.rsplit(".", 2)
    return NORMED_HEAD_HOOKS.get(".".join(parts[-2:]), parts[-1])


def axes(name: str) -> tuple[int, int | None]:
    """``(position axis, head axis or None)`` of a canonical hook's tensor; patterns index query positions."""
    kind = leaf(name)
    if kind in PATTERN_HOOKS:
        return 2, 1
    if kind in HEAD_HOOKS:
        return 1, 2
    return 1, None


class HostCopies:
    """Copies of GPU tensors into pinned host memory that do not block the GPU: the forward runs on while
    activations stream out (``tensor.to("cpu")`` would stop it at every cached hook). :meth:`wait` before reading."""

    def __init__(self) -> None:
        self.devices: set[torch.device] = set()

    def __call__(self, tensor: Tensor) -> Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        self.devices.add(tensor.device)
        return host

    def wait(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)
        self.devices.clear()


def stash(tensor: Tensor, device: str | torch.device | None, dtype: torch.dtype | None,
          host_copies: HostCopies) -> Tensor:
    """``tensor`` detached, cast to ``dtype`` (floating tensors only) and moved to ``device``: a GPU tensor
    bound for the CPU goes to pinned memory without a sync (readable after ``host_copies.wait()``)."""
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if device is None:
        return tensor
    if tensor.is_cuda and torch.device(device).type == "cpu":
        return host_copies(tensor)
    return tensor.to(device)


class Slicer:
    """Keeps only some positions (a selector over the input layout) and heads of cached activations.

    Positions are taken on the sequence axis (the query axis of patterns); heads on the head axis of hooks that
    index query heads. Hooks without a per-position layout (pooled embeddings) are kept whole.
    """

    def __init__(self, prepared, positions: Selector | None, heads: list[int] | None):
        self.prepared, self.positions, self.heads = prepared, positions, heads
        self._index: dict[int, Tensor] = {}
        self._sequence_length: dict[str, int] = {}

    def __call__(self, name: str, tensor: Tensor) -> Tensor:
        position_axis, head_axis = axes(name)
        if self.heads is not None and head_axis is not None and leaf(name) in QUERY_HEAD_HOOKS:
            tensor = tensor.index_select(head_axis, torch.as_tensor(self.heads, device=tensor.device))
        if self.positions is None or tensor.dim() <= position_axis:
            return tensor
        index = self._position_index(name)
        if index is None or tensor.shape[position_axis] != self._sequence_length[name]:
            return tensor  # no per-position layout (pooled embeddings): kept whole
        index = index.to(tensor.device)
        shape = [1] * tensor.dim()
        shape[0], shape[position_axis] = index.shape
        expanded = index.view(shape).expand(*[n if i != position_axis else index.shape[1] for i, n in enumerate(tensor.shape)])
        return tensor.gather(position_axis, expanded)

    def _position_index(self, name: str) -> Tensor | None:
        layout = self.prepared.layout
        try:
            tower = layout.tower_for(name)
        except KeyError:
            return None
        self._sequence_length[name] = tower.shape[1]
        key = id(tower)
        if key not in self._index:
            mask = resolve_tower(tower, self.positions, layout, what=name)
            counts = mask.sum(1)
            if (counts != counts[0]).any():
                raise ValueError(
                    f"the position selector picks {counts.tolist()} positions in the rows of {name!r}'s sequence; "
                    "positions can only be cached for selections of equal size per row (run rows one at a time)"
                )
            self._index[key] = mask.nonzero()[:, 1].view(mask.shape[0], -1)
        return self._index[key]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ActivationCache(Mapping[str, Tensor]):
    """A read-only mapping ``hook name → tensor`` (TransformerLens style) that knows the input's layout.

    ``cache["vision.blocks.3.hook_resid_post"]`` returns the tensor; ``cache.stack("vision.blocks.*.hook_resid_post")``
    stacks a family over layers; ``cache.to_patch_grid(name)`` views image patches as ``[batch, rows, cols, ...]``.
    """

    def __init__(self, cache_dict: dict[str, Tensor], layout: InputLayout | Callable[[], InputLayout] | None = None):
        self.cache_dict = cache_dict
        self._layout_source = layout

    @property
    def layout(self) -> InputLayout | None:
        """Where every position came from (built on first use)."""
        if callable(self._layout_source):
            self._layout_source = self._layout_source()
        return self._layout_source

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.cache_dict[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self.cache_dict), n=3, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"{name!r} is not in this cache ({len(self.cache_dict)} entries){hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} entries: {', '.join(list(self.cache_dict)[:4])}{', …' if len(self) > 4 else ''})"

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A cache with every tensor moved to ``device`` and/or cast to ``dtype`` (floating tensors only); it keeps
        the layout and the model, so its decompositions still work."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        moved = ActivationCache({k: move(v) for k, v in self.cache_dict.items()}, self._layout_source)
        moved.model, moved.has_batch_dim = self.model, self.has_batch_dim
        return moved

    def names(self, pattern: str) -> list[str]:
        """Cached names matching a glob (``*`` matches any run of characters), in natural layer order."""
        return sorted(fnmatch.filter(self.cache_dict, pattern), key=_natural_key)

    def stack(self, pattern: str, return_labels: bool = False):
        """Stack every cached tensor whose name matches ``pattern`` along a new leading axis (layer order), on the
        device of the first (a cache of a model spread over several GPUs holds each tensor where it was made)."""
        names = self.names(pattern)
        if not names:
            raise KeyError(f"no cached hook matches {pattern!r}")
        device = self.cache_dict[names[0]].device
        stacked = torch.stack([self.cache_dict[n].to(device) for n in names])
        return (stacked, names) if return_labels else stacked

    def to_patch_grid(self, name: str) -> Tensor:
        """``[batch, pos, ...]`` → ``[batch, rows, cols, ...]`` over the image patches of ``name``'s sequence."""
        return self._layout().to_patch_grid(name, self[name])

    def select(self, name: str, positions: Selector) -> Tensor:
        """The rows of ``name`` at the selected positions, flattened over ``[batch, pos]`` → ``[n, ...]``."""
        mask = self._layout().mask(positions, name).to(self[name].device)
        return self[name][mask]

    def _layout(self) -> InputLayout:
        if self.layout is None:
            raise ValueError("this cache has no input layout attached")
        return self.layout

    # ---- TransformerLens residual-stream methods (hooked_vlm.decomposition; ``tower=`` picks vision/text/lm) ----
    #: the HookedVLM that made this cache (set by ``run_with_cache``): decompositions read its W_O, biases and norms
    model = None
    #: False after :meth:`remove_batch_dim`
    has_batch_dim = True

    def model_or_raise(self):
        if self.model is None:
            raise ValueError("this cache does not know its model; decompositions need a cache from HookedVLM.run_with_cache")
        return self.model

    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False,
                          return_labels=False, *, tower=None):
        from hooked_vlm import decomposition

        return decomposition.accumulated_resid(self, layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels, tower)

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True,
                        return_labels=False, *, tower=None):
        from hooked_vlm import decomposition

        return decomposition.decompose_resid(self, layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels, tower)

    def stack_head_results(self, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False,
                           *, tower=None):
        from hooked_vlm import decomposition

        return decomposition.stack_head_results(self, layer, return_labels, incl_remainder, pos_slice, apply_ln, tower)

    def get_full_resid_decomposition(self, layer=None, mlp_input=False, expand_neurons=False, apply_ln=False,
                                     pos_slice=None, return_labels=False, project_output_onto=None, *, tower=None):
        from hooked_vlm import decomposition

        return decomposition.get_full_resid_decomposition(
            self, layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels, project_output_onto, tower
        )

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                          has_batch_dim=True, *, tower=None):
        from hooked_vlm import decomposition

        return decomposition.apply_ln_to_stack(
            self, residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, tower
        )

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim=True, *, tower="lm"):
        from hooked_vlm import decomposition

        return decomposition.logit_attrs(
            self, residual_stack, tokens, incorrect_tokens, pos_slice, batch_slice, has_batch_dim, tower
        )

    def remove_batch_dim(self) -> ActivationCache:
        from hooked_vlm import decomposition

        return decomposition.remove_batch_dim(self)

    def apply_slice_to_batch_dim(self, batch_slice) -> ActivationCache:
        from hooked_vlm import decomposition

        return decomposition.apply_slice_to_batch_dim(self, batch_slice)
