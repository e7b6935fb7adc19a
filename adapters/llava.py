"""LLaVA-1.5 and LLaVA-NeXT: transformers ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``
(CLIP ViT-L/14-336 + 2-layer MLP projector + Llama / Mistral / ...).

Both are the LLaVA-OneVision layout with a CLIP tower, so the adapters subclass
:class:`~hooked_vlm.adapters.llava_onevision.LlavaOnevisionAdapter`. Module tree (transformers 5.x) and hooks::

    model.vision_tower.embeddings              CLS + patch conv + learned positions      → vision.hook_embed [tiles, 1 + 576, d]
    model.vision_tower.pre_layrnorm            (sic)                                     → vision.ln_pre.hook_normalized
    model.vision_tower.encoder.layers.{i}      layer_norm1, self_attn{q,k,v,out}_proj, layer_norm2, mlp{fc1, fc2}
                                               → vision.blocks.{i}.*  (one batch row per image / tile)
    hidden_states[vision_feature_layer]        the output of block vision_feature_layer - 1 (-2: the second-to-last
                                               block), without the CLS token under strategy "default"
                                                                                         → vision.hook_out [tiles, 576, d]
    model.vision_tower.encoder.layers.{-1}     computed, but nothing of it reaches the LM when the feature layer is
                                               -2 (as in every released checkpoint); neither does post_layernorm
    model.multi_modal_projector                linear_1 → act (GELU) → linear_2          → projector.hook_in / hook_pre /
                                                                                           hook_post / hook_out [tiles, 576, d_lm]
    model.pack_image_features  (NeXT only)     per image: the base tile (whole image, resized), then the unpadded
                                               grid of the anyres tiles with image_newline after every row
                                                                                         → projector.hook_packed [1, image tokens, d_lm]
    model.language_model  (inputs_embeds)      token embeddings with the image features scattered in → lm.hook_embed
    model.language_model.layers.{i}            input_layernorm, self_attn{q,k,v,o}_proj (GQA, RoPE), post_attention_layernorm,
                                               mlp{gate,up,down}_proj (SwiGLU): Qwen2's names   → lm.blocks.{i}.*
    model.language_model.norm, lm_head         → lm.ln_final.hook_normalized, the logits this adapter returns

``vision.hook_out`` and ``projector.hook_in`` carry exactly what the projector reads: the selected layer (the
layers concatenated on channels when ``vision_feature_layer`` is a list), the CLS token dropped under
``vision_feature_select_strategy="default"`` and kept under ``"full"``. With one feature layer ``vision.hook_out``
sits at that block's output, so a request for it stops the run there: the later blocks are not needed. Their
layout is the ``"features"`` tower ``[tiles, tokens]``; the vision blocks' is ``"vision"`` ``[tiles, 1 + patches]``
(CLS first). LLaVA-NeXT's LM layout comes, as LLaVA-OneVision's, from the model's own ``pack_image_features`` run
on feature indices; LLaVA-1.5 puts each image's features into its image tokens in order.
"""

from __future__ import annotations

from typing import Any

import torch
from hooked_vlm.adapters.clip import CLIP_BLOCK
from hooked_vlm.adapters.llava_onevision import (
    VISION,
    ImagePacking,
    LlavaOnevisionAdapter,
    _index_grid,
    _packed_tower,
    _vision_tower,
)
from jaxtyping import Bool
from torch import Tensor
from transformers import CLIPVisionModel, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from hooked_vlm.adapter import register_adapter
from hooked_vlm.layout import Kind, TowerLayout
from hooked_vlm.taps import OutputTap, Tap, TokensFrom


class _ClipLlavaAdapter(LlavaOnevisionAdapter):
    """What LLaVA-1.5 and LLaVA-NeXT share: the CLIP tower, its CLS token and the feature selection."""

    vision_block = CLIP_BLOCK

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        tower = model.model.vision_tower
        if not isinstance(tower, CLIPVisionModel):
            raise NotImplementedError(
                f"the {self.family} adapter hooks CLIP vision towers (as in the released checkpoints), not "
                f"{type(tower).__name__}"
            )

    @property
    def cls_kept(self) -> int:
        """1 if the CLS token reaches the projector (``vision_feature_select_strategy="full"``), else 0."""
        return int(self.config.vision_feature_select_strategy == "full")

    def tower_of_prefix(self) -> dict[str, str]:
        return {"vision.hook_out": "features", "projector": "features"}

    def _embedding_hooks(self) -> dict[str, Tap]:
        return super()._embedding_hooks() | {"vision.ln_pre.hook_normalized": OutputTap(f"{VISION}.pre_layrnorm")}

    def _feature_tap(self, n_layers: int) -> Tap:
        tap = super()._feature_tap(n_layers)
        if isinstance(tap, OutputTap) and not self.cls_kept:  # one layer: its output, as the projector reads it
            return OutputTap(tap.module, view=TokensFrom(1))
        return tap

    def _image_towers(
        self, images: list[ImagePacking], lm: TowerLayout, image_tokens: Bool[Tensor, "batch seq"]
    ) -> dict[str, TowerLayout]:
        return {"vision": _vision_tower(images, n_prefix=1), "features": _vision_tower(images, n_prefix=self.cls_kept)}

    def _feature_facts(self) -> dict[str, str]:
        config = self.config
        vision = self.towers()[0]
        layers = config.vision_feature_layer
        layer_list = layers if isinstance(layers, list) else [layers]
        unused = vision.n_layers - max(i % (vision.n_layers + 1) for i in layer_list)
        side = config.vision_config.image_size // config.vision_config.patch_size
        proj = self.model.model.multi_modal_projector
        return {
            "vision tower": f"CLIP, {vision.n_layers} blocks, d={vision.d_model}, {vision.n_heads} heads × {vision.d_head}, "
            f"{config.vision_config.image_size} px / patch {config.vision_config.patch_size} → 1 CLS + {side}×{side}",
            "feature layer": f"hidden_states[{layers}] (concatenated if several) → vision.hook_out; "
            + (f"the last {unused} block(s) and post_layernorm do not" if unused else "post_layernorm does not")
            + " reach the LM",
            "feature strategy": f"{config.vision_feature_select_strategy!r}: "
            + ("CLS kept" if self.cls_kept else "CLS dropped")
            + f" → {self.cls_kept + side * side} features per tile",
            "projector": f"Linear({proj.linear_1.in_features} → {proj.linear_1.out_features}) → "
            f"{config.projector_hidden_act} → Linear({proj.linear_2.in_features} → {proj.linear_2.out_features})",
        }

    def _lm_facts(self) -> dict[str, str]:
        lm = self.towers()[1]
        return {
            "language model": f"{self.config.text_config.model_type}, {lm.n_layers} blocks, d={lm.d_model}, "
            f"{lm.n_heads} heads / {lm.n_kv_heads} kv-heads × {lm.d_head}, SwiGLU {lm.d_mlp}, RoPE"
        }


@register_adapter
class LlavaAdapter(_ClipLlavaAdapter):
    """LLaVA-1.5: one CLIP pass per image (the processor's centre crop), its features in the image tokens in order."""

    family = "llava"
    model_class = LlavaForConditionalGeneration
    centre_crops_images = True  # the released processors resize the short side and centre-crop a square

    def hook_map(self) -> dict[str, Tap]:
        hooks = super().hook_map()
        del hooks["projector.hook_packed"]  # nothing is packed: projector.hook_out is what the LM takes
        return hooks

    def image_packing(self, n_images: int) -> list[ImagePacking]:
        """How each of ``n_images`` images fills its LM tokens: the CLS feature first where it is kept, then the
        patch grid row by row (``source`` indexes ``projector.hook_out`` ``[images, tokens]`` flattened)."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        cls = self.cls_kept
        per_image = cls + side * side
        kind = torch.full((per_image,), int(Kind.IMAGE))
        kind[:cls] = int(Kind.CLS)
        row, col = (torch.cat([torch.full((cls,), -1), x]) for x in _index_grid(side * side, side))
        return [
            ImagePacking(
                image=i, first_tile=i, n_tiles=1, tile_grid=None, patch_grid=(side, side), unpadded_grid=None,
                grid=None, kind=kind.clone(), tile=torch.zeros(per_image, dtype=torch.long), row=row.clone(),
                col=col.clone(), source=torch.arange(i * per_image, (i + 1) * per_image),
            )
            for i in range(n_images)
        ]  # fmt: skip

    def _image_packings(self, model_kwargs: dict[str, Any]) -> list[ImagePacking]:
        return self.image_packing(model_kwargs["pixel_values"].shape[0])

    def describe(self) -> dict[str, Any]:
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return (
            self._feature_facts()
            | {"image tokens": f"{self.cls_kept + side * side} per image, the projected features in order (no tiling)"}
            | self._lm_facts()
        )


@register_adapter
class LlavaNextAdapter(_ClipLlavaAdapter):
    """LLaVA-NeXT: anyres tiling (a base tile and a grid of tiles chosen from ``image_grid_pinpoints``), the grid
    unpadded and ended row by row with ``image_newline``; every image of a prompt is tiled."""

    family = "llava_next"
    model_class = LlavaNextForConditionalGeneration

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        if self.cls_kept:
            raise NotImplementedError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' hands CLIP's CLS token on to the anyres "
                "packing, whose tile grid has no place for it (the model's pack_image_features fails); the released "
                "checkpoints use 'default'"
            )

    def tower_of_prefix(self) -> dict[str, str]:
        return super().tower_of_prefix() | {"projector.hook_packed": "packed"}

    def _pack(self, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
        packed, _ = self.model.model.pack_image_features(
            features, image_sizes, self.config.vision_feature_select_strategy, image_newline=newline
        )
        return packed

    def _image_packings(self, model_kwargs: dict[str, Any]) -> list[ImagePacking]:
        return self.image_packing(model_kwargs["image_sizes"].cpu())

    def _image_towers(
        self, images: list[ImagePacking], lm: TowerLayout, image_tokens: Bool[Tensor, "batch seq"]
    ) -> dict[str, TowerLayout]:
        return super()._image_towers(images, lm, image_tokens) | {"packed": _packed_tower(lm, image_tokens)}

    def describe(self) -> dict[str, Any]:
        config = self.config
        tile_px = config.vision_config.image_size
        side = tile_px // config.vision_config.patch_size
        pinpoints = config.image_grid_pinpoints
        return (
            self._feature_facts()
            | {
                "anyres": f"1 base tile (whole image, resized to {tile_px}×{tile_px}) + a grid of up to "
                f"{max(h * w for h, w in pinpoints) // tile_px**2} tiles chosen from {len(pinpoints)} pinpoints {pinpoints}",
                "image tokens": f"{side * side} base + rows × (cols + 1 newline) of the unpadded grid, per image",
            }
            | self._lm_facts()
        )
