"""A tiny random LLaVA-OneVision (SigLIP + 2-layer MLP projector + Qwen2) with an offline processor and tokenizer.

Sizes are small but every structural feature of the real checkpoints is kept: anyres tiling over a grid of
pinpoints up to 4×4 tiles (so that ``anyres_max_9`` down-scaling happens, as it does for large images at real
size), a 4×4 patch grid per tile (non-trivial rows and columns), GQA in the LM (4 query heads, 2 kv-heads),
RoPE, SwiGLU, and the ``image_newline`` parameter.
"""

from __future__ import annotations

from hooked_vlm.testing.clip import _init

TINY_LLAVA_TILE = 16  # pixels per tile side (real: 384)
TINY_LLAVA_PATCH = 4  # pixels per patch side (real: 14) → 4×4 = 16 tokens per tile (real: 27×27 = 729)
TINY_LLAVA_PINPOINTS = [[h * TINY_LLAVA_TILE, w * TINY_LLAVA_TILE] for h in range(1, 5) for w in range(1, 5)]
TINY_LLAVA_VOCAB = 320

# The checkpoints' template shape (images first, then the text, Qwen2 im_start/im_end turns), kept small.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_tokenizer(special_tokens: list[str]):
    """A byte-level Qwen2 tokenizer built in memory: every byte is one token, plus ``special_tokens``."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens], special_tokens=True)
    return tokenizer


def llava_onevision_processor():
    """``LlavaOnevisionProcessor`` for the tiny model: PIL image backend, byte tokenizer, small chat template."""
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    size = {"height": TINY_LLAVA_TILE, "width": TINY_LLAVA_TILE}
    tokenizer = qwen2_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    image_processor = LlavaOnevisionImageProcessorPil(
        size=size, image_grid_pinpoints=TINY_LLAVA_PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        num_image_tokens=(TINY_LLAVA_TILE // TINY_LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llava_onevision_config(tokenizer):
    from transformers import LlavaOnevisionConfig

    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=TINY_LLAVA_VOCAB, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, max_position_embeddings=1024,
            bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            model_type="siglip_vision_model", image_size=TINY_LLAVA_TILE, patch_size=TINY_LLAVA_PATCH,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vision_use_head=False,
        ),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=TINY_LLAVA_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``LlavaOnevisionForConditionalGeneration`` and its offline ``LlavaOnevisionProcessor``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = llava_onevision_processor()
    config = tiny_llava_onevision_config(processor.tokenizer)
    config._attn_implementation = attn_implementation
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed), processor
