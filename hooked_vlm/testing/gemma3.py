"""A tiny random Gemma 3 (SigLIP + pooling projector + Gemma 3 LM) with an offline processor and tokenizer.

Sizes are small, but every structural feature of the real checkpoints is kept, and sized so that it shows:

- SigLIP on 32 px images with 4 px patches: an 8×8 patch grid (real: 896 px, 14 px patches, 64×64), pooled 2×2
  into 4×4 = 16 soft tokens per image (real: 4×4 pooling into 16×16 = 256);
- the LM alternates a **sliding-window** layer (window 8, shorter than any prompt with an image) and a
  **global** layer, with different RoPE bases (linear scaling on the global one, as the 4B/12B/27B configs have);
- GQA (4 query heads, 2 kv-heads), QK norm, sandwich norms (pre and post attention / feed-forward), a
  ``query_pre_attn_scalar`` that differs from ``head_dim`` (as in the 27B), the embedding scale √d_model;
- the processor expands each ``<start_of_image>`` into ``\\n\\n<start_of_image>`` + 16 ``<image_soft_token>`` +
  ``<end_of_image>\\n\\n`` and returns ``token_type_ids`` (1 on soft tokens), from which the model builds the
  bidirectional attention over each image's span.
"""

from __future__ import annotations

from hooked_vlm.testing.clip import _init

TINY_GEMMA3_IMAGE = 32  # pixels per image side (real: 896)
TINY_GEMMA3_PATCH = 4  # pixels per patch side (real: 14) → 8×8 patches (real: 64×64)
TINY_GEMMA3_TOKENS = 16  # soft tokens per image, 4×4 (real: 256, 16×16)
TINY_GEMMA3_WINDOW = 8  # sliding window of the local layers (real: 1024); an image prompt is longer

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

# The checkpoints' template shape (bos, user / model turns, <start_of_image> where an image goes), kept small.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gemma_tokenizer():
    """A Gemma tokenizer built in memory: byte fallback for every character, plus Gemma 3's special tokens.

    Real Gemma 3 vocabularies name the image tokens on the tokenizer (``boi_token``, ``eoi_token``,
    ``image_token``), which ``Gemma3Processor`` reads; they are set the same way here.
    """
    from transformers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    named = [*SPECIAL_TOKENS, *TURN_TOKENS, *IMAGE_TOKENS.values()]
    vocab = {token: i for i, token in enumerate(named)}
    vocab["▁"] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens=dict(IMAGE_TOKENS))
    special = [*TURN_TOKENS, *IMAGE_TOKENS.values()]
    tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in special], special_tokens=True)
    return tokenizer


def gemma3_processor():
    """``Gemma3Processor`` for the tiny model: PIL image backend, byte tokenizer, small chat template."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": TINY_GEMMA3_IMAGE, "width": TINY_GEMMA3_IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pan_and_scan=False, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )  # fmt: skip
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=gemma_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=TINY_GEMMA3_TOKENS,
    )


def tiny_gemma3_config(tokenizer):
    from transformers import Gemma3Config

    ids = tokenizer.convert_tokens_to_ids
    return Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
            sliding_window=TINY_GEMMA3_WINDOW, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
            max_position_embeddings=1024, pad_token_id=ids("<pad>"), eos_token_id=[ids("<eos>"), ids("<end_of_turn>")],
            bos_token_id=ids("<bos>"),
        ),
        vision_config=dict(
            model_type="siglip_vision_model", image_size=TINY_GEMMA3_IMAGE, patch_size=TINY_GEMMA3_PATCH,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vision_use_head=False,
        ),
        mm_tokens_per_image=TINY_GEMMA3_TOKENS,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )  # fmt: skip


def tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Gemma3ForConditionalGeneration`` and its offline ``Gemma3Processor``."""
    from transformers import Gemma3ForConditionalGeneration

    processor = gemma3_processor()
    config = tiny_gemma3_config(processor.tokenizer)
    config._attn_implementation = attn_implementation
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return _init(model, seed), processor
