"""Hugging Face DINOv2: ``Dinov2Model`` and ``Dinov2WithRegistersModel`` (a vision tower alone, no text).

Module tree (transformers 5.x) and where the canonical hooks sit::

    embeddings                  patch conv + CLS (+ register tokens after it) + learned positions, interpolated
                                to the input's grid                               → vision.hook_embed [batch, 1 (+ r) + patches, d]
    encoder.layer.{i}           Dinov2Layer:
        norm1                                                                     → ln1.hook_normalized
        attention.{q,k,v}_proj, attention function, attention.o_proj             → attn.hook_q/k/v, scores, pattern, z,
                                                                                    hook_result (z · W_O per head)
        layer_scale1            x · λ₁ (a learned [d] vector)                     → hook_attn_out, hook_resid_mid
        norm2                                                                     → ln2.hook_normalized
        mlp.{fc1, fc2}          (giant: SwiGLU gate_proj, up_proj, down_proj)     → mlp.hook_pre (/ hook_pre_linear) / hook_post
        layer_scale2            x · λ₂                                            → hook_mlp_out
                                                                                  → hook_resid_post
    layernorm                   every position                                    → vision.ln_final.hook_normalized
                                its CLS row (pooler_output)                       → vision.hook_out [batch, d]

Layer scale sits between each branch and the residual addition, so ``hook_attn_out`` and ``hook_mlp_out`` are the
layer scales' outputs (what the block adds; ``hook_resid_mid = resid_pre + attn_out`` exactly). ``attn.hook_result``
is, as in every family, ``z[head] @ W_O[head]`` at the output projection, *before* λ₁ (the heads plus ``b_O`` sum to
``o_proj``'s output, ``hf.encoder.layer.{i}.attention.o_proj.hook_out``); :meth:`attn_layer_scale` gives λ₁ and the
decompositions fold it into each head's write, so they sum to the final residual.

Layout: position 0 is the CLS token (``"cls"``), the registers follow it (``"registers"``; Dinov2WithRegisters,
``num_register_tokens`` of them), then the patch grid row-major (``"patches"``).
"""

from __future__ import annotations

from typing import Any

from hooked_vlm.adapters.clip import CLIPAdapter
from torch import Tensor
from transformers import Dinov2Model, Dinov2WithRegistersModel

from hooked_vlm.adapter import BlockPaths, Prepared, TowerInfo, block_hooks, register_adapter
from hooked_vlm.layout import TowerLayout, grid_tower
from hooked_vlm.taps import OutputTap, SelectToken, Tap

DINOV2_BLOCK = BlockPaths(
    ln1="norm1", attn="attention", ln2="norm2", mlp="mlp", o="o_proj",
    attn_scale="layer_scale1", mlp_scale="layer_scale2",
)  # fmt: skip
#: the giant checkpoints' SwiGLU MLP (``use_swiglu_ffn``)
DINOV2_SWIGLU_BLOCK = BlockPaths(
    ln1="norm1", attn="attention", ln2="norm2", mlp="mlp", o="o_proj", mlp_in="gate_proj", mlp_up="up_proj",
    mlp_out="down_proj", attn_scale="layer_scale1", mlp_scale="layer_scale2",
)  # fmt: skip


@register_adapter
class Dinov2Adapter(CLIPAdapter):
    """A single vision tower: CLIP's image inputs and vision-only forward (``pooler_output``), DINOv2's modules."""

    family = "dinov2"
    model_class = Dinov2Model
    model_classes = (Dinov2Model,)
    model_types = ("dinov2",)
    centre_crops_images = True  # BitImageProcessor resizes the short side and centre-crops a square

    @property
    def _n_registers(self) -> int:
        return getattr(self.model.config, "num_register_tokens", 0)

    @property
    def _d_mlp(self) -> int:
        mlp = self.model.encoder.layer[0].mlp
        return (mlp.gate_proj if self.model.config.use_swiglu_ffn else mlp.fc1).out_features

    def towers(self) -> list[TowerInfo]:
        config = self.model.config
        n_heads = config.num_attention_heads
        return [
            TowerInfo(
                name="vision",
                n_layers=config.num_hidden_layers,
                d_model=config.hidden_size,
                n_heads=n_heads,
                d_head=config.hidden_size // n_heads,
                d_mlp=self._d_mlp,
            )  # fmt: skip
        ]

    def block_list(self, tower: str) -> str:
        if tower == "vision":
            return "encoder.layer"
        raise self.no_block_list(tower)

    def _vision_hooks(self, vision: TowerInfo) -> dict[str, Tap]:
        paths = DINOV2_SWIGLU_BLOCK if self.model.config.use_swiglu_ffn else DINOV2_BLOCK
        hooks: dict[str, Tap] = {"vision.hook_embed": OutputTap("embeddings")}
        for i in range(vision.n_layers):
            hooks |= block_hooks(f"vision.blocks.{i}", f"encoder.layer.{i}", paths, vision.d_head)
        return hooks | {
            "vision.ln_final.hook_normalized": OutputTap("layernorm"),
            "vision.hook_out": OutputTap("layernorm", view=SelectToken(0)),  # pooler_output: the normed CLS token
        }

    def attn_layer_scale(self, tower: str, layer: int) -> Tensor:
        return self.model.encoder.layer[layer].layer_scale1.lambda1

    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        if text is not None or prompt is not None:
            raise TypeError(f"{type(self.model).__name__} is a vision tower alone: it takes images, no text or prompt")
        return super().prepare(inputs, **kwargs)

    def _vision_layout(self, model_kwargs: dict[str, Any]) -> dict[str, TowerLayout]:
        pixels = model_kwargs["pixel_values"]
        patch = self.model.config.patch_size
        registers = self._n_registers
        grid = grid_tower(
            pixels.shape[0], pixels.shape[-2] // patch, pixels.shape[-1] // patch, n_prefix=1 + registers,
            n_registers=registers,
        )  # fmt: skip
        return {"vision": grid}

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        grid, at_224 = config.image_size // config.patch_size, 224 // config.patch_size
        registers = f" + {self._n_registers} registers" if self._n_registers else ""
        return {
            "image size": f"{config.image_size}×{config.image_size} px at pre-training (positions interpolated to any "
            f"input; the checkpoints' processor centre-crops 224 px), patch {config.patch_size} px",
            "vision tokens": f"1 CLS{registers} + a rows × cols patch grid ({grid}×{grid} = {grid * grid} at "
            f"{config.image_size} px, {at_224}×{at_224} at 224 px)",
            "layer scale": f"λ₁, λ₂ ([d] vectors, init {config.layerscale_value}) scale each branch before the "
            "residual addition: hook_attn_out / hook_mlp_out include them, attn.hook_result (z · W_O) does not",
            "pooling": "CLS row of the final layernorm (vision.hook_out = pooler_output); patch features are "
            "vision.ln_final.hook_normalized",
            "projection": "none (a self-supervised encoder: no text tower, no projection head)",
        }


@register_adapter
class Dinov2WithRegistersAdapter(Dinov2Adapter):
    """DINOv2 with register tokens: the registers sit between CLS and the patches."""

    family = "dinov2_with_registers"
    model_class = Dinov2WithRegistersModel
    model_classes = (Dinov2WithRegistersModel,)
    model_types = ("dinov2_with_registers",)
