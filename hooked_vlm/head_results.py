"""``attn.hook_result``: each head's own write into the residual stream, ``z[head] @ W_O[head]`` (no bias).

TransformerLens computes it only when ``use_attn_result`` is on, because it holds ``head × d_model`` numbers per
position. Here it is a tap like any other: installed only for runs that hook or cache it, so an idle model pays
nothing. It sits on the attention's output projection (the ``nn.Linear`` whose input is ``hook_z``): a forward
hook reads the projection's input (after any ``hook_z`` edit) and weight, splits the product by head, and passes
``[batch, pos, head, d_model]`` through the hook point. An edited result replaces the projection's output by
``result.sum(head) + bias``, which is what the same edit of ``hook_z`` would have produced for a linear edit.

:func:`with_head_results` derives the hook point generically from every ``attn.hook_z`` bound to the input of a
Linear; families that compute the attention themselves (open_clip's ``nn.MultiheadAttention``) add their own.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

from accelerate.utils import align_module_device, has_offloaded_params
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vlm.taps import IDENTITY, InputTap, SplitHeads, Tap, View, submodule


def per_head_results(
    z: Float[Tensor, "*lead head d_head"], weight: Float[Tensor, "d_model head_x_d_head"]
) -> Float[Tensor, "*lead head d_model"]:
    """``z[..., h, :] @ W_O[h]`` for each head ``h``, with ``W_O`` the ``[d_model, head · d_head]`` Linear weight."""
    w_o = weight.unflatten(1, (z.shape[-2], z.shape[-1]))  # [d_model, head, d_head]
    return (z.unsqueeze(-2) * w_o.permute(1, 0, 2).to(z.dtype)).sum(-1)  # [..., head, d_model]


def heads_view_of_outer(view: View) -> View | None:
    """The view of the projection's per-head result given the view of its input ``hook_z``: ``hook_z``'s view
    without the head split (``SplitHeads`` → identity; a wrapper such as Qwen2-VL's ``Packed(SplitHeads)`` keeps
    its wrapping). ``None`` if ``hook_z`` is not a head split of the input."""
    if isinstance(view, SplitHeads):
        return IDENTITY
    if hasattr(view, "__dataclass_fields__") and "inner" in {f.name for f in fields(view)}:
        inner = heads_view_of_outer(view.inner)
        return None if inner is None else replace(view, inner=inner)
    return None


@dataclass(frozen=True)
class HeadResultTap(Tap):
    """Per-head results of the Linear at ``module`` (the attention's output projection), split in ``n_heads``."""

    n_heads: int = 0

    def install(self, root, hp, run):
        view, n_heads = self.view, self.n_heads

        def hook(module: nn.Linear, args, output):
            x = args[0]  # [..., head · d_head], after any hook_z edit (pre-hooks have run)
            z = x.unflatten(-1, (n_heads, -1))
            # accelerate's offloading has put the weights back on the meta device by the time forward hooks run
            with align_module_device(module) if has_offloaded_params(module) else nullcontext():
                result = per_head_results(z, module.weight)
                bias = None if module.bias is None else module.bias.to(x.device, result.dtype)
            h = view.to_hook(result)
            new = run.fire(hp, h)
            if new is h:
                return None
            summed = view.from_hook(result, new).sum(-2)
            return summed if bias is None else summed + bias

        return [submodule(root, self.module).register_forward_hook(hook, prepend=True)]

    def describe(self) -> str:
        return f"{self.module} → z · W_O per head (input × weight)"


def with_head_results(hook_map: dict[str, Tap], root: nn.Module) -> dict[str, Tap]:
    """``hook_map`` with an ``attn.hook_result`` right after every ``attn.hook_z`` that is the head-split input of
    an ``nn.Linear`` (and has no ``hook_result`` already), so forward order is kept."""
    out: dict[str, Tap] = {}
    for name, tap in hook_map.items():
        out[name] = tap
        if not name.endswith("attn.hook_z") or name[: -len("hook_z")] + "hook_result" in hook_map:
            continue
        if type(tap) is not InputTap:
            continue
        outer = heads_view_of_outer(tap.view)
        try:
            linear = root.get_submodule(tap.module)
        except AttributeError:
            continue
        if outer is None or not isinstance(linear, nn.Linear):
            continue
        d_head = _d_head(tap.view)
        out[name[: -len("hook_z")] + "hook_result"] = HeadResultTap(tap.module, view=outer, n_heads=linear.in_features // d_head)
    return out


def _d_head(view: View) -> int:
    if isinstance(view, SplitHeads):
        return view.d_head
    return _d_head(view.inner)
