"""One file per model family; importing this package registers every adapter with the core.

Installed as ``hooked_vlm.adapters`` (see pyproject.toml), so nothing named ``adapters`` lands at top level.
"""

from hooked_vlm.adapters import clip, gemma3, llava_onevision, open_clip, qwen2_5_vl, qwen2_vl  # noqa: F401
