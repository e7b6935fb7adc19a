"""Tiny random LLaVA-1.5 and LLaVA-NeXT (CLIP + 2-layer MLP projector + Llama / Mistral) with offline processors.

The structure of the released checkpoints at small sizes: a CLIP vision tower with a CLS token and a 4×4 patch
grid per 16 px image (real: 24×24 per 336 px), three blocks read at ``vision_feature_layer=-2`` (so the last
block, as at real size, computes values the language model never sees), ``vision_feature_select_strategy=
"default"`` (the CLS token is dropped before the projector), GQA in the LM (4 query heads, 2 kv-heads; real
LLaVA-1.5 has 32/32, LLaVA-NeXT-Mistral 32/8), RoPE and SwiGLU. LLaVA-NeXT keeps the real pinpoints' shapes
(1×2, 2×1, 2×2, 3×1 and 1×3 tiles) and the ``image_newline`` parameter. Tokenizers are the byte-level builder of
the tiny LLaVA-OneVision, with the checkpoints' chat-template shapes.
"""

from __future__ import annotations

from hooked_vlm.testing.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _init
from hooked_vlm.testing.llava_onevision import TINY_LLAVA_VOCAB, qwen2_tokenizer

TINY_CLIP_TILE = 16  # pixels per image / tile side (real: 336)
TINY_CLIP_PATCH = 4  # pixels per patch side (real: 14) → 4×4 patches + CLS per tile (real: 24×24 + CLS)
#: the real LLaVA-NeXT pinpoints ([336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]) in tiny tiles
TINY_LLAVA_NEXT_PINPOINTS = [
    [h * TINY_CLIP_TILE, w * TINY_CLIP_TILE] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
]

# llava-hf/llava-1.5-7b-hf: "USER: <image>\n{prompt} ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n{prompt} [/INST]"
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<image>"]


def _clip_image_kwargs() -> dict:
    return dict(
        size={"shortest_edge": TINY_CLIP_TILE},
        crop_size={"height": TINY_CLIP_TILE, "width": TINY_CLIP_TILE},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def llava_processor(vision_feature_select_strategy: str = "default"):
    """``LlavaProcessor`` for the tiny LLaVA-1.5: CLIP preprocessing (short side resized, centre square cropped)."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**_clip_image_kwargs()),
        tokenizer=qwen2_tokenizer(SPECIAL_TOKENS),
        patch_size=TINY_CLIP_PATCH,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def llava_next_processor():
    """``LlavaNextProcessor`` for the tiny LLaVA-NeXT: anyres tiles over the pinpoints, plus the whole image."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            **_clip_image_kwargs(), image_grid_pinpoints=TINY_LLAVA_NEXT_PINPOINTS
        ),
        tokenizer=qwen2_tokenizer(SPECIAL_TOKENS),
        patch_size=TINY_CLIP_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )


def _text_config(tokenizer, model_type: str) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        model_type=model_type, vocab_size=TINY_LLAVA_VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, max_position_embeddings=1024,
        bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<|endoftext|>"),
    )  # fmt: skip


def _vision_config() -> dict:
    return dict(
        model_type="clip_vision_model", image_size=TINY_CLIP_TILE, patch_size=TINY_CLIP_PATCH, hidden_size=32,
        num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, projection_dim=16,
    )  # fmt: skip


def tiny_llava_config(tokenizer, vision_feature_select_strategy: str = "default", vision_feature_layer=-2):
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=_text_config(tokenizer, "llama"),
        vision_config=_vision_config(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=(TINY_CLIP_TILE // TINY_CLIP_PATCH) ** 2,
    )


def tiny_llava_next_config(tokenizer, vision_feature_layer=-2):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        text_config=_text_config(tokenizer, "mistral") | {"sliding_window": None},
        vision_config=_vision_config(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=TINY_LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )


def _finish(model, config, seed: int):
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed)


def tiny_llava(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_feature_select_strategy: str = "default",
    vision_feature_layer=-2,
):
    """A tiny random ``LlavaForConditionalGeneration`` (LLaVA-1.5) and its offline ``LlavaProcessor``."""
    from transformers import LlavaForConditionalGeneration

    processor = llava_processor(vision_feature_select_strategy)
    config = tiny_llava_config(processor.tokenizer, vision_feature_select_strategy, vision_feature_layer)
    config._attn_implementation = attn_implementation
    return _finish(LlavaForConditionalGeneration(config), config, seed), processor


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", vision_feature_layer=-2):
    """A tiny random ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT) and its offline ``LlavaNextProcessor``."""
    from transformers import LlavaNextForConditionalGeneration

    processor = llava_next_processor()
    config = tiny_llava_next_config(processor.tokenizer, vision_feature_layer)
    config._attn_implementation = attn_implementation
    return _finish(LlavaNextForConditionalGeneration(config), config, seed), processor
