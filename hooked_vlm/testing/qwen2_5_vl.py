"""A tiny random Qwen2.5-VL with an offline processor and tokenizer.

The real structure at small sizes: 14 px patches with a temporal patch of 2, 2×2 merges, RMSNorm/SwiGLU vision
blocks with fused qkv and 2-D rotary, **windowed attention** (56 px windows = 4×4 patches, the real 112 px are
8×8) in blocks 0 and 2 and full attention in block 1 (the real 3B/7B: full in 7, 15, 23, 31 of 32), the
RMSNorm patch merger, and a Qwen2 LM with GQA, M-RoPE and SwiGLU. The processor is Qwen2-VL's tiny one (same
image processor and chat template as the real Qwen2.5-VL), so images cover 2×2 to 4×4 merged tokens, i.e. 1 to 4
windows; a side of 3 merged tokens gives partial windows.
"""

from __future__ import annotations

from hooked_vlm.testing.clip import _init
from hooked_vlm.testing.qwen2_vl import (
    TINY_QWEN2_VL_MAX_PIXELS,
    TINY_QWEN2_VL_MIN_PIXELS,
    qwen2_vl_processor,
    tiny_qwen2_text_config,
)

TINY_WINDOW_SIZE = 56  # px: 2×2 merged tokens per window


def qwen2_5_vl_processor(min_pixels: int = TINY_QWEN2_VL_MIN_PIXELS, max_pixels: int = TINY_QWEN2_VL_MAX_PIXELS):
    """``Qwen2_5_VLProcessor`` for the tiny model: the parts of the tiny Qwen2-VL processor."""
    from transformers import Qwen2_5_VLProcessor

    return qwen2_vl_processor(min_pixels, max_pixels, processor_class=Qwen2_5_VLProcessor)


def tiny_qwen2_5_vl_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=tiny_qwen2_text_config(tokenizer),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=TINY_WINDOW_SIZE, fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` and its offline ``Qwen2_5_VLProcessor``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = qwen2_5_vl_processor()
    config = tiny_qwen2_5_vl_config(processor.tokenizer)
    config._attn_implementation = attn_implementation
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed), processor
