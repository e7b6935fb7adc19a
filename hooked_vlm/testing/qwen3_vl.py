"""A tiny random Qwen3-VL with an offline processor and tokenizer.

The real structure at small sizes: 16 px patches with a temporal patch of 2, learned position embeddings
resampled to each image's grid (a 4×4 table; the real one is 48×48), LayerNorm/GELU vision blocks with fused
qkv and 2-D rotary, the LayerNorm patch merger, **DeepStack** (mergers on the outputs of vision blocks 0 and 1
whose features are added after LM blocks 0 and 1; the real 2B/4B: blocks 5, 11, 17), and a Qwen3 LM with QK
norm, GQA (4 query heads, 2 kv-heads), interleaved M-RoPE and SwiGLU. ``head_dim`` is 16 while
``hidden_size / heads`` is 8, as the real checkpoints' 128 is not 2560 / 32: a shape bug that assumed one for
the other would show. The processor is Qwen2-VL's tiny one with 16 px patches (32 px per LM token), so images
cover 2×2 to 4×4 merged tokens.
"""

from __future__ import annotations

from hooked_vlm.testing.clip import _init
from hooked_vlm.testing.qwen2_vl import qwen2_vl_processor, tiny_qwen2_text_config

TINY_QWEN3_VL_PATCH = 16
TINY_QWEN3_VL_MIN_PIXELS = 4 * 32 * 32  # 2×2 merged tokens
TINY_QWEN3_VL_MAX_PIXELS = 16 * 32 * 32  # 4×4 merged tokens
TINY_DEEPSTACK_INDEXES = [0, 1]


def qwen3_vl_processor(min_pixels: int = TINY_QWEN3_VL_MIN_PIXELS, max_pixels: int = TINY_QWEN3_VL_MAX_PIXELS):
    """``Qwen3VLProcessor`` for the tiny model: the parts of the tiny Qwen2-VL processor, with 16 px patches."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    return qwen2_vl_processor(
        min_pixels,
        max_pixels,
        processor_class=Qwen3VLProcessor,
        patch_size=TINY_QWEN3_VL_PATCH,
        video_processor=Qwen3VLVideoProcessor(patch_size=TINY_QWEN3_VL_PATCH),
    )


def tiny_qwen3_vl_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = tiny_qwen2_text_config(tokenizer) | dict(
        num_hidden_layers=3, head_dim=16,
        # 8 rotary frequencies interleaved t h w t h w t t, as the real [24, 20, 20] interleaves 64
        rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 10000.0},
    )  # fmt: skip
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
            patch_size=TINY_QWEN3_VL_PATCH, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
            deepstack_visual_indexes=TINY_DEEPSTACK_INDEXES,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Qwen3VLForConditionalGeneration`` and its offline ``Qwen3VLProcessor``."""
    from transformers import Qwen3VLForConditionalGeneration

    processor = qwen3_vl_processor()
    config = tiny_qwen3_vl_config(processor.tokenizer)
    config._attn_implementation = attn_implementation
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed), processor


def tiny_qwen3_vl_moe(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Qwen3VLMoeForConditionalGeneration`` (the 30B-A3B / 235B-A22B architecture): the tiny
    Qwen3-VL with sparse MoE blocks (4 experts, 2 per token) in LM blocks 0 and 2 and a dense MLP in block 1
    (``mlp_only_layers``), and the same processor."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    processor = qwen3_vl_processor()
    dense = tiny_qwen3_vl_config(processor.tokenizer).to_dict()
    sub_configs = {
        key: {k: v for k, v in dense.pop(key).items() if k != "model_type"} for key in ("text_config", "vision_config")
    }
    sub_configs["text_config"] |= dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1]
    )
    tokens = {k: dense[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLMoeConfig(**sub_configs, **tokens)
    config._attn_implementation = attn_implementation
    model = Qwen3VLMoeForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed), processor
