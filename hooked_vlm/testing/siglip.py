"""Tiny random SigLIP and SigLIP2 models (both towers, or the vision tower alone) with offline processors.

SigLIP's tokenizer is the real ``SiglipTokenizer`` over a small SentencePiece model trained here in memory on a
few captions (the checkpoints ship a 32k-piece model); SigLIP2's is the real ``Siglip2Tokenizer`` (Gemma-style BPE)
over a character vocabulary. The SigLIP2 image processor keeps NaFlex's arithmetic with a small patch budget,
so images of other aspect ratios get other grids and every tiny input has padding positions.
"""

from __future__ import annotations

import functools
import io
import string
import tempfile
from pathlib import Path

from hooked_vlm.testing.clip import _init

TINY_SIGLIP_IMAGE_SIZE = 32
TINY_SIGLIP_PATCH = 8  # → a 4 × 4 grid of patches
TINY_SIGLIP2_PATCH = 4
TINY_SIGLIP2_POSITIONS = 16  # a 4 × 4 grid of learned positions, resized to each image's grid
TINY_SIGLIP2_MAX_PATCHES = 24  # e.g. 4 × 4 or 3 × 6 patches, the rest padding
TINY_TEXT_LENGTH = 16  # real: 64

_CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "a beautiful sunset over the sea",
    "an ugly blurry picture",
    "what is in the picture?",
    "a painting, a drawing or a photograph",
    string.ascii_lowercase,
    string.digits + string.punctuation,
]


@functools.lru_cache(maxsize=1)
def _sentencepiece_model() -> Path:
    """A small unigram SentencePiece model trained on :data:`_CORPUS`, written to a temporary file
    (``SiglipTokenizer`` reads its model from a path)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=model, vocab_size=96, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="hooked_vlm_siglip_")) / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def siglip_tokenizer():
    """The real ``SiglipTokenizer`` (SentencePiece, lower-casing, pad = eos) over a tiny vocabulary."""
    from transformers import SiglipTokenizer

    return SiglipTokenizer(vocab_file=str(_sentencepiece_model()), model_max_length=TINY_TEXT_LENGTH)


def siglip2_tokenizer():
    """The real ``Siglip2Tokenizer`` with its special tokens and a character vocabulary (no merges)."""
    from transformers import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for char in "▁" + string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    return Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT_LENGTH)


def siglip_processor():
    from transformers import SiglipImageProcessor, SiglipProcessor

    size = {"height": TINY_SIGLIP_IMAGE_SIZE, "width": TINY_SIGLIP_IMAGE_SIZE}
    image_processor = SiglipImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return SiglipProcessor(image_processor=image_processor, tokenizer=siglip_tokenizer())


def siglip2_processor():
    from transformers import Siglip2ImageProcessor, Siglip2Processor

    image_processor = Siglip2ImageProcessor(patch_size=TINY_SIGLIP2_PATCH, max_num_patches=TINY_SIGLIP2_MAX_PATCHES)
    return Siglip2Processor(image_processor=image_processor, tokenizer=siglip2_tokenizer())


def _tower_sizes(hidden: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _text_config(tokenizer, projection: int) -> dict:
    # a text width unlike the vision width, so a tower mix-up cannot pass; its head projects to the image width
    return dict(
        _tower_sizes(24), vocab_size=len(tokenizer), max_position_embeddings=TINY_TEXT_LENGTH,
        projection_size=projection, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def _tiny(config_class, two_towers: str, kind: str, processor, vision: dict, seed: int, attn_implementation: str):
    import transformers

    config = config_class(text_config=_text_config(processor.tokenizer, 32), vision_config=vision)
    if kind != two_towers:
        config = config.vision_config
    config._attn_implementation = attn_implementation
    return _init(getattr(transformers, kind)(config), seed), processor


def tiny_siglip(kind: str = "SiglipModel", seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``SiglipModel`` / ``SiglipVisionModel`` (4 × 4 patches, attention-pooling head) and its processor."""
    from transformers import SiglipConfig

    vision = dict(_tower_sizes(32), image_size=TINY_SIGLIP_IMAGE_SIZE, patch_size=TINY_SIGLIP_PATCH)
    return _tiny(SiglipConfig, "SiglipModel", kind, siglip_processor(), vision, seed, attn_implementation)


def tiny_siglip2(kind: str = "Siglip2Model", seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``Siglip2Model`` / ``Siglip2VisionModel`` (NaFlex, at most 24 patches) and its processor."""
    from transformers import Siglip2Config

    vision = dict(_tower_sizes(32), patch_size=TINY_SIGLIP2_PATCH, num_patches=TINY_SIGLIP2_POSITIONS)
    return _tiny(Siglip2Config, "Siglip2Model", kind, siglip2_processor(), vision, seed, attn_implementation)
