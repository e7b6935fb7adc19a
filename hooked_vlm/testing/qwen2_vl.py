"""A tiny random Qwen2-VL with an offline processor and tokenizer.

Sizes are small but the structure is the real one: 14 px patches with a temporal patch of 2, 2×2 merge
windows, fused qkv and 2-D rotary in the vision tower, the patch merger, and a Qwen2 LM with GQA (4 query
heads, 2 kv-heads), M-RoPE and SwiGLU. The processor resizes images like the real one (sides multiples of
28 px) within small ``min_pixels``/``max_pixels`` bounds, so images cover 2×2 to 4×4 merged tokens
(at most 64 patches) and CPU tests stay fast.
"""

from __future__ import annotations

from hooked_vlm.testing.clip import _init
from hooked_vlm.testing.llava_onevision import qwen2_tokenizer

TINY_QWEN2_VL_MIN_PIXELS = 4 * 28 * 28  # 2×2 merged tokens (the real checkpoints' minimum, 56²)
TINY_QWEN2_VL_MAX_PIXELS = 16 * 28 * 28  # 4×4 merged tokens (real: 16384 · 28²)
SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]

# The checkpoints' turn structure (images of a turn first, each in vision_start/end), without the default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_vl_processor(
    min_pixels: int = TINY_QWEN2_VL_MIN_PIXELS,
    max_pixels: int = TINY_QWEN2_VL_MAX_PIXELS,
    processor_class=None,
    patch_size: int = 14,
    video_processor=None,
):
    """``Qwen2VLProcessor`` (or ``processor_class``, for the later Qwen-VL families that share its parts) for the
    tiny model: the real image processor, byte tokenizer, small chat template. Later families change the patch
    size (Qwen3-VL: 16 px) and the video processor."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return (processor_class or Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size),
        tokenizer=qwen2_tokenizer(SPECIAL_TOKENS),
        video_processor=video_processor or Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2_text_config(tokenizer) -> dict:
    """The tiny Qwen2 LM with M-RoPE that the Qwen-VL families share."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        # head_dim 8 → 4 rotary frequencies, split over (t, h, w) as the real [16, 24, 24] splits 64
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )


def tiny_qwen2_vl_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=tiny_qwen2_text_config(tokenizer),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Qwen2VLForConditionalGeneration`` and its offline ``Qwen2VLProcessor``."""
    from transformers import Qwen2VLForConditionalGeneration

    processor = qwen2_vl_processor()
    config = tiny_qwen2_vl_config(processor.tokenizer)
    config._attn_implementation = attn_implementation
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed), processor
