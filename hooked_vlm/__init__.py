"""hooked_vlm: TransformerLens-style hook points for vision-language models.

>>> from hooked_vlm import HookedVLM
>>> model = HookedVLM.from_pretrained("tiny:clip", device="cpu")  # or a hub id: "openai/clip-vit-large-patch14"
>>> embeds, cache = model.run_with_cache(image, names_filter="vision.blocks.1.attn.hook_z")

The public names are imported on first use (PEP 562), so ``hooked_vlm.cli`` (``hooked-vlm --help``) and
``hooked_vlm.loading`` import without torch or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hooked_vlm.cache import ActivationCache
    from hooked_vlm.layout import InputLayout, Kind, TowerLayout
    from hooked_vlm.model import Generation, HookedVLM, UnknownHookError
    from hooked_vlm.taps import HookShapeError

_EXPORTS = {
    "ActivationCache": "hooked_vlm.cache",
    "Generation": "hooked_vlm.model",
    "HookShapeError": "hooked_vlm.taps",
    "HookedVLM": "hooked_vlm.model",
    "InputLayout": "hooked_vlm.layout",
    "Kind": "hooked_vlm.layout",
    "TowerLayout": "hooked_vlm.layout",
    "UnknownHookError": "hooked_vlm.model",
}

__all__ = [
    "ActivationCache",
    "Generation",
    "HookShapeError",
    "HookedVLM",
    "InputLayout",
    "Kind",
    "TowerLayout",
    "UnknownHookError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
