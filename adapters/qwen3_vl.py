"""Qwen3-VL (``Qwen3VLForConditionalGeneration``: Qwen/Qwen3-VL-2B-Instruct, -4B-Instruct, -8B-Instruct, -32B).

A Qwen2-VL (:mod:`hooked_vlm.adapters.qwen2_vl`, whose adapter this one extends: packing, per-image attention
replay, layout, inputs) with these changes. Module tree (transformers 5.x) and where the canonical hooks sit::

    model.visual.patch_embed              Conv3d over 2 frames × 16 × 16 px patches     → vision.hook_patch_embed
    (patch_embed + pos_embed)             learned positions resampled to the grid;
                                          no module: block 0's input                   → vision.hook_embed
    model.visual.blocks.{i}               norm1 (LayerNorm), attn{qkv (fused), proj}, norm2,
                                          mlp{linear_fc1, act_fn, linear_fc2}; 2-D rotary → vision.blocks.{i}.*
    model.visual.blocks.{-1}              block output                                  → vision.hook_out
    model.visual.merger                   norm → 2×2 merge (view) → linear_fc1 → GELU → linear_fc2 → projector.*
    model.visual.deepstack_merger_list.{k}  2×2 merge → norm(4·d) → linear_fc1 → GELU → linear_fc2,
                                          on vision block deepstack_visual_indexes[k]'s output
                                                                                       → projector.deepstack.{k}.*
    model.language_model.layers.{i}       Qwen3 decoder layer: q_proj → q_norm, k_proj → k_norm (RMSNorm per
                                          head), interleaved M-RoPE, GQA, SwiGLU          → lm.blocks.{i}.*
    (after layer k < len(deepstack))      h[image tokens] += deepstack feature k          → lm.blocks.{k}.hook_deepstack
    model.language_model.norm             final RMSNorm                                 → lm.ln_final.hook_normalized

**DeepStack.** Vision features from several vision blocks (2B/4B: 5, 11, 17; 8B: 8, 16, 24) go through their
own patch mergers (``projector.deepstack.{k}.*``, ``[1, M, ·]`` like ``projector.*``) and are *added* to the
LM's residual stream at the image tokens, after LM block ``k``'s output. ``lm.blocks.{k}.hook_deepstack`` is
that addition as a ``[batch, seq, d_lm]`` tensor: the deepstack rows at the image tokens (in the order the
image tokens appear, as for ``lm.hook_embed``), zero elsewhere. So for those blocks
``lm.blocks.{k+1}.hook_resid_pre = lm.blocks.{k}.hook_resid_post + lm.blocks.{k}.hook_deepstack`` (the last
deepstack block's sum goes to the next block, or to the final norm); ``hook_resid_post`` stays the block's
output, which is what HF's ``output_hidden_states`` records. The addition has no module boundary: the hook
replaces the language model's ``_deepstack_process`` on the instance for the run (:class:`DeepstackTap`), adds
``hidden + addition`` (bit-identical to HF's in-place add when nothing is edited), and honours an edit anywhere
in it, text positions included.

**QK norm.** ``attn.hook_q`` / ``hook_k`` are the projections (``q_proj`` / ``k_proj``, split into heads);
``attn.q_norm.hook_normalized`` / ``attn.k_norm.hook_normalized`` the per-head RMSNorm's output, before RoPE;
``attn.hook_rot_q`` / ``hook_rot_k`` after RoPE. The LM's ``head_dim`` (128) is its own config field, not
``hidden_size / heads``.

**Interleaved M-RoPE.** The LM's rotary frequencies are assigned to (t, h, w) round-robin
(``mrope_section`` [24, 20, 20] of 64: t h w t h w …, the tail t), not in three contiguous blocks as in
Qwen2-VL; positions come from ``get_rope_index`` as before. Nothing to hook beyond ``hook_rot_q/k``.

Vision attention runs per image (``cu_seqlens``) unless it is flash attention, so ``hook_pattern`` is the
block-diagonal ``[1, head, N, N]`` replayed by Qwen2-VL's :class:`~hooked_vlm.adapters.qwen2_vl.PackedAttentionTap`.
The packed order is the processor's 2×2 merge-unit order, as in Qwen2-VL (no window reordering).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hooked_vlm.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from hooked_vlm.adapters.qwen2_vl import LM, LM_BLOCK, VISION, Packed, Qwen2VLAdapter, Qwen2VLLayout, _vision_block
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from hooked_vlm.adapter import BlockPaths, TowerInfo, block_hooks, register_adapter
from hooked_vlm.taps import InputTap, InstanceOverride, OutputTap, Tap, submodule

VISION_BLOCK = BlockPaths(
    ln1="norm1",
    attn="attn",
    ln2="norm2",
    mlp="mlp",
    q="qkv",
    k="qkv",
    v="qkv",
    o="proj",
    mlp_in="linear_fc1",
    mlp_out="linear_fc2",
)


@dataclass(frozen=True)
class DeepstackTap(Tap):
    """``lm.blocks.{layer}.hook_deepstack``: what the language model at ``module`` adds to the residual stream after
    decoder layer ``layer``, as ``[batch, seq, d]`` (the deepstack rows at the image tokens, zero elsewhere)."""

    layer: int = 0

    def group_key(self) -> object:
        return (DeepstackTap, self.module)

    @classmethod
    def install_group(cls, root, hook_points, run):
        lm = submodule(root, hook_points[0].tap.module)
        by_layer = {hp.tap.layer: hp for hp in hook_points}
        original = lm._deepstack_process
        embeds: list = []

        def remember(module, args, kwargs):
            embeds[:] = kwargs.get("deepstack_visual_embeds") or []

        def add(hidden_states, visual_pos_masks, visual_embeds):
            # the model passes deepstack_visual_embeds[layer] itself: its identity names the layer
            layer = next((k for k, e in enumerate(embeds) if e is visual_embeds), None)
            if layer is None:
                raise RuntimeError(
                    f"{hook_points[0].tap.module}._deepstack_process got features that are not among the "
                    "deepstack_visual_embeds the language model was called with; hook_deepstack cannot name the layer"
                )
            if layer not in by_layer:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            addition = hidden_states.new_zeros(hidden_states.shape)
            addition[visual_pos_masks.to(hidden_states.device)] = visual_embeds.to(
                hidden_states.device, hidden_states.dtype
            )
            return hidden_states + run.fire(by_layer[layer], addition)

        return [
            lm.register_forward_pre_hook(remember, with_kwargs=True),
            InstanceOverride(lm, "_deepstack_process", add),
        ]

    def describe(self) -> str:
        return f"{self.module} → deepstack addition after layer {self.layer}"


def _merger_hooks(prefix: str, merger: str, postshuffle_norm: bool) -> dict[str, Tap]:
    """A patch merger's stages. The main merger norms each patch, then merges 2×2 patches (a view, no module: the
    merged tensor is ``linear_fc1``'s input); the deepstack mergers merge first and norm the merged vector."""
    packed = Packed()
    hooks: dict[str, Tap] = {f"{prefix}.hook_in": InputTap(merger, view=packed)}
    if postshuffle_norm:
        hooks[f"{prefix}.hook_merged"] = InputTap(f"{merger}.norm", view=packed)
        hooks[f"{prefix}.ln.hook_normalized"] = OutputTap(f"{merger}.norm", view=packed)
    else:
        hooks[f"{prefix}.ln.hook_normalized"] = OutputTap(f"{merger}.norm", view=packed)
        hooks[f"{prefix}.hook_merged"] = InputTap(f"{merger}.linear_fc1", view=packed)
    return hooks | {
        f"{prefix}.hook_pre": OutputTap(f"{merger}.linear_fc1", view=packed),
        f"{prefix}.hook_post": InputTap(f"{merger}.linear_fc2", view=packed),
        f"{prefix}.hook_out": OutputTap(merger, view=packed),
    }


def _lm_block(i: int, d_head: int) -> dict[str, Tap]:
    """The canonical LM block set, with the QK-norm outputs after the projections they norm."""
    hooks = block_hooks(f"lm.blocks.{i}", f"{LM}.layers.{i}", LM_BLOCK, d_head, rotary=True)
    attn = f"{LM}.layers.{i}.self_attn"
    ordered: dict[str, Tap] = {}
    for name, tap in hooks.items():
        ordered[name] = tap
        if name.endswith(("attn.hook_q", "attn.hook_k")):
            norm = f"{name[-1]}_norm"  # its input is already [batch, pos, head, d_head]
            ordered[f"lm.blocks.{i}.attn.{norm}.hook_normalized"] = OutputTap(f"{attn}.{norm}")
    return ordered


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    # the MoE checkpoints (30B-A3B, 235B-A22B) share every module path outside the LM's MLP; see hook_map
    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    vision_block_paths = VISION_BLOCK
    # the LM takes the deepstack features from get_image_features too, not only its pooler_output: patching must
    # not answer that method with the pooled features alone
    image_features_method = None

    def towers(self) -> list[TowerInfo]:
        # the vision config has Qwen2.5-VL's fields; the LM's head_dim is its own config field, not hidden / heads
        vision, lm = Qwen2_5_VLAdapter.towers(self)
        text = self.model.config.text_config
        return [vision, replace(lm, d_head=text.head_dim, d_mlp=None if self._moe else lm.d_mlp)]

    @property
    def _moe(self) -> bool:
        return isinstance(self.model, Qwen3VLMoeForConditionalGeneration)

    @property
    def deepstack_visual_indexes(self) -> list[int]:
        """The vision blocks whose outputs feed ``projector.deepstack.{k}``, in ``k`` order."""
        return list(self.model.config.vision_config.deepstack_visual_indexes)

    def hook_widths(self) -> dict[str, int | None]:
        # a DeepStack merger's first child is a norm over 4 · d_vision (after the 2×2 merge); its input is per patch
        d_vision = self.towers()[0].d_model
        inputs = {f"projector.deepstack.{k}.hook_in": d_vision for k in range(len(self.deepstack_visual_indexes))}
        return super().hook_widths() | inputs

    def hook_map(self) -> dict[str, Tap]:
        vision, lm = self.towers()
        packed = Packed()
        hooks: dict[str, Tap] = {
            "vision.hook_patch_embed": OutputTap(f"{VISION}.patch_embed", view=packed),
            # patch_embed(x) + the resampled position embeddings: a sum with no module, block 0's input
            "vision.hook_embed": InputTap(f"{VISION}.blocks.0", view=packed),
        }
        deepstack = {layer: k for k, layer in enumerate(self.deepstack_visual_indexes)}
        for i in range(vision.n_layers):
            hooks |= _vision_block(i, vision.d_head, self.vision_block_paths)
            if i in deepstack:
                k = deepstack[i]
                hooks |= _merger_hooks(f"projector.deepstack.{k}", f"{VISION}.deepstack_merger_list.{k}", True)
        hooks["vision.hook_out"] = OutputTap(f"{VISION}.blocks.{vision.n_layers - 1}", view=packed)
        hooks |= _merger_hooks("projector", f"{VISION}.merger", False)
        # the language model is called with keyword arguments only; its first layer's input is inputs_embeds
        hooks["lm.hook_embed"] = InputTap(f"{LM}.layers.0")
        for i in range(lm.n_layers):
            block = _lm_block(i, lm.d_head)
            if not hasattr(submodule(self.model, f"{LM}.layers.{i}.mlp"), "gate_proj"):
                # a sparse MoE block (router + fused experts, Qwen3-VL-MoE) has no single gate/up/down projection
                block = {n: t for n, t in block.items() if ".mlp.hook_" not in n}
            hooks |= block
            if i < len(deepstack):
                hooks[f"lm.blocks.{i}.hook_deepstack"] = DeepstackTap(LM, layer=i)
        hooks["lm.ln_final.hook_normalized"] = OutputTap(f"{LM}.norm")
        return hooks

    def _layout(self, model_kwargs: dict[str, Any]) -> Qwen2VLLayout:
        layout = super()._layout(model_kwargs)
        # each deepstack merger's input is per patch, its later stages per 2×2 window
        layout.tower_of_prefix |= {
            f"projector.deepstack.{k}.hook_in": "vision" for k in range(len(self.deepstack_visual_indexes))
        }
        return layout

    def describe(self) -> dict[str, Any]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        side = int(vision.num_position_embeddings**0.5)
        facts = {
            "patches": f"{patch}×{patch} px × {vision.temporal_patch_size} frames (an image fills both frames)",
            "merge": f"{merge}×{merge} patches → 1 LM token ({patch * merge}×{patch * merge} px per token)",
            "vision tokens": "all images' patches packed into one sequence; attention block-diagonal per image",
            "vision blocks": "LayerNorm, fused qkv with 2-D rotary, GELU MLP (linear_fc1, linear_fc2)",
            "projection": (
                f"merger: LayerNorm → {merge}×{merge} merge ({vision.hidden_size}·{merge * merge}) → Linear → GELU → "
                f"Linear(→ {vision.out_hidden_size})"
            ),
            "deepstack": (
                f"vision blocks {self.deepstack_visual_indexes} → their own mergers → added at the image tokens "
                f"after LM blocks {list(range(len(self.deepstack_visual_indexes)))}"
            ),
            "positions": (
                f"vision: learned {side}×{side} table resampled to the grid + 2-D rotary (row, col); LM: interleaved "
                f"M-RoPE (t, h, w), sections {text.rope_parameters.get('mrope_section')}"
            ),
            "lm attention": f"QK norm (RMSNorm per head), head_dim {text.head_dim}, GQA {text.num_attention_heads}/"
            f"{text.num_key_value_heads}",
        }
        if self.processor is not None:
            size = self.processor.image_processor.size
            facts["resolution"] = (
                f"dynamic: sides rounded to multiples of {patch * merge} px, "
                f"{size['shortest_edge']} ≤ H·W ≤ {size['longest_edge']} px (min_pixels / max_pixels)"
            )
        return facts
