"""Preprocessing on the GPU for fixed-size image processors: nvJPEG decode, then the processor's own resize, crop
and normalise run on device tensors.

A CPU decodes a 640×480 JPEG and runs ``CLIPImageProcessor`` on it in about 7 ms; sixteen cores feed about 2,000
images/s, less than an H200 harvests CLIP-L/14 at. With ``preprocess="gpu"`` the loading processes only read
file bytes (:func:`raw_image`); the JPEGs of a batch are decoded together by ``torchvision.io.decode_jpeg`` on
the model's device, and :func:`device_transform` applies the checkpoint's own preprocessing to the decoded
``uint8`` tensors there:

* a Hugging Face image processor of the torchvision backend whose ``_preprocess`` is the base class's (resize,
  centre crop, rescale, normalise: CLIP, SigLIP) is called itself on the device tensors (``device=``), so its
  sizes, interpolation and constants are the checkpoint's by construction;
* an open_clip (torchvision) ``Compose`` of ``Resize``, ``CenterCrop``, ``ToTensor`` and ``Normalize`` has its
  own transform objects applied to the batch tensor (``ToTensor`` becomes ``/ 255``).

Processors that tile or resize per image to a variable grid (LLaVA-OneVision's anyres, Qwen2-VL's dynamic
resolution) are refused with an error: their output is no fixed-size batch.

What differs from the CPU path: the decoder (nvJPEG's IDCT and chroma upsampling against libjpeg-turbo's, a few
levels of 255 on some pixels) and, for open_clip, the resize of a tensor instead of PIL's. The same code on a CPU
tensor (``device="cpu"``: torchvision's CPU decoder) reproduces the processor's pixels; tests hold it to that.
Files that are not JPEGs, and JPEGs nvJPEG cannot decode, are decoded by PIL on the CPU, as the CPU path does.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int64, UInt8
from PIL import Image
from torch import Tensor

from hooked_vlm.inputs import load_images

JPEG_MAGIC = b"\xff\xd8\xff"


def raw_image(item: Any) -> UInt8[Tensor, "*shape"]:
    """What a loading process sends for one image: the bytes of a JPEG file (``[n]``), else its 8-bit RGB pixels
    (``[3, H, W]``) by the rule every path uses (:func:`hooked_vlm.inputs.load_images`)."""
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as file:
            data = file.read()
        if data.startswith(JPEG_MAGIC):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = load_images([item])[0]
    pixels = np.asarray(image if isinstance(image, Image.Image) else Image.fromarray(image))
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()


def pack(raw: list[Tensor]) -> tuple[UInt8[Tensor, " total"], Int64[Tensor, "n 3"]]:
    """The :func:`raw_image` tensors of a batch as one buffer and ``(offset, height, width)`` per image (height
    and width -1 for JPEG bytes): a worker then hands over two tensors a batch, not one shared-memory file per
    image, whose passing dominated the loading of small items."""
    flat = [item.reshape(-1) for item in raw]
    offsets = torch.tensor([0, *[len(f) for f in flat]]).cumsum(0)[:-1]
    sizes = torch.tensor([item.shape[1:] if item.dim() == 3 else (-1, -1) for item in raw], dtype=torch.int64)
    return torch.cat(flat), torch.cat([offsets[:, None], sizes.reshape(len(raw), 2)], 1)


def unpack(data: Tensor, meta: Tensor) -> list[Tensor]:
    """The tensors :func:`pack` joined, as views of ``data``."""
    ends = [*meta[1:, 0].tolist(), len(data)]
    return [
        data[start:end] if height < 0 else data[start:end].view(3, height, width)
        for (start, height, width), end in zip(meta.tolist(), ends, strict=True)
    ]


def decode(raw: list[Tensor], device: torch.device) -> list[UInt8[Tensor, "3 h w"]]:
    """Decoded RGB images on ``device``: the JPEG bytes of ``raw`` decoded together (nvJPEG on a GPU), pixels
    moved; a JPEG the batched decoder refuses is decoded alone, and by PIL if that fails too."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [i for i, item in enumerate(raw) if item.dim() == 1]
    images: list[Tensor | None] = [None if item.dim() == 1 else item.to(device, non_blocking=True) for item in raw]
    if encoded:
        try:
            decoded = decode_jpeg([raw[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(raw[i], device) for i in encoded]
        for i, image in zip(encoded, decoded, strict=True):
            images[i] = image
    return images  # type: ignore[return-value]


def _decode_one(data: Tensor, device: torch.device) -> Tensor:
    import io

    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return raw_image(image.convert("RGB")).to(device)


def _image_processor(processor: Any) -> Any:
    """The image half of a model's processor: ``processor.image_processor`` (Hugging Face), the first of
    ``(preprocess, tokenizer)`` (open_clip), or the object itself."""
    if hasattr(processor, "image_processor"):
        return processor.image_processor
    if isinstance(processor, (tuple, list)) and processor:
        return processor[0]
    return processor


def device_transform(processor: Any) -> Callable[[list[Tensor]], Float[Tensor, "b 3 h w"]]:
    """``pixel_values`` from decoded ``uint8`` ``[3, H, W]`` images on any device, by ``processor``'s own
    fixed-size preprocessing (see the module docstring); other processors raise ``ValueError`` naming why."""
    image_processor = _image_processor(processor)
    if image_processor is None:
        raise ValueError("preprocess='gpu' needs the model's image processor; this model was wrapped without one")
    hf = _hf_transform(image_processor)
    if hf is not None:
        return hf
    steps = getattr(image_processor, "transforms", None)
    if steps is not None:
        return _compose_transform(steps)
    raise ValueError(
        f"preprocess='gpu' runs fixed-size processors (resize, crop, normalise); {type(image_processor).__name__} "
        "is not one: use preprocess='processor'"
    )


def _hf_transform(image_processor: Any) -> Callable[[list[Tensor]], Tensor] | None:
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    except ImportError:  # transformers without the torchvision backend
        return None
    if not hasattr(image_processor, "_preprocess") or not hasattr(image_processor, "image_mean"):
        return None
    name = type(image_processor).__name__
    plain = (TorchvisionBackend._preprocess, PilBackend._preprocess)
    if type(image_processor)._preprocess not in plain or getattr(image_processor, "do_pad", False):
        raise ValueError(
            f"preprocess='gpu' runs fixed-size processors (resize, crop, normalise); {name} tiles, pads "
            "or resizes per image: use preprocess='processor'"
        )
    if not isinstance(image_processor, TorchvisionBackend):
        raise ValueError(
            f"preprocess='gpu' calls the image processor on device tensors, which {name} (not of the "
            "torchvision backend) cannot take: load the checkpoint's default (torchvision) processor, or "
            "use preprocess='processor'"
        )

    def transform(images: list[Tensor]) -> Tensor:
        return image_processor(images=images, device=images[0].device, return_tensors="pt")["pixel_values"]

    return transform


def _compose_transform(steps: list[Any]) -> Callable[[list[Tensor]], Tensor]:
    from torchvision import transforms as T

    unknown = [
        step
        for step in steps
        if not isinstance(step, (T.Resize, T.CenterCrop, T.ToTensor, T.Normalize)) and not _is_rgb_conversion(step)
    ]
    if unknown:
        raise ValueError(
            f"preprocess='gpu' runs Resize, CenterCrop, ToTensor and Normalize; this preprocess also has "
            f"{unknown}: use preprocess='processor'"
        )

    def transform(images: list[Tensor]) -> Tensor:
        outputs: list[Tensor | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(i)
        for indices in by_shape.values():
            batch = torch.stack([images[i] for i in indices])
            for step in steps:
                if isinstance(step, T.ToTensor):
                    batch = batch.float() / 255
                elif not _is_rgb_conversion(step):  # decoded images are RGB already
                    batch = step(batch)
            for i, pixels in zip(indices, batch, strict=True):
                outputs[i] = pixels
        return torch.stack(outputs)  # type: ignore[arg-type]

    return transform


def _is_rgb_conversion(step: Any) -> bool:
    """open_clip's ``_convert_to_rgb`` function or ``MaybeConvertMode("RGB")``."""
    return getattr(step, "mode", None) == "RGB" or "rgb" in getattr(step, "__name__", "").lower()


def check_device(device: torch.device) -> None:
    """``preprocess='gpu'`` decodes with nvJPEG: a clear error (``ValueError``: the setting does not fit the
    machine) when the model is not on a CUDA device."""
    if device.type != "cuda":
        detail = "no CUDA device is present" if not torch.cuda.is_available() else f"the model is on {device}"
        raise ValueError(
            f"preprocess='gpu' decodes and preprocesses on a CUDA device, but {detail}; use "
            "preprocess='processor' (the CPU path, with workers= for speed)"
        )
