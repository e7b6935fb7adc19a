"""``torch.nn.MultiheadAttention`` recomputed from its own weights with hook points inside.

``nn.MultiheadAttention`` computes q/k/v, the pattern and z inside one functional call and uses ``out_proj``'s
weight without calling the module, so those values have no module boundary. A family tap replaces, for one run,
the call that reaches the attention (open_clip's ``ResidualAttentionBlock.attention``, the ``forward`` of
SigLIP's attention-pooling head) by :func:`hooked_multihead_attention`, which computes what
``nn.MultiheadAttention`` computes and passes each requested value through its hook point.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hooked_vlm.head_results import per_head_results
from hooked_vlm.taps import BoundHookPoint, Run

#: hook-name leaf of each value the recomputation passes through a hook point
ATTENTION_HOOKS = {
    "q": "hook_q",
    "k": "hook_k",
    "v": "hook_v",
    "scores": "hook_attn_scores",
    "pattern": "hook_pattern",
    "z": "hook_z",
    "result": "hook_result",  # z[head] @ W_O[head] per head, [batch, pos, head, d_model] (hooked_vlm.head_results)
}


def _projections(
    attn: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[batch, pos, head, d_head]`` as ``nn.MultiheadAttention`` projects them (one fused product for
    self-attention, q and the packed k/v apart when the keys are the values)."""
    heads = (attn.num_heads, attn.head_dim)
    if key is query and value is query:
        qkv = F.linear(query, attn.in_proj_weight, attn.in_proj_bias).unflatten(-1, (3, *heads))
        return qkv.unbind(-3)
    w_q, w_kv = attn.in_proj_weight.split((attn.embed_dim, 2 * attn.embed_dim))
    b_q, b_kv = (
        (None, None) if attn.in_proj_bias is None else attn.in_proj_bias.split((attn.embed_dim, 2 * attn.embed_dim))
    )
    q = F.linear(query, w_q, b_q).unflatten(-1, heads)
    if value is key:
        k, v = F.linear(key, w_kv, b_kv).unflatten(-1, (2, *heads)).unbind(-3)
        return q, k, v
    w_k, w_v = w_kv.chunk(2)
    b_k, b_v = (None, None) if b_kv is None else b_kv.chunk(2)
    return q, F.linear(key, w_k, b_k).unflatten(-1, heads), F.linear(value, w_v, b_v).unflatten(-1, heads)


def hooked_multihead_attention(
    attn: nn.MultiheadAttention,
    hooks: dict[str, BoundHookPoint],
    run: Run,
    query: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The output of a ``batch_first`` ``nn.MultiheadAttention`` on ``query`` / ``key`` / ``value`` (self-attention
    when ``key`` and ``value`` are ``None``), with the values named in ``hooks`` (:data:`ATTENTION_HOOKS` kinds)
    passed through their hook points. ``attn_mask`` is additive, ``[q, k]`` or ``[batch · head, q, k]``;
    ``key_padding_mask`` is ``[batch, k]``, True (or non-zero) at keys to ignore, as ``nn.MultiheadAttention`` takes it."""
    if not attn.batch_first:
        raise NotImplementedError("hooking a sequence-first nn.MultiheadAttention (batch_first=False) is not supported")
    key = query if key is None else key
    value = key if value is None else value

    def through(kind: str, x: Tensor) -> Tensor:
        return run.fire(hooks[kind], x) if kind in hooks else x

    q, k, v = (
        through(kind, x).transpose(1, 2) for kind, x in zip("qkv", _projections(attn, query, key, value), strict=True)
    )
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype)
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.unflatten(0, (-1, attn.num_heads))
    if key_padding_mask is not None:
        padding = key_padding_mask.bool()[:, None, None, :]  # [batch, 1, 1, k]
        padding = q.new_zeros(padding.shape).masked_fill(padding, float("-inf"))
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if "scores" in hooks or "pattern" in hooks:
        # nn.MultiheadAttention's need_weights path: scale q, add the mask, softmax in the input dtype
        scores = (q * attn.head_dim**-0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        pattern = through("pattern", F.softmax(through("scores", scores), dim=-1))
        z = F.dropout(pattern, p=attn.dropout, training=attn.training) @ v
    else:
        z = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=attn.dropout if attn.training else 0.0)
    z = through("z", z.transpose(1, 2))
    if "result" in hooks:
        result = per_head_results(z, attn.out_proj.weight)
        edited = run.fire(hooks["result"], result)
        if edited is not result:  # the output is what the heads write, summed, plus the output bias
            out = edited.sum(-2)
            return out if attn.out_proj.bias is None else out + attn.out_proj.bias
    return F.linear(z.flatten(-2), attn.out_proj.weight, attn.out_proj.bias)
