"""Normalising what users pass as images, before any processor or model work."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor, nn

from hooked_vlm.taps import current_device

ImageLike = Image.Image | np.ndarray | str | os.PathLike

ACCEPTED = (
    "a PIL image, a numpy array [H, W, 3], a file path, a list of those, a tensor of ready pixel_values, "
    "or a dict / BatchFeature of processor outputs"
)


def is_processor_output(inputs: Any) -> bool:
    return isinstance(inputs, Mapping)


def load_images(inputs: Any) -> list[Image.Image | np.ndarray]:
    """A list of images from one image or a list of them; paths are opened as RGB."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise ValueError("no images given")
    images: list[Image.Image | np.ndarray] = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB") if item.mode != "RGB" else item)
        elif isinstance(item, (str, os.PathLike)):
            if not os.path.exists(item):
                raise FileNotFoundError(f"image file not found: {item}")
            with Image.open(item) as image:
                images.append(image.convert("RGB"))
        elif isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[-1] not in (1, 3, 4):
                raise ValueError(f"a numpy image must be [H, W, C] with C in (1, 3, 4), got shape {item.shape}")
            images.append(item[..., :3] if item.shape[-1] == 4 else item)
        else:
            raise TypeError(f"unsupported image input of type {type(item).__name__}; expected {ACCEPTED}")
    return images


_TRANSFORMERLENS_ONLY = {
    "remove_batch_dim": "index [0] of the cached tensors yourself",
    "pos_slice": "pass positions= (a selector) to run_with_cache",
    "return_type": "the output is what the wrapped model returns (logits or embeddings)",
    "return_cache_object": "run_with_cache always returns an ActivationCache",
    "names": "pass names_filter=",
}


def model_keywords(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` for the wrapped model's forward, checked: an unknown keyword (or a TransformerLens-only one)
    raises instead of vanishing into a Hugging Face ``**kwargs``."""
    if not kwargs:
        return {}
    parameters = inspect.signature(model.forward).parameters.values()
    accepted = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        from transformers.utils.generic import TransformersKwargs

        accepted |= set(TransformersKwargs.__annotations__)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hints = [f"{name}: {_TRANSFORMERLENS_ONLY[name]}" for name in unknown if name in _TRANSFORMERLENS_ONLY]
        raise TypeError(
            f"{type(model).__name__}.forward takes no {unknown}"
            + (f" ({'; '.join(hints)})" if hints else f"; it takes {sorted(accepted)}")
        )
    return dict(kwargs)


def chat_prompts(processor: Any, inputs: Any, text: Any, prompt: Any) -> tuple[list[str], list[list] | None]:
    """Formatted texts and the images of each prompt, for a chat VLM's processor.

    ``inputs``: one image, a list of images (all in one prompt, or one per prompt when ``prompt`` is a list of the
    same length), a list of lists (the images of each prompt), or ``None`` (text only). ``prompt``: the user
    message(s), formatted with the checkpoint's chat template (without one, the images alone are the user turn);
    ``text``: already formatted text, used as it is.
    """
    if text is not None and prompt is not None:
        raise TypeError("pass either prompt= (chat-formatted here) or text= (already formatted), not both")
    given = text if text is not None else prompt
    messages = None if given is None else [given] if isinstance(given, str) else list(given)
    if inputs is None:
        images = None
        if messages is None:
            raise ValueError("nothing to run: pass images and/or a prompt")
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, (list, tuple)) for x in inputs):
        images = [load_images(x) if x else [] for x in inputs]
    elif isinstance(inputs, (list, tuple)) and messages is not None and 1 < len(messages) == len(inputs):
        images = [load_images(x) for x in inputs]
    else:
        images = [load_images(inputs)]
    n_prompts = len(images) if images is not None else len(messages)
    messages = messages if messages is not None else [None] * n_prompts
    if len(messages) != n_prompts:
        raise ValueError(
            f"{len(messages)} prompts for {n_prompts} image lists; pass one prompt, one prompt per image, "
            "or a list of image lists with one prompt each"
        )
    if text is not None:
        return messages, images
    texts = []
    for message, row in zip(messages, images or [[]] * n_prompts, strict=True):
        content = [{"type": "image"}] * len(row)
        if message is not None:
            content.append({"type": "text", "text": message})
        conversation = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    return texts, images


def to_model(kwargs: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Tensors moved to the model's input device (:func:`~hooked_vlm.taps.current_device`: with a device_map,
    where accelerate runs the model's forward); floating tensors cast to the model's dtype."""
    device = current_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    moved: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved


def pixel_tensor(inputs: Tensor, channels: int = 3) -> Tensor:
    """Ready ``pixel_values``: ``[batch, C, H, W]`` (a single ``[C, H, W]`` image gets a batch axis)."""
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.dim() != 4 or inputs.shape[1] != channels:
        raise ValueError(f"pixel_values must be [batch, {channels}, H, W], got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"pixel_values must be a floating tensor (already normalised), got {inputs.dtype}")
    return inputs


def check_type(inputs: Any) -> None:
    if inputs is None or isinstance(inputs, (Tensor, Mapping, Image.Image, np.ndarray, str, os.PathLike, list, tuple)):
        return
    raise TypeError(f"unsupported input of type {type(inputs).__name__}; expected {ACCEPTED}")

