"""Normalising what users pass as images, before any processor or model work."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor, nn

from hooked_vlm.taps import current_device

ImageLike = Image.Image | np.ndarray | Tensor | str | os.PathLike

ACCEPTED = (
    "a PIL image, a numpy array [H, W] / [H, W, C], a uint8 tensor [C, H, W] / [B, C, H, W], a file path, "
    "a list of those, a float tensor of ready pixel_values, or a dict / BatchFeature of processor outputs"
)


class RawPixelsWarning(UserWarning):
    """Ready ``pixel_values`` that look like raw ``[0, 1]`` pixels (a torchvision ``ToTensor`` batch), which
    reach the model without the processor's normalisation."""


def is_processor_output(inputs: Any) -> bool:
    return isinstance(inputs, Mapping)


def is_pixel_values(inputs: Any) -> bool:
    """Whether ``inputs`` is a tensor of ready pixel values (a floating tensor); integer tensors are raw images."""
    return isinstance(inputs, Tensor) and inputs.is_floating_point()


def load_images(inputs: Any) -> list[Image.Image]:
    """8-bit RGB PIL images from one image or a list of them: the one rule for what the pixels of an image mean.

    Every image becomes an 8-bit RGB image before the checkpoint's processor (or open_clip's preprocess) sees it,
    so every family resizes and normalises the same thing, and a value means the same in every form:

    * **uint8** (numpy arrays, tensors, PIL ``L`` / ``RGB`` / ``RGBA`` / ``P`` …): 0-255, used as they are.
    * **float** numpy arrays: ``[0, 1]``, scaled by 255 and rounded (never rescaled a second time by the
      processor). Values outside ``[0, 1]`` are an error: divide 0-255 floats by 255 (or pass uint8).
    * **16-bit** (``uint16`` arrays, PIL ``I;16``, 16-bit PNG and TIFF files): 0-65535, scaled to 0-255 by their
      top 8 bits (``v >> 8``: 256 values a level, so an 8-bit ``v`` stored as ``v * 257`` or ``v * 256`` comes
      back exactly); never clipped.
    * **other integers** with no bit depth of their own (``int32`` / ``int64`` arrays, PIL ``I``, whose values
      ``convert("I")`` leaves at 0-255): 8-bit if every value is within 0-255, else 16-bit if within 0-65535,
      else an error.
    * **PIL ``F``** (32-bit float): ``[0, 1]`` as float arrays, scaled by 255; an ``F`` image with values above 1
      holds Pillow's own 0-255 scale (``convert("F")`` of an 8-bit image), used as it is; values outside
      ``[0, 255]`` are an error.
    * NaN or infinite pixels, and boolean or complex arrays, are an error naming the image's index in the list.

    Shapes: a numpy array is ``[H, W]`` (grey) or ``[H, W, C]`` with C = 1, 3 or 4. An integer tensor is one
    image ``[C, H, W]`` (torchvision's ``read_image``) when its first axis has 1, 3 or 4 entries, else
    ``[H, W, C]``; a 4-D integer tensor is a batch ``[B, C, H, W]``. One channel is grey (copied to R, G and B);
    a fourth channel (alpha) is dropped, as ``Image.convert("RGB")`` drops it. A path is opened with PIL and
    follows the rule of its mode.

    A floating tensor is not an image: it is ready ``pixel_values`` (see :func:`pixel_tensor`), passed alone.
    """
    if isinstance(inputs, Tensor) and inputs.dim() == 4 and not inputs.is_floating_point():
        inputs = list(inputs)
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise ValueError("no images given")
    return [_rgb8(item, index) for index, item in enumerate(items)]


def _rgb8(item: Any, index: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return _pil_rgb8(item, index)
    if isinstance(item, (str, os.PathLike)):
        if not os.path.exists(item):
            raise FileNotFoundError(f"image file not found: {item}")
        with Image.open(item) as opened:
            image = _pil_rgb8(opened, index)
            # an RGB file comes back as the opened image, whose pixels closing it would free
            return image.copy() if image is opened else image
    if isinstance(item, Tensor):
        if item.is_floating_point():
            raise TypeError(
                f"image {index} is a float tensor: a float tensor is ready pixel_values and is passed alone, not in "
                "a list of images; pass raw images as uint8 tensors ((x * 255).round().to(torch.uint8) for [0, 1] "
                "floats), numpy arrays or PIL images"
            )
        if item.dim() != 3:
            raise ValueError(
                f"image {index}: an integer tensor image must be [C, H, W] or [H, W, C], got {tuple(item.shape)}"
            )
        item = (item.permute(1, 2, 0) if item.shape[0] in (1, 3, 4) else item).numpy(force=True)
    if isinstance(item, np.ndarray):
        if not (item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4))):
            raise ValueError(
                f"image {index}: a numpy image must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {item.shape}"
            )
        pixels = _uint8(item, index)
        return _pil_rgb8(
            Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels), index
        )
    raise TypeError(f"unsupported image input of type {type(item).__name__} (image {index}); expected {ACCEPTED}")


def _pil_rgb8(image: Image.Image, index: int) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow's own convert("RGB") clips these modes to 0-255: 16-bit images turn white, [0, 1] floats black
        pixels = np.asarray(image)
        if image.mode == "F" and np.isfinite(pixels).all() and pixels.max(initial=0) > 1:
            if pixels.min() < 0 or pixels.max() > 255:
                raise ValueError(
                    f"image {index}: a PIL 'F' image must hold values in [0, 1] or Pillow's 0-255 scale, found "
                    f"[{pixels.min():.4g}, {pixels.max():.4g}]"
                )
            pixels = np.rint(pixels).astype(np.uint8)
        return Image.fromarray(_uint8(pixels, index)).convert("RGB")
    return image.convert("RGB")


def _uint8(pixels: np.ndarray, index: int) -> np.ndarray:
    """``pixels`` on the 8-bit scale by the rule of :func:`load_images`."""
    if pixels.dtype == np.uint8:
        return pixels
    kind = pixels.dtype.kind
    if kind == "f":
        finite = np.isfinite(pixels)
        if not finite.all():
            raise ValueError(f"image {index} has {int((~finite).sum())} non-finite pixel values (NaN or inf)")
        low, high = pixels.min(), pixels.max()
        if low < 0 or high > 1:
            raise ValueError(
                f"image {index}: float pixels must be in [0, 1], found [{low:.4g}, {high:.4g}]; divide 0-255 "
                "values by 255 (or pass uint8), and clip values a resize or augmentation pushed past the range"
            )
        return np.rint(np.multiply(pixels, 255, dtype=np.promote_types(pixels.dtype, np.float32))).astype(np.uint8)
    if kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        sixteen_bit = kind == "u" and pixels.dtype.itemsize == 2  # uint16 / I;16 (any byte order), even when dark
        if not sixteen_bit and 0 <= low and high <= 255:
            return pixels.astype(np.uint8)
        if 0 <= low and high <= 65535:
            return (pixels >> 8).astype(np.uint8)
        raise ValueError(
            f"image {index}: integer pixels must be 8-bit (0-255) or 16-bit (0-65535), found [{low}, {high}]; "
            "scale them to uint8 yourself"
        )
    raise TypeError(f"image {index}: {pixels.dtype} pixels are not an image; pass uint8 (0-255) or float (0-1) values")


_PART_NAMES = {"image_processor": "an image processor", "tokenizer": "a tokenizer"}


def processor_part(processor: Any, part: str, what: str) -> Any:
    """``processor``'s ``part`` (``"image_processor"`` or ``"tokenizer"``) for preprocessing ``what``.

    A Hugging Face processor holds both; a bare image processor (a ``CLIPImageProcessor`` loaded for a
    ``CLIPVisionModel``) or a bare tokenizer is its own part and has no other. A missing part is a ``TypeError``
    that says which processor is needed, instead of an ``AttributeError`` deep in preprocessing.
    """
    found = getattr(processor, part, None)
    if found is not None:
        return found
    from transformers import PreTrainedTokenizerBase
    from transformers.image_processing_base import ImageProcessingMixin

    if isinstance(processor, {"image_processor": ImageProcessingMixin, "tokenizer": PreTrainedTokenizerBase}[part]):
        return processor
    raise TypeError(
        f"preprocessing {what} needs {_PART_NAMES[part]}, and this model was wrapped with a bare "
        f"{type(processor).__name__}, which has none: pass a processor with {_PART_NAMES[part]}, e.g. the "
        "checkpoint's own (AutoProcessor.from_pretrained(name)), to HookedVLM.from_hf(model, processor)"
    )


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
    processor_part(processor, "tokenizer", "prompts")
    if inputs is not None:
        processor_part(processor, "image_processor", "images")
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


def pixel_tensor(
    inputs: Float[Tensor, "*batch channels height width"], channels: int = 3
) -> Float[Tensor, "batch channels height width"]:
    """Ready ``pixel_values``: ``[batch, C, H, W]`` (a single ``[C, H, W]`` image gets a batch axis), used as given.

    A floating tensor is taken as the processor's output, already normalised (as TransformerLens takes token
    tensors). NaN or infinite values are an error naming the image. A tensor whose values all lie in ``[0, 1]``
    looks like raw pixels (torchvision's ``ToTensor``) rather than normalised ones, which almost always have
    negatives (a CLIP-normalised black is -1.79): it warns (:class:`RawPixelsWarning`) and is still used as given.
    A constant tensor (a placeholder such as ``torch.zeros``) does not warn.
    """
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.dim() != 4 or inputs.shape[1] != channels:
        raise ValueError(f"pixel_values must be [batch, {channels}, H, W], got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"pixel_values must be a floating tensor (already normalised), got {inputs.dtype}")
    if inputs.is_meta:  # shapes only: no values to check
        return inputs
    finite = torch.isfinite(inputs).flatten(1).all(1)
    if not finite.all():
        raise ValueError(
            f"pixel_values of image {(~finite).nonzero().flatten().tolist()} hold non-finite values (NaN or inf)"
        )
    low, high = inputs.aminmax()
    if 0 <= low < high <= 1:  # a constant tensor (a torch.zeros placeholder) says nothing about its scale
        warnings.warn(
            "these pixel_values are all in [0, 1], like raw pixels (torchvision's ToTensor) rather than normalised "
            "ones, yet a float tensor reaches the model as it is, without the processor's normalisation. To have "
            "the processor resize and normalise raw images, pass them as a uint8 tensor, "
            "(pixels * 255).round().to(torch.uint8), or as PIL images / numpy arrays; if these values are "
            "normalised already, silence this with warnings.filterwarnings('ignore', category=RawPixelsWarning)",
            RawPixelsWarning,
            stacklevel=2,
        )
    return inputs


def check_type(inputs: Any) -> None:
    if inputs is None or isinstance(inputs, (Tensor, Mapping, Image.Image, np.ndarray, str, os.PathLike, list, tuple)):
        return
    raise TypeError(f"unsupported input of type {type(inputs).__name__}; expected {ACCEPTED}")
