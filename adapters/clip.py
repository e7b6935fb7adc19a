"""Hugging Face CLIP: ``CLIPModel``, ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``.

Module tree (transformers 5.x; ``CLIPVisionModel`` is flattened, so its paths have no ``vision_model.`` prefix)::

    vision_model.embeddings            CLS + patch embedding + learned positions   → vision.hook_embed
    vision_model.pre_layrnorm          (sic)                                        → vision.ln_pre.hook_normalized
    vision_model.encoder.layers.{i}    layer_norm1, self_attn{q,k,v,out}_proj, layer_norm2, mlp{fc1, fc2}
    vision_model.post_layernorm        applied to the CLS token only                → vision.hook_out  [batch, d]
    visual_projection                  Linear(d_vision → d_proj, no bias)           → hook_image_embeds
    text_model.{embeddings, encoder.layers.{i}, final_layer_norm}, text_projection → text.*, hook_text_embeds

Attention scores and pattern come from the registered capture function (``hooked_vlm.attention``), so a
pattern request switches only that layer away from sdpa, for that run.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

from hooked_vlm.adapter import BlockPaths, HFAdapter, Prepared, TowerInfo, block_hooks, register_adapter
from hooked_vlm.inputs import (
    check_type,
    is_pixel_values,
    is_processor_output,
    load_images,
    model_keywords,
    pixel_tensor,
    to_model,
)
from hooked_vlm.layout import InputLayout, TowerLayout, grid_tower, text_tower
from hooked_vlm.taps import OutputTap, Tap

CLIP_BLOCK = BlockPaths(ln1="layer_norm1", attn="self_attn", ln2="layer_norm2", mlp="mlp")

_CLASSES = {cls.__name__: cls for cls in (CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection)}


@register_adapter
class CLIPAdapter(HFAdapter):
    """``load(..., model_class="CLIPVisionModel")`` picks the class (default ``CLIPModel``)."""

    family = "clip"
    model_class = CLIPModel
    model_classes = tuple(_CLASSES.values())
    model_types = ("clip", "clip_vision_model")
    centre_crops_images = True  # CLIPImageProcessor resizes the short side and centre-crops a square

    # ---- structure --------------------------------------------------------------------------------------------------
    #: the text tower's projection (its output is ``hook_text_embeds``)
    text_projection = "text_projection"
    #: the processor outputs the vision tower takes
    image_keys: tuple[str, ...] = ("pixel_values",)

    @property
    def _vision_root(self) -> str:
        # the vision-only classes of transformers 5.x are flattened: their modules sit on the model itself
        return "vision_model." if hasattr(self.model, "vision_model") else ""

    @property
    def _two_towers(self) -> bool:
        return hasattr(self.model, "text_model")

    @property
    def _vision_config(self):
        config = self.model.config
        return getattr(config, "vision_config", config)

    def towers(self) -> list[TowerInfo]:
        towers = []
        configs = [("vision", self._vision_config)]
        if self._two_towers:
            configs.append(("text", self.model.config.text_config))
        for name, config in configs:
            d_head = config.hidden_size // config.num_attention_heads
            towers.append(
                TowerInfo(
                    name=name,
                    n_layers=config.num_hidden_layers,
                    d_model=config.hidden_size,
                    n_heads=config.num_attention_heads,
                    d_head=d_head,
                    d_mlp=config.intermediate_size,
                )
            )
        return towers

    def hook_map(self) -> dict[str, Tap]:
        info = {t.name: t for t in self.towers()}
        hooks = self._vision_hooks(info["vision"])
        if "text" in info:
            hooks["text.hook_embed"] = OutputTap("text_model.embeddings")
            for i in range(info["text"].n_layers):
                hooks |= block_hooks(f"text.blocks.{i}", f"text_model.encoder.layers.{i}", CLIP_BLOCK, info["text"].d_head)
            hooks["text.ln_final.hook_normalized"] = OutputTap("text_model.final_layer_norm")
            hooks["hook_text_embeds"] = OutputTap(self.text_projection)
        return hooks

    def _vision_hooks(self, vision: TowerInfo) -> dict[str, Tap]:
        v = self._vision_root
        hooks: dict[str, Tap] = {
            "vision.hook_embed": OutputTap(f"{v}embeddings"),
            "vision.ln_pre.hook_normalized": OutputTap(f"{v}pre_layrnorm"),
        }
        for i in range(vision.n_layers):
            hooks |= block_hooks(f"vision.blocks.{i}", f"{v}encoder.layers.{i}", CLIP_BLOCK, vision.d_head)
        hooks["vision.hook_out"] = OutputTap(f"{v}post_layernorm")
        if hasattr(self.model, "visual_projection"):
            hooks["hook_image_embeds"] = OutputTap("visual_projection")
        return hooks

    def image_projection(self) -> torch.Tensor | None:
        projection = getattr(self.model, "visual_projection", None)
        return None if projection is None else projection.weight.T

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        if prompt is not None:
            raise TypeError(f"{self.family} takes no prompt; pass captions to compare against as text=[...]")
        check_type(inputs)
        if is_processor_output(inputs):
            model_kwargs = dict(inputs)
        else:
            model_kwargs = {}
            if is_pixel_values(inputs):
                model_kwargs |= self._pixel_inputs(inputs)
            elif inputs is not None:
                image_processor = self.require_processor("images", "image_processor")
                processed = image_processor(images=load_images(inputs), return_tensors="pt")
                model_kwargs |= {key: processed[key] for key in self.image_keys}
            if text is not None:
                texts = [text] if isinstance(text, str) else list(text)
                model_kwargs |= dict(self._tokenize(texts))
        model_kwargs |= model_keywords(self.model, kwargs)
        if "input_ids" in model_kwargs and not self._two_towers:
            raise TypeError(f"{type(self.model).__name__} has no text tower; text needs the two-tower model class")
        if "pixel_values" not in model_kwargs and "input_ids" not in model_kwargs:
            raise ValueError("nothing to run: pass images (or pixel_values) and/or text=[...]")
        return Prepared(to_model(model_kwargs, self.model), partial(self._layout, model_kwargs))

    def _pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model keywords of a ready ``pixel_values`` tensor."""
        return {"pixel_values": pixel_tensor(pixels)}

    def _tokenize(self, texts: list[str]) -> Mapping[str, torch.Tensor]:
        return self.require_processor("text", "tokenizer")(texts, padding=True, return_tensors="pt")

    def _layout(self, model_kwargs: dict[str, Any]) -> InputLayout:
        towers = {}
        if "pixel_values" in model_kwargs:
            towers |= self._vision_layout(model_kwargs)
        if "input_ids" in model_kwargs:
            attention_mask = model_kwargs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(model_kwargs["input_ids"])
            towers["text"] = text_tower(attention_mask)
        return InputLayout(towers, dict(self.tower_of_prefix()))

    def _vision_layout(self, model_kwargs: dict[str, Any]) -> dict[str, TowerLayout]:
        pixels = model_kwargs["pixel_values"]
        patch = self._vision_config.patch_size
        return {"vision": grid_tower(pixels.shape[0], pixels.shape[-2] // patch, pixels.shape[-1] // patch)}

    def forward(self, prepared: Prepared) -> Any:
        kwargs = prepared.kwargs
        model = self.model
        if self._two_towers:
            if "input_ids" in kwargs and "pixel_values" in kwargs:
                return model(**kwargs).logits_per_image
            if "pixel_values" in kwargs:
                return model.get_image_features(**kwargs).pooler_output
            return model.get_text_features(**kwargs).pooler_output
        if isinstance(model, CLIPVisionModelWithProjection):
            return model(**kwargs).image_embeds
        return model(**kwargs).pooler_output

    def tower_forward(self, tower: str, prepared: Prepared) -> Any:
        if tower != "vision":
            return super().tower_forward(tower, prepared)
        vision = getattr(self.model, "vision_model", self.model)
        return vision(**{key: prepared.kwargs[key] for key in self.image_keys})

    def block_list(self, tower: str) -> str:
        if tower == "vision":
            return f"{self._vision_root}encoder.layers"
        if tower == "text" and self._two_towers:
            return "text_model.encoder.layers"
        raise self.no_block_list(tower)

    def example_inputs(self) -> dict[str, Any]:
        size = self._vision_config.image_size
        inputs: dict[str, Any] = {"pixel_values": torch.zeros(1, 3, size, size)}
        if self._two_towers:
            # No attention_mask: with one, the causal-mask helper reads its values, which a meta model cannot.
            length = self.model.config.text_config.max_position_embeddings
            inputs["input_ids"] = torch.zeros(1, length, dtype=torch.long)
        return inputs

    def describe(self) -> dict[str, Any]:
        config = self._vision_config
        grid = config.image_size // config.patch_size
        facts = {
            "image size": f"{config.image_size}×{config.image_size} px, patch {config.patch_size} px",
            "vision tokens": f"1 CLS + {grid}×{grid} = {grid * grid} patches = {1 + grid * grid}",
            "pooling": "CLS token of the last block → post_layernorm (vision.hook_out)",
        }
        if hasattr(self.model, "visual_projection"):
            proj = self.model.visual_projection
            facts["projection"] = f"visual_projection: Linear({proj.in_features} → {proj.out_features}, no bias)"
        return facts
