"""Attention scores, pattern and post-RoPE q/k for Hugging Face models, through transformers' attention interface.

transformers 5.x looks the attention function up by ``module.config._attn_implementation`` at every call.
For the attention modules whose ``attn.hook_rot_q`` / ``hook_rot_k`` / ``hook_attn_scores`` / ``hook_pattern``
are in use, and only for that run, we give the module a config view that names our registered function;
every other layer keeps its own implementation (sdpa or flash) and the mask the model built for it.
The capture function recomputes attention eagerly (as the model's ``eager_attention_forward`` does) only
when scores or pattern are requested, so edits to them change the output; with only rot_q/rot_k requested
it hands the (possibly edited) q/k back to the original implementation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hooked_vlm.taps import BoundHookPoint, InstanceOverride, RemoveEntry, Run, Tap, submodule

CAPTURE_IMPLEMENTATION = "hooked_vlm_capture"  # must not contain "flash" (transformers tests the substring)


class AttentionConfigView:
    """A module's config with ``_attn_implementation`` replaced; everything else reads through."""

    def __init__(self, config, implementation: str):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_attn_implementation", implementation)

    def __getattr__(self, name):
        return getattr(self._config, name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)


@dataclass
class _Capture:
    hook_points: dict[str, BoundHookPoint]
    run: Run
    original: str


_captures: dict[nn.Module, _Capture] = {}


def original_attention_function(module: nn.Module, implementation: str):
    if implementation in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def additive_mask(
    attention_mask: Tensor | None, q_len: int, k_len: int, is_causal: bool, dtype: torch.dtype, device
) -> Tensor | None:
    """The mask in eager form (``0`` attend, ``finfo.min`` masked, broadcastable to ``[b, h, q, k]``).

    Accepts every form transformers hands an attention function: ``None`` (causality from ``is_causal``,
    upper-left aligned as in sdpa), a 4-D bool mask (sdpa), a 4-D float mask (eager), or a 2-D ``[b, k]``
    padding mask (flash).
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is None:
        if not (is_causal and q_len > 1):
            return None
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, min_value)[None, None]
    if attention_mask.dim() == 2:
        allowed = attention_mask.bool()[:, None, None, :]
        if is_causal and q_len > 1:
            offset = k_len - q_len
            allowed = allowed & torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(offset)
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~attention_mask, min_value)
    return attention_mask[..., :k_len].to(dtype)


def capture_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    capture = _captures[module]
    hps, run = capture.hook_points, capture.run
    if "rot_q" in hps:
        query = run.fire(hps["rot_q"], query.transpose(1, 2)).transpose(1, 2)
    if "rot_k" in hps:
        key = run.fire(hps["rot_k"], key.transpose(1, 2)).transpose(1, 2)
    if "scores" not in hps and "pattern" not in hps:
        original = original_attention_function(module, capture.original)
        return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    if not isinstance(attention_mask, (Tensor, type(None))):
        raise NotImplementedError(
            f"attention capture does not support {type(attention_mask).__name__} masks (flex attention); "
            "load the model with attn_implementation='sdpa'"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    mask = additive_mask(attention_mask, q_len, k_len, bool(is_causal), scores.dtype, scores.device)
    if mask is not None:
        scores = scores + mask
    if "scores" in hps:
        scores = run.fire(hps["scores"], scores)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if "pattern" in hps:
        pattern = run.fire(hps["pattern"], pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@dataclass(frozen=True)
class AttentionFunctionTap(Tap):
    """A value inside a Hugging Face attention function: ``kind`` is rot_q, rot_k, scores or pattern.

    All requested kinds of one attention module are installed together, as one capture.
    """

    kind: str = "pattern"

    def group_key(self) -> object:
        return (AttentionFunctionTap, self.module)

    @classmethod
    def install_group(cls, root, hook_points, run):
        module = submodule(root, hook_points[0].tap.module)
        config = module.config
        if module in _captures:
            # another thread is refused before it gets here (RunGuard): this is a run inside a run in one thread
            raise RuntimeError(
                f"attention of {hook_points[0].tap.module!r} is already being captured by the run in progress in "
                "this thread (a hook that runs the model again with attention hooks); run it after that run instead"
            )
        _captures[module] = _Capture(
            hook_points={hp.tap.kind: hp for hp in hook_points},
            run=run,
            original=config._attn_implementation,
        )
        return [
            InstanceOverride(module, "config", AttentionConfigView(config, CAPTURE_IMPLEMENTATION)),
            RemoveEntry(_captures, module),
        ]

    def describe(self) -> str:
        return f"{self.module} → attention function ({self.kind})"
