"""Hugging Face SigLIP and SigLIP2: ``SiglipModel`` / ``SiglipVisionModel``, ``Siglip2Model`` / ``Siglip2VisionModel``.

Module tree (transformers 5.x; the vision-only classes are flattened, so their paths have no ``vision_model.``
prefix) and where the canonical hooks sit::

    vision_model.embeddings            SigLIP: patch conv + learned positions, no CLS      → vision.hook_embed
                                       SigLIP2: Linear over patchified pixels + the position grid resized per
                                       image to its spatial_shapes, padded to max_num_patches
    vision_model.encoder.layers.{i}    layer_norm1, self_attn{q,k,v,out}_proj, layer_norm2, mlp{fc1, fc2}
                                       (CLIP's layer, module for module)                   → vision.blocks.{i}.*
    vision_model.post_layernorm        every position                                      → vision.ln_final.hook_normalized
    vision_model.head                  SiglipMultiheadAttentionPoolingHead:
        probe                          a learned query [1, 1, d], repeated per image       → vision.head.hook_probe
        attention                      nn.MultiheadAttention(probe, patches, patches)      → vision.head.attn.hook_q/k/v,
                                       (SigLIP2: padding as key_padding_mask)                hook_attn_scores, hook_pattern,
                                                                                             hook_z, hook_result
                                                                                           → vision.head.hook_attn_out
        layernorm, mlp{fc1, fc2}       x + mlp(layernorm(x))                               → vision.head.ln.hook_normalized,
                                                                                             vision.head.mlp.hook_pre/post,
                                                                                             vision.head.hook_mlp_out
        (output, probe position)       pooler_output [batch, d]                            → vision.hook_out, hook_image_embeds
    text_model.{embeddings, encoder.layers.{i}, final_layer_norm}                          → text.* (bidirectional, no causal mask)
    text_model.head                    Linear on the last position (padding="max_length")  → hook_text_embeds

The head's attention has no module boundary inside ``nn.MultiheadAttention``: while one of its q/k/v/scores/
pattern/z/result hooks is in use, the attention's ``forward`` is replaced on the instance, for that run, by the
exact recomputation of :mod:`hooked_vlm.multihead_attention`. Its hooks have one query position (the probe):
``[batch, 1, head, d_head]`` for q/z, ``[batch, head, 1, patches]`` for scores/pattern, ``[batch, patches, head,
d_head]`` for k/v. In the layout the probe is a sequence ``"head"`` of one position of kind CLS (the pooled
summary token), so ``"cls"`` selects it; k/v run over the vision sequence.

SigLIP2's NaFlex inputs (``pixel_values [batch, max_patches, 3·p·p]``, ``pixel_attention_mask``,
``spatial_shapes``) give every image its own patch grid: the layout holds each image's ``(rows, cols)``, its
patches row-major, and the padding positions after them as ``PAD`` (``"all"`` leaves them out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hooked_vlm.adapters.clip import CLIP_BLOCK, CLIPAdapter
from transformers import Siglip2Model, Siglip2VisionModel, SiglipModel, SiglipVisionModel

from hooked_vlm.adapter import TowerInfo, block_hooks, register_adapter
from hooked_vlm.layout import Kind, TowerLayout, grid_tower, padded_grids_tower
from hooked_vlm.multihead_attention import ATTENTION_HOOKS, hooked_multihead_attention
from hooked_vlm.taps import InputTap, InstanceOverride, OutputTap, Tap, submodule

#: SigLIP's encoder layer is CLIP's, module for module (LLaVA-OneVision's and Gemma 3's towers use it too)
SIGLIP_BLOCK = CLIP_BLOCK


@dataclass(frozen=True)
class PoolingAttentionTap(Tap):
    """q, k, v, scores, pattern, z or result (``kind``) of the ``nn.MultiheadAttention`` at ``module``.

    All requested kinds of one attention are installed together: its ``forward`` is replaced on the instance for
    the run by :func:`~hooked_vlm.multihead_attention.hooked_multihead_attention` (the class is untouched). The
    replacement returns no weights; SigLIP's pooling head reads only the output.
    """

    kind: str = "z"

    def group_key(self) -> object:
        return (PoolingAttentionTap, self.module)

    @classmethod
    def install_group(cls, root, hook_points, run):
        attn = submodule(root, hook_points[0].tap.module)
        hooks = {hp.tap.kind: hp for hp in hook_points}

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **_):
            return hooked_multihead_attention(attn, hooks, run, query, key, value, attn_mask, key_padding_mask), None

        return [InstanceOverride(attn, "forward", forward)]

    def describe(self) -> str:
        return f"{self.module}.forward → recomputed from in_proj_weight ({self.kind})"


def head_hooks(head: str) -> dict[str, Tap]:
    """The hooks of a SigLIP attention-pooling head at module path ``head``, in forward order."""
    attention = f"{head}.attention"
    hooks: dict[str, Tap] = {"vision.head.hook_probe": InputTap(attention)}
    for kind, leaf in ATTENTION_HOOKS.items():
        hooks[f"vision.head.attn.{leaf}"] = PoolingAttentionTap(attention, kind=kind)
    return hooks | {
        "vision.head.hook_attn_out": OutputTap(attention),
        "vision.head.ln.hook_normalized": OutputTap(f"{head}.layernorm"),
        "vision.head.mlp.hook_pre": OutputTap(f"{head}.mlp.fc1"),
        "vision.head.mlp.hook_post": InputTap(f"{head}.mlp.fc2"),
        "vision.head.hook_mlp_out": OutputTap(f"{head}.mlp"),
        "vision.hook_out": OutputTap(head),
    }


#: the head's hooks run over its one probe position, except its keys and values, which run over the patches
HEAD_TOWER_OF_PREFIX = {"vision.head": "head", "vision.head.attn.hook_k": "vision", "vision.head.attn.hook_v": "vision"}


def probe_tower(batch: int) -> TowerLayout:
    """The pooling head's query sequence: one position per image, of kind CLS."""
    kind = torch.full((batch, 1), int(Kind.CLS), dtype=torch.long)
    minus = torch.full_like(kind, -1)
    return TowerLayout(kind=kind, image=torch.arange(batch)[:, None], tile=minus, row=minus.clone(), col=minus.clone())


@register_adapter
class SiglipAdapter(CLIPAdapter):
    """``load(..., model_class="SiglipVisionModel")`` picks the class (default ``SiglipModel``)."""

    family = "siglip"
    model_class = SiglipModel
    model_classes = (SiglipModel, SiglipVisionModel)
    model_types = ("siglip", "siglip_vision_model")
    centre_crops_images = False  # SiglipImageProcessor resizes the whole image to the square input
    text_projection = "text_model.head"

    @property
    def _has_head(self) -> bool:
        return self._vision_config.vision_use_head

    def _vision_hooks(self, vision: TowerInfo) -> dict[str, Tap]:
        v = self._vision_root
        hooks: dict[str, Tap] = {"vision.hook_embed": OutputTap(f"{v}embeddings")}
        for i in range(vision.n_layers):
            hooks |= block_hooks(f"vision.blocks.{i}", f"{v}encoder.layers.{i}", SIGLIP_BLOCK, vision.d_head)
        hooks["vision.ln_final.hook_normalized"] = OutputTap(f"{v}post_layernorm")
        if not self._has_head:  # the normed patches are what the tower hands on
            return hooks | {"vision.hook_out": OutputTap(f"{v}post_layernorm")}
        hooks |= head_hooks(f"{v}head")
        if self._two_towers:  # SiglipModel's image embeddings are the head's output, normalised in the logits
            hooks["hook_image_embeds"] = OutputTap(f"{v}head")
        return hooks

    def hook_widths(self) -> dict[str, int | None]:
        widths = super().hook_widths()
        if not self._has_head:
            return widths
        # the head's nn.MultiheadAttention is recomputed by a family tap: per-head hooks span its embed_dim,
        # each head's result the residual width
        attention = submodule(self.model, f"{self._vision_root}head.attention")
        per_head = {f"vision.head.attn.{leaf}": attention.embed_dim for leaf in ("hook_q", "hook_k", "hook_v", "hook_z")}
        return widths | per_head | {"vision.head.attn.hook_result": attention.num_heads * attention.embed_dim}

    def tower_of_prefix(self) -> dict[str, str]:
        return dict(HEAD_TOWER_OF_PREFIX) if self._has_head else {}

    def _tokenize(self, texts: list[str]):
        # SigLIP was trained on captions padded to the full text length, and pools the last position (a model
        # without a text tower refuses the tokens in prepare)
        length = self.model.config.text_config.max_position_embeddings if self._two_towers else None
        tokenizer = self.require_processor("text", "tokenizer")
        return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    def _vision_layout(self, model_kwargs: dict[str, Any]) -> dict[str, TowerLayout]:
        vision = self._patch_layout(model_kwargs)
        return {"vision": vision, "head": probe_tower(vision.shape[0])} if self._has_head else {"vision": vision}

    def _patch_layout(self, model_kwargs: dict[str, Any]) -> TowerLayout:
        pixels = model_kwargs["pixel_values"]
        patch = self._vision_config.patch_size
        return grid_tower(pixels.shape[0], pixels.shape[-2] // patch, pixels.shape[-1] // patch, n_prefix=0)

    def describe(self) -> dict[str, Any]:
        config = self._vision_config
        grid = config.image_size // config.patch_size
        return {
            "image size": f"{config.image_size}×{config.image_size} px (resized, not cropped), patch {config.patch_size} px",
            "vision tokens": f"{grid}×{grid} = {grid * grid} patches, no CLS",
            **self._pooling_facts(),
        }

    def _pooling_facts(self) -> dict[str, str]:
        if not self._has_head:
            return {"pooling": "none (vision_use_head=False): vision.hook_out is post_layernorm over every patch"}
        facts = {
            "pooling": "attention-pooling head: a learned probe attends over post_layernorm(patches) "
            "(vision.head.attn.*), then x + MLP(LN(x)) → vision.hook_out [batch, d]",
        }
        if self._two_towers:
            text = self.model.text_model.head
            facts["projection"] = (
                f"image: none (the head's output is the image embedding, hook_image_embeds); text: text_model.head "
                f"Linear({text.in_features} → {text.out_features}) on the last position; logits = "
                "cos · exp(logit_scale) + logit_bias (sigmoid, not softmax)"
            )
        return facts


@register_adapter
class Siglip2Adapter(SiglipAdapter):
    """SigLIP2 (NaFlex: each image at its own aspect ratio, up to ``max_num_patches`` patches)."""

    family = "siglip2"
    model_class = Siglip2Model
    model_classes = (Siglip2Model, Siglip2VisionModel)
    model_types = ("siglip2", "siglip2_vision_model")
    image_keys = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

    def _pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise TypeError(
            "SigLIP2 takes patchified pixel_values with their pixel_attention_mask and spatial_shapes: pass images, "
            "or the image processor's output as a dict"
        )

    def _patch_layout(self, model_kwargs: dict[str, Any]) -> TowerLayout:
        missing = [key for key in self.image_keys if key not in model_kwargs]
        if missing:
            raise ValueError(f"SigLIP2 inputs lack {missing}: pass the image processor's whole output")
        pixels, mask = model_kwargs["pixel_values"], model_kwargs["pixel_attention_mask"].cpu().bool()
        grids = [tuple(shape) for shape in model_kwargs["spatial_shapes"].tolist()]
        vision = padded_grids_tower(grids, pixels.shape[1])
        if not torch.equal(vision.kind == Kind.PATCH, mask):
            raise ValueError(
                "pixel_attention_mask does not mark the first rows × cols positions of each image (spatial_shapes "
                f"{grids}) as its patches: the inputs do not come from one Siglip2 image processor call"
            )
        return vision

    def example_inputs(self) -> None:
        # NaFlex's embeddings read the values of spatial_shapes, which a model on the meta device cannot
        return None

    def describe(self) -> dict[str, Any]:
        config = self._vision_config
        side = int(config.num_patches**0.5)
        return {
            "image size": f"variable (NaFlex): each image resized, aspect ratio kept, to at most "
            f"{config.num_patches} patches of {config.patch_size} px",
            "vision tokens": f"rows × cols patches per image (spatial_shapes), padded to max_num_patches; no CLS; "
            f"the {side}×{side} position grid is resized to each image's grid",
            **self._pooling_facts(),
        }
