"""One file per model family; importing this package registers every adapter with the core.

Installed as ``hooked_vlm.adapters`` (see pyproject.toml), so nothing named ``adapters`` lands at top level.
"""

from hooked_vlm.adapters import (  # noqa: F401
    clip,
    dinov2,
    gemma3,
    llava,
    llava_onevision,
    open_clip,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
    siglip,
)
