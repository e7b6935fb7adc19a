"""hooked_vlm: TransformerLens-style hook points for vision-language models.

>>> from hooked_vlm import HookedVLM
>>> model = HookedVLM.from_pretrained("openai/clip-vit-large-patch14")
>>> embeds, cache = model.run_with_cache(image, names_filter="vision.blocks.3.attn.hook_z")
"""

from hooked_vlm.cache import ActivationCache
from hooked_vlm.layout import InputLayout, Kind, TowerLayout
from hooked_vlm.model import Generation, HookedVLM, UnknownHookError
from hooked_vlm.taps import HookDtypeError, HookShapeError

__all__ = [
    "ActivationCache",
    "Generation",
    "HookDtypeError",
    "HookShapeError",
    "HookedVLM",
    "InputLayout",
    "Kind",
    "TowerLayout",
    "UnknownHookError",
]
__version__ = "0.1.0"
