"""Processor-style inputs at the sizes a checkpoint's processor produces, built from the model's config alone.

For real-size models built from shipped configs (:func:`~hooked_vlm.testing.build`), which come without a
processor: random text tokens around one image's tokens and random pixels, as small CPU tensors that
``HookedVLM.prepare_inputs`` takes like a processor's output (and moves to the model's input device).
"""

from __future__ import annotations

from typing import Any

import torch

#: random text is drawn below the Qwen2 vocabulary's special tokens (151643 and up)
_MAX_TEXT_ID = 150000


def real_size_inputs(model: Any, *, seed: int = 0, image_seed: int | None = None, text_tokens: int = 20) -> dict:
    """One prompt: ``text_tokens`` random tokens with one image's tokens after the fifth, and random pixels.

    ``model`` is a :class:`~hooked_vlm.HookedVLM` of LLaVA-OneVision (one 384×384 image: 2 tiles, 1485 image
    tokens at real size), Qwen2-VL (one 224×224 image: a 16×16 patch grid, 64 image tokens) or Gemma 3 (one
    896×896 image: 64×64 patches pooled to 256 soft tokens between ``<start_of_image>`` and ``<end_of_image>``). ``seed`` draws
    the text and ``image_seed`` (default: ``seed``) the pixels; all inputs have the same token layout, so two
    image seeds give clean and corrupted inputs for patching.
    """
    config = model.raw_model.config
    family = model.adapter.family
    text = _random_text(model, text_tokens, seed)
    generator = torch.Generator().manual_seed(seed if image_seed is None else image_seed)
    if family == "llava_onevision":
        image_sizes = torch.tensor([[384, 384]])
        (packing,) = model.adapter.image_packing(image_sizes)
        image = torch.full((1, packing.n_tokens), config.image_token_id)
        input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
        side = config.vision_config.image_size
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, packing.n_tiles, 3, side, side, generator=generator),
            "image_sizes": image_sizes,
        }
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # same processor outputs
        vision = config.vision_config
        grid = (1, 16, 16)
        n_patches = grid[1] * grid[2]
        image = torch.full((1, n_patches // vision.spatial_merge_size**2), config.image_token_id)
        start = torch.full((1, 1), config.vision_start_token_id)
        end = torch.full((1, 1), config.vision_end_token_id)
        input_ids = torch.cat([text[:, :5], start, image, end, text[:, 5:]], dim=1)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == config.image_token_id).long(),
            "pixel_values": torch.randn(n_patches, patch, generator=generator),
            "image_grid_thw": torch.tensor([grid]),
        }
    if family == "gemma3":
        side = config.vision_config.image_size
        start = torch.full((1, 1), config.boi_token_id)
        image = torch.full((1, config.mm_tokens_per_image), config.image_token_id)
        end = torch.full((1, 1), config.eoi_token_id)
        input_ids = torch.cat([text[:, :5], start, image, end, text[:, 5:]], dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": (input_ids == config.image_token_id).long(),
            "pixel_values": torch.randn(1, 3, side, side, generator=generator),
        }
    raise ValueError(
        f"real_size_inputs builds LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Gemma 3 inputs, not {family!r}"
    )


def _random_text(model: Any, n: int, seed: int) -> torch.Tensor:
    """``[1, n]`` token ids below the vocabulary size, none of them a special token the config names (an image
    token, vision start/end, bos/eos/pad): those would change the layout."""
    vocab = model.raw_model.get_input_embeddings().num_embeddings
    text = torch.randint(1, min(vocab, _MAX_TEXT_ID), (1, n), generator=torch.Generator().manual_seed(seed))
    configs = [model.raw_model.config, getattr(model.raw_model.config, "text_config", None)]
    named = {
        value
        for config in configs
        if config is not None
        for key, value in config.to_dict().items()
        if key.endswith(("token_id", "token_index")) and isinstance(value, int)
    }
    special = torch.isin(text, torch.tensor(sorted(named)))
    text[special] = next(i for i in range(1, vocab) if i not in named)
    return text
