"""What every canonical hook name means, with its shape convention (doc/hook_reference.md, "Naming scheme" and "Shape conventions").

Per-block names are keyed by the part after ``{tower}.blocks.{i}.`` (``attn.hook_z``): they mean the same in
``vision.blocks``, ``text.blocks`` and ``lm.blocks``. Tower- and model-level names are keyed by their full name
(``vision.hook_out``, ``projector.hook_packed``, ``hook_image_embeds``). :func:`describe_hook` resolves any
name, including module-path escape hatches (``hf.<module path>.hook_out``) and names a new adapter adds before
they are written up here, to ``(shape convention, meaning)`` without raising.
"""

from __future__ import annotations

import re

RESID = "[batch, pos, d]"
#: block hooks that write into the residual stream between blocks (``resid_pre[l + 1] = resid_post[l] + write``):
#: decompositions count each as a component of its own
RESIDUAL_WRITES = ("hook_deepstack",)
HEADS = "[batch, pos, head, d_head]"
SCORES = "[batch, head, q_pos, k_pos]"
MLP = "[batch, pos, d_mlp]"

#: Per-block hooks, keyed by the part after ``{tower}.blocks.{i}.``.
BLOCK_HOOKS: dict[str, tuple[str, str]] = {
    "hook_resid_pre": (RESID, "block input (residual stream)"),
    "ln1.hook_normalized": (RESID, "first norm output (the attention's input)"),
    "attn.hook_q": (HEADS, "queries per head, before RoPE"),
    "attn.hook_k": (HEADS, "keys per head, before RoPE (kv heads under GQA)"),
    "attn.q_norm.hook_normalized": (HEADS, "queries per head after the per-head QK norm, before RoPE (Qwen3, Gemma 3)"),
    "attn.k_norm.hook_normalized": (HEADS, "keys per head after the per-head QK norm, before RoPE (Qwen3, Gemma 3)"),
    "attn.hook_v": (HEADS, "values per head (kv heads under GQA)"),
    "attn.hook_rot_q": (HEADS, "queries after RoPE (models with RoPE)"),
    "attn.hook_rot_k": (HEADS, "keys after RoPE (models with RoPE; kv heads under GQA)"),
    "attn.hook_attn_scores": (SCORES, "attention scores: scaled and masked, before softmax"),
    "attn.hook_pattern": (SCORES, "attention pattern: after softmax"),
    "attn.hook_z": (HEADS, "per-head attention output, before the output projection"),
    "attn.hook_result": ("[batch, pos, head, d]", "each head's write into the residual stream: z[head] @ W_O[head], no bias"),
    "ln1_post.hook_in": (RESID, "the output projection's output, before the norm that follows attention (sandwich-norm models)"),
    "hook_attn_out": (RESID, "attention output as added to the residual stream (after the output projection, and the post-attention norm where there is one)"),
    "hook_resid_mid": (RESID, "resid_pre + attn_out: the residual stream between attention and MLP"),
    "ln2.hook_normalized": (RESID, "second norm output (the MLP's input)"),
    "mlp.hook_pre": (MLP, "MLP pre-activation (the gate projection of a gated MLP)"),
    "mlp.hook_pre_linear": (MLP, "up projection of a gated MLP (multiplied by the activated gate)"),
    "mlp.hook_post": (MLP, "MLP post-activation (the down projection's input)"),
    "ln2_post.hook_in": (RESID, "the MLP's down projection output, before the norm that follows the MLP (sandwich-norm models)"),
    "hook_mlp_out": (RESID, "MLP output as added to the residual stream (after the post-MLP norm where there is one)"),
    "hook_resid_post": (RESID, "block output (residual stream)"),
    "hook_deepstack": (
        RESID,
        "vision features added to the residual stream after this block (Qwen3-VL DeepStack; zero off the image "
        "tokens): the next block's resid_pre is hook_resid_post + this",
    ),
}

#: Tower- and model-level hooks, keyed by their full name.
MODEL_HOOKS: dict[str, tuple[str, str]] = {
    "vision.hook_embed": (
        "[batch, pos, d_vision]",
        "patch + position embeddings, the vision blocks' input (CLS included where the model has one)",
    ),
    "vision.hook_patch_embed": ("[batch, pos, d_vision]", "patch embeddings alone, before position embeddings"),
    "vision.ln_pre.hook_normalized": ("[batch, pos, d_vision]", "norm applied to the embeddings before block 0 (CLIP)"),
    "vision.hook_out": (
        "[batch, d_vision] or [batch, pos, d_vision]",
        "the feature the vision tower hands on: the normed CLS token (CLIP, DINOv2), the attention-pooling head's "
        "output (SigLIP) or the patch features the projector reads (VLMs)",
    ),
    "vision.ln_final.hook_normalized": (
        "[batch, pos, d_vision]",
        "vision tower final norm over every position (SigLIP post_layernorm, DINOv2 layernorm)",
    ),
    "vision.head.hook_probe": ("[batch, 1, d_vision]", "the attention-pooling head's learned query, one per image (SigLIP)"),
    "vision.head.attn.hook_q": ("[batch, 1, head, d_head]", "pooling-head queries per head, from the probe"),
    "vision.head.attn.hook_k": ("[batch, pos, head, d_head]", "pooling-head keys per head, from the normed patches"),
    "vision.head.attn.hook_v": ("[batch, pos, head, d_head]", "pooling-head values per head, from the normed patches"),
    "vision.head.attn.hook_attn_scores": ("[batch, head, 1, pos]", "pooling-head scores: scaled, padding masked, before softmax"),
    "vision.head.attn.hook_pattern": ("[batch, head, 1, pos]", "pooling-head attention of the probe over the patches"),
    "vision.head.attn.hook_z": ("[batch, 1, head, d_head]", "pooling-head per-head output, before the output projection"),
    "vision.head.attn.hook_result": ("[batch, 1, head, d_vision]", "each pooling head's write: z[head] @ W_O[head], no bias"),
    "vision.head.hook_attn_out": ("[batch, 1, d_vision]", "pooling-head attention output: the head's residual before its MLP"),
    "vision.head.ln.hook_normalized": ("[batch, 1, d_vision]", "pooling-head norm output (its MLP's input)"),
    "vision.head.mlp.hook_pre": ("[batch, 1, d_mlp]", "pooling-head MLP pre-activation"),
    "vision.head.mlp.hook_post": ("[batch, 1, d_mlp]", "pooling-head MLP post-activation"),
    "vision.head.hook_mlp_out": ("[batch, 1, d_vision]", "pooling-head MLP output (added to hook_attn_out: vision.hook_out)"),
    "projector.hook_in": ("[batch, pos, d_vision]", "projector input: the vision features it maps into the LM"),
    "projector.ln.hook_normalized": (
        "[batch, pos, d_vision]",
        "projector norm output: before patches are merged (Qwen2-VL), after they are pooled (Gemma 3)",
    ),
    "projector.hook_pooled": (
        "[batch, pos / k², d_vision]",
        "the patch grid average-pooled k×k, one vector per LM image token (Gemma 3)",
    ),
    "projector.hook_merged": (
        "[batch, pos / 4, 4 · d_vision]",
        "each 2×2 window of patches concatenated into one vector (Qwen2-VL patch merger)",
    ),
    "projector.hook_pre": ("[batch, pos, d_hidden]", "projector MLP pre-activation (first linear layer's output)"),
    "projector.hook_post": ("[batch, pos, d_hidden]", "projector MLP post-activation (second linear layer's input)"),
    "projector.hook_out": ("[batch, pos, d_lm]", "projector output: one LM embedding per (merged) patch, before packing"),
    "projector.hook_packed": (
        "[batch, image_tokens, d_lm]",
        "the rows written into the LM sequence at the image tokens (after tiling, unpadding, newlines)",
    ),
    "lm.hook_embed": ("[batch, seq, d_lm]", "LM input embeddings, with the image features merged in at the image tokens"),
    "lm.ln_final.hook_normalized": ("[batch, seq, d_lm]", "LM final norm output (the unembedding's input)"),
    "text.hook_embed": ("[batch, seq, d_text]", "token + position embeddings of the text tower"),
    "text.ln_final.hook_normalized": ("[batch, seq, d_text]", "text tower final norm output"),
    "hook_image_embeds": ("[batch, d_embed]", "image embedding: the pooled vision feature through the visual projection"),
    "hook_text_embeds": ("[batch, d_embed]", "text embedding: the pooled text feature through the text projection"),
}

#: Indexed copies of a tower-level stage, keyed with ``{k}`` for the index (``projector.deepstack.{k}.hook_out``).
INDEXED_HOOKS: dict[str, tuple[str, str]] = {
    "projector.deepstack.{k}.hook_in": ("[batch, pos, d_vision]", "DeepStack merger k's input (a vision block output)"),
    "projector.deepstack.{k}.hook_merged": (
        "[batch, pos / 4, 4 · d_vision]",
        "DeepStack merger k: each 2×2 window of patches concatenated, before its norm",
    ),
    "projector.deepstack.{k}.ln.hook_normalized": ("[batch, pos / 4, 4 · d_vision]", "DeepStack merger k's norm"),
    "projector.deepstack.{k}.hook_pre": ("[batch, pos, d_hidden]", "DeepStack merger k's MLP pre-activation"),
    "projector.deepstack.{k}.hook_post": ("[batch, pos, d_hidden]", "DeepStack merger k's MLP post-activation"),
    "projector.deepstack.{k}.hook_out": (
        "[batch, pos, d_lm]",
        "DeepStack merger k's output: the rows added to the LM's residual stream at the image tokens after LM block k",
    ),
}

#: per-block suffixes whose value is ``[batch, pos, d_model]`` on the residual stream (where an SAE or a steering
#: vector of the tower's width fits), and those split into heads ``[batch, pos, head, d_head]``
RESIDUAL_WIDTH_SUFFIXES: tuple[str, ...] = tuple(k for k, (shape, _) in BLOCK_HOOKS.items() if shape == RESID)
HEAD_SUFFIXES: tuple[str, ...] = tuple(k for k, (shape, _) in BLOCK_HOOKS.items() if shape == HEADS)
MLP_SUFFIXES: tuple[str, ...] = tuple(k for k, (shape, _) in BLOCK_HOOKS.items() if shape == MLP)

_BLOCK = re.compile(r"^(?P<tower>\w+)\.blocks\.(?P<index>\d+)\.(?P<suffix>.+)$")


def block_parts(name: str) -> tuple[str, int, str] | None:
    """``(tower, block index, suffix)`` of a per-block name (``vision.blocks.3.attn.hook_z``), else ``None``."""
    match = _BLOCK.match(name)
    return (match["tower"], int(match["index"]), match["suffix"]) if match else None


def describe_hook(name: str) -> tuple[str, str]:
    """``(shape convention, meaning)`` of a hook name, or of a bare per-block key (``attn.hook_z``).

    Names nobody has described get a fallback, never an error.
    """
    block = block_parts(name)
    key = block[2] if block is not None else name
    if key in BLOCK_HOOKS:
        return BLOCK_HOOKS[key]
    if name in MODEL_HOOKS:
        return MODEL_HOOKS[name]
    indexed = re.sub(r"\.\d+\.", ".{k}.", name, count=1)
    if indexed in INDEXED_HOOKS:
        return INDEXED_HOOKS[indexed]
    # A tower-level stage built like a block part (``projector.mlp.hook_pre``) means what that part means.
    prefix, _, local = name.partition(".")
    if local in BLOCK_HOOKS:
        shape, meaning = BLOCK_HOOKS[local]
        return shape, f"{meaning} ({prefix})"
    stem, _, last = name.rpartition(".")
    if last == "hook_normalized":
        return RESID, f"output of the norm {stem!r}"
    if last == "hook_out":  # also the module-path escape hatch, ``<raw prefix>.<module path>.hook_out``
        return "as the module returns it", f"output of {stem!r}"
    if last == "hook_in":
        return "as the module receives it", f"first input of {stem!r}"
    return "?", "no description registered for this hook name (see the adapter that defines it)"


_TL_BLOCK = re.compile(r"^blocks\.\d+\.")
_TL_TOP = {"hook_embed", "hook_pos_embed", "hook_full_embed", "ln_final.hook_normalized", "ln_pre.hook_normalized"}


def canonical_hook_name(name: str, tower: str = "vision") -> str:
    """A TransformerLens-style hook name of a single-tower model (ViT-Prisma's ``blocks.9.hook_mlp_out``) as
    hooked_vlm's canonical name (``vision.blocks.9.hook_mlp_out``); canonical names are returned unchanged."""
    if name.startswith(("vision.", "text.", "lm.", "projector.", "hf.")) or name.startswith("hook_image_embeds"):
        return name
    if _TL_BLOCK.match(name) or name in _TL_TOP:
        return f"{tower}.{name}"
    raise ValueError(
        f"cannot map hook name {name!r} onto hooked_vlm's names: expected 'blocks.N.<hook>' (TransformerLens) or a "
        f"canonical name such as '{tower}.blocks.N.hook_resid_post'; pass hook_name= to name it yourself"
    )
