"""Tiny random DINOv2 models (with and without register tokens) with an offline ``BitImageProcessor``.

Every weight is drawn at random, the layer scales λ₁, λ₂ included (the checkpoints learn them; a layer scale of
ones would hide a hook placed before it instead of after it).
"""

from __future__ import annotations

from hooked_vlm.testing.clip import _init

TINY_DINOV2_CROP = 28
TINY_DINOV2_PATCH = 7  # → a 4 × 4 grid of patches
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_image_processor():
    """DINOv2's preprocessing at a tiny size: resize the short side (256 → 32), centre-crop (224 → 28), ImageNet norm."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": TINY_DINOV2_CROP, "width": TINY_DINOV2_CROP},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )  # fmt: skip


def tiny_dinov2(registers: int = 0, seed: int = 0, attn_implementation: str = "sdpa", swiglu: bool = False):
    """A tiny random ``Dinov2Model`` (``registers`` > 0: ``Dinov2WithRegistersModel``) and its processor."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    sizes = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=TINY_DINOV2_CROP,
        patch_size=TINY_DINOV2_PATCH, use_swiglu_ffn=swiglu,
    )  # fmt: skip
    if registers:
        config, build = Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes), Dinov2WithRegistersModel
    else:
        config, build = Dinov2Config(**sizes), Dinov2Model
    config._attn_implementation = attn_implementation
    return _init(build(config), seed), dinov2_image_processor()  # the checkpoints ship a bare image processor


def tiny_dinov2_with_registers(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Dinov2WithRegistersModel`` with 2 register tokens."""
    return tiny_dinov2(registers=2, seed=seed, attn_implementation=attn_implementation)
