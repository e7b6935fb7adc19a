"""Tiny random-weight models of every supported family, with offline processors and tokenizers.

They are built from the real architecture classes (only the sizes are small), so every module path, hook
boundary and forward quirk is the real one. Tests, examples, the CLI's default model and the demo use them;
nothing here downloads anything. Real checkpoint configs (``hooked_vlm/configs``) build full-size models on
the meta device for shape checks.
"""

from hooked_vlm.testing.clip import clip_processor, clip_tokenizer, tiny_clip, tiny_open_clip
from hooked_vlm.testing.images import half_and_half_image, sample_image
from hooked_vlm.testing.meta import build, config_names, load_config, meta_model

#: name → factory returning ``(model, processor)``; ``hooked-vlm inspect tiny:NAME`` and the examples use these.
TINY_MODELS = {
    "clip": tiny_clip,
    "open_clip": tiny_open_clip,
}

__all__ = [
    "TINY_MODELS",
    "build",
    "clip_processor",
    "clip_tokenizer",
    "config_names",
    "half_and_half_image",
    "load_config",
    "meta_model",
    "sample_image",
    "tiny_clip",
    "tiny_open_clip",
]
