"""Tiny random-weight models of every supported family, with offline processors and tokenizers.

They are built from the real architecture classes (only the sizes are small), so every module path, hook
boundary and forward quirk is the real one. Tests, examples, the CLI's default model and the demo use them;
nothing here downloads anything. Real checkpoint configs (``hooked_vlm/configs``) build full-size models on
the meta device for shape checks, or with random weights on a GPU; :func:`dispatch` spreads a built model over
several devices with accelerate.
"""

from hooked_vlm.testing.clip import clip_processor, clip_tokenizer, tiny_clip, tiny_open_clip
from hooked_vlm.testing.devices import alternating_device_map, dispatch
from hooked_vlm.testing.dinov2 import tiny_dinov2, tiny_dinov2_with_registers
from hooked_vlm.testing.gemma3 import tiny_gemma3
from hooked_vlm.testing.images import half_and_half_image, sample_image
from hooked_vlm.testing.inputs import real_size_inputs
from hooked_vlm.testing.llava import tiny_llava, tiny_llava_next
from hooked_vlm.testing.llava_onevision import tiny_llava_onevision
from hooked_vlm.testing.meta import build, config_names, load_config, meta_model
from hooked_vlm.testing.qwen2_5_vl import tiny_qwen2_5_vl
from hooked_vlm.testing.qwen2_vl import tiny_qwen2_vl
from hooked_vlm.testing.qwen3_vl import tiny_qwen3_vl, tiny_qwen3_vl_moe
from hooked_vlm.testing.siglip import tiny_siglip, tiny_siglip2

#: name → factory returning ``(model, processor)``; ``hooked-vlm inspect tiny:NAME`` and the examples use these.
TINY_MODELS = {
    "clip": tiny_clip,
    "open_clip": tiny_open_clip,
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
    "siglip": tiny_siglip,
    "siglip2": tiny_siglip2,
    "dinov2": tiny_dinov2,
    "dinov2_with_registers": tiny_dinov2_with_registers,
    "gemma3": tiny_gemma3,
}

__all__ = [
    "TINY_MODELS",
    "alternating_device_map",
    "build",
    "clip_processor",
    "clip_tokenizer",
    "config_names",
    "dispatch",
    "half_and_half_image",
    "load_config",
    "meta_model",
    "real_size_inputs",
    "sample_image",
    "tiny_clip",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_dinov2",
    "tiny_dinov2_with_registers",
    "tiny_gemma3",
    "tiny_llava_onevision",
    "tiny_open_clip",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_qwen3_vl_moe",
    "tiny_siglip",
    "tiny_siglip2",
]
