"""Tiny random CLIP models (Hugging Face and open_clip) with offline processors and the real CLIP tokenizer."""

from __future__ import annotations

import functools
import gzip
from importlib import resources

import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH = 8


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary and merges (49,408 entries), from the file open_clip ships."""
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    from open_clip.tokenizer import bytes_to_unicode

    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def clip_tokenizer():
    """Hugging Face ``CLIPTokenizer`` with the real vocabulary, built offline (same ids as open_clip's)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=list(merges))


def clip_image_processor(image_size: int = TINY_CLIP_IMAGE_SIZE):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def clip_processor(image_size: int = TINY_CLIP_IMAGE_SIZE):
    from transformers import CLIPProcessor

    return CLIPProcessor(image_processor=clip_image_processor(image_size), tokenizer=clip_tokenizer())


def tiny_clip_config():
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        vision_config=dict(
            image_size=TINY_CLIP_IMAGE_SIZE, patch_size=TINY_CLIP_PATCH, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37,
        ),
        projection_dim=16,
    )
    return config


def _init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every weight with a fixed seed so tiny models have non-trivial (non-identity) layer norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * (0.2 if param.dim() > 1 else 0.1))
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    return model.eval()


def tiny_clip(kind: str = "CLIPModel", seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` and its processor."""
    import transformers

    config = tiny_clip_config()
    if kind != "CLIPModel":
        config = config.vision_config
        config.projection_dim = 16
    config._attn_implementation = attn_implementation
    model = getattr(transformers, kind)(config)
    return _init(model, seed), clip_processor()


def tiny_open_clip(seed: int = 0, ls_init_value: float | None = None):
    """A tiny random open_clip ``CLIP`` (ViT vision tower, causal text tower) and its preprocess + tokenizer.

    ``ls_init_value`` gives every block LayerScale after attention and MLP (as in open_clip's ViT-g/ViT-bigG
    configs); its scales are then random too."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=32, head_width=8, mlp_ratio=4.0, patch_size=TINY_CLIP_PATCH,
                           image_size=TINY_CLIP_IMAGE_SIZE, ls_init_value=ls_init_value)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2, ls_init_value=ls_init_value)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    _init(model, seed)
    preprocess = open_clip.image_transform(TINY_CLIP_IMAGE_SIZE, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    tokenizer = open_clip.SimpleTokenizer()
    return model, (preprocess, tokenizer)
