"""The one rule for images (``hooked_vlm.inputs.load_images``): every form of the same picture reaches the model as
the same pixel values as the 8-bit RGB PIL image, in every tiny family.

16-bit and float images are built from the same uint8 picture (v → v·257 or v·256, v → v/255), so the expected pixel values
are exact: the comparisons are ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.inputs import RawPixelsWarning, pixel_tensor
from hooked_vlm.testing import TINY_MODELS, sample_image, tiny_clip

FAMILIES = sorted(TINY_MODELS)
PICTURE = sample_image(40, 32, seed=2)  # not square: a swapped H and W shows
ARRAY = np.asarray(PICTURE)  # uint8 [H, W, 3]
GREY = np.asarray(PICTURE.convert("L"))  # uint8 [H, W]
GREY_RGB = PICTURE.convert("L").convert("RGB")

_models: dict[str, HookedVLM] = {}


def wrapped(family: str) -> HookedVLM:
    if family not in _models:
        _models[family] = HookedVLM.from_hf(*TINY_MODELS[family]())
    return _models[family]


def takes_prompt(model: HookedVLM) -> bool:
    return any(tower.name == "lm" for tower in model.adapter.towers())


def pixels(model: HookedVLM, images) -> torch.Tensor:
    """The pixel values the model receives for ``images``."""
    prompt = "What is in the picture?" if takes_prompt(model) else None
    return model.prepare_inputs(images, prompt=prompt).kwargs["pixel_values"]


_references: dict[tuple[str, int], torch.Tensor] = {}


def reference_pixels(family: str, picture: Image.Image) -> torch.Tensor:
    """The pixel values of an 8-bit RGB PIL image (``PICTURE`` or ``GREY_RGB``): what every other form must give."""
    key = (family, id(picture))
    if key not in _references:
        _references[key] = pixels(wrapped(family), picture)
    return _references[key]


def _file(image: Image.Image, tmp_path) -> str:
    path = tmp_path / f"{image.mode.replace(';', '_')}.png"
    image.save(path)
    return str(path)


# (name, the input built from the picture, the 8-bit RGB image it must equal)
FORMS = [
    ("numpy uint8 HWC", lambda tmp: ARRAY, PICTURE),
    ("numpy uint8 HWC RGBA", lambda tmp: np.asarray(PICTURE.convert("RGBA")), PICTURE),
    ("numpy uint8 HW", lambda tmp: GREY, GREY_RGB),
    ("numpy uint8 HW1", lambda tmp: GREY[..., None], GREY_RGB),
    ("numpy float32 HWC [0,1]", lambda tmp: ARRAY.astype(np.float32) / 255, PICTURE),
    ("numpy float64 HWC [0,1]", lambda tmp: ARRAY / 255.0, PICTURE),
    ("numpy float16 HWC [0,1]", lambda tmp: (ARRAY / 255.0).astype(np.float16), PICTURE),
    ("numpy uint16 HWC", lambda tmp: ARRAY.astype(np.uint16) * 257, PICTURE),
    ("numpy uint16 HWC (v << 8)", lambda tmp: ARRAY.astype(np.uint16) << 8, PICTURE),
    ("numpy int64 HWC 0-255", lambda tmp: ARRAY.astype(np.int64), PICTURE),
    ("torch uint8 CHW", lambda tmp: torch.from_numpy(ARRAY.copy()).permute(2, 0, 1), PICTURE),
    ("torch uint8 HWC", lambda tmp: torch.from_numpy(ARRAY.copy()), PICTURE),
    ("torch uint8 BCHW", lambda tmp: torch.from_numpy(ARRAY.copy()).permute(2, 0, 1)[None], PICTURE),
    ("PIL L", lambda tmp: PICTURE.convert("L"), GREY_RGB),
    ("PIL RGBA", lambda tmp: PICTURE.convert("RGBA"), PICTURE),
    ("PIL I;16", lambda tmp: Image.fromarray(GREY.astype(np.uint16) * 257), GREY_RGB),
    ("PIL I (16-bit values)", lambda tmp: Image.fromarray(GREY.astype(np.int32) * 257), GREY_RGB),
    ("PIL I (8-bit values, convert('I'))", lambda tmp: PICTURE.convert("L").convert("I"), GREY_RGB),
    ("PIL F [0,1]", lambda tmp: Image.fromarray(GREY.astype(np.float32) / 255), GREY_RGB),
    ("PIL F 0-255 (convert('F'))", lambda tmp: PICTURE.convert("L").convert("F"), GREY_RGB),
    ("16-bit PNG file", lambda tmp: _file(Image.fromarray(GREY.astype(np.uint16) * 257), tmp), GREY_RGB),
    ("RGB PNG file", lambda tmp: _file(PICTURE, tmp), PICTURE),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("form", "build", "reference"), FORMS, ids=[f[0] for f in FORMS])
def test_every_image_form_gives_the_pixel_values_of_its_8bit_picture(family, form, build, reference, tmp_path):
    model = wrapped(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PyTorch's "not writable" warning for read-only numpy arrays
        got = pixels(model, build(tmp_path))
    assert torch.equal(got, reference_pixels(family, reference)), form


@pytest.mark.parametrize("family", FAMILIES)
def test_a_list_mixing_forms_is_each_image_by_the_rule(family, tmp_path):
    model = wrapped(family)
    other = sample_image(40, 32, seed=5)
    mixed = [
        PICTURE,
        np.asarray(other).astype(np.float32) / 255,
        torch.from_numpy(ARRAY.copy()).permute(2, 0, 1),
        Image.fromarray(GREY.astype(np.uint16) * 257),
        _file(other, tmp_path),
    ]
    assert torch.equal(pixels(model, mixed), pixels(model, [PICTURE, other, PICTURE, GREY_RGB, other]))


@pytest.mark.parametrize("family", FAMILIES)
def test_float_images_are_not_rescaled_twice(family):
    """The defect this fixes: float [0, 1] arrays reached the model rescaled by 1/255 again (all near black)."""
    model = wrapped(family)
    got, reference = pixels(model, ARRAY.astype(np.float32) / 255), reference_pixels(family, PICTURE)
    assert got.std() > 0.5 * reference.std()
    assert torch.equal(got, reference)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda: np.where(np.arange(3) == 1, np.nan, ARRAY / 255.0), "image 1\\b.*non-finite"),
        (
            lambda: Image.fromarray(np.where(GREY > 100, np.inf, GREY / 255.0).astype(np.float32)),
            "image 1\\b.*non-finite",
        ),
        (lambda: ARRAY.astype(np.float32), r"image 1\b.*\[0, 1\]"),  # 0-255 floats: a clear error, not a guess
        (lambda: ARRAY.astype(np.float32) / 255 - 0.5, r"image 1\b.*\[0, 1\]"),
        (lambda: Image.fromarray((GREY.astype(np.int32) - 1) * 70000), "image 1\\b.*integer"),
        (lambda: ARRAY > 100, "image 1\\b.*bool"),
    ],
    ids=["numpy NaN", "PIL F inf", "float 0-255", "float negative", "PIL I beyond 16 bits", "bool array"],
)
def test_bad_pixels_name_the_image(family, bad, message):
    model = wrapped(family)
    with pytest.raises((ValueError, TypeError), match=message):
        pixels(model, [PICTURE, bad()])


@pytest.mark.parametrize("family", FAMILIES)
def test_ready_pixel_values_that_look_like_raw_pixels_warn(family):
    """A float tensor is taken as ready pixel values; a torchvision ``ToTensor`` batch (every value in [0, 1])
    warns and says how to pass raw images. Normalised pixel values (which have negatives) do not warn."""
    model = wrapped(family)
    ready = pixels(model, PICTURE)
    try:
        model.prepare_inputs(ready)
    except TypeError as error:  # this family needs more than pixel_values (image sizes, expanded image tokens)
        assert "processor" in str(error)
        with pytest.raises(TypeError, match="processor"):
            model.prepare_inputs(ready.clamp(0, 1))
        return
    to_tensor = torch.from_numpy(np.array(PICTURE.resize(ready.shape[-1:-3:-1]))).permute(2, 0, 1)[None] / 255
    with pytest.warns(RawPixelsWarning, match=r"uint8.*\* 255"):
        passed = model.prepare_inputs(to_tensor).kwargs["pixel_values"]
    assert torch.equal(passed, to_tensor)  # still used as given: the warning changes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.prepare_inputs(ready).kwargs["pixel_values"], ready)
        # the hint of the warning works: the same batch as uint8 is preprocessed as raw images
        raw = (to_tensor * 255).round().to(torch.uint8)
        assert torch.equal(pixels(model, raw), pixels(model, PICTURE.resize(ready.shape[-1:-3:-1])))


def test_pixel_tensor_checks():
    ready = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pixel_tensor(ready) is ready
        assert pixel_tensor(torch.full((3, 8, 8), -0.5)).shape == (1, 3, 8, 8)
        pixel_tensor(torch.zeros(1, 3, 8, 8))  # a constant placeholder says nothing about its scale
    with pytest.warns(RawPixelsWarning):
        pixel_tensor(torch.rand(3, 8, 8))
    ready[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"image \[1\].*non-finite"):
        pixel_tensor(ready)
    with pytest.raises(TypeError, match="ready pixel_values"):
        wrapped("clip").prepare_inputs([PICTURE, torch.rand(3, 32, 32)])


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"])
def test_a_bare_image_processor_is_the_processor(kind):
    raw, processor = tiny_clip(kind)
    full = HookedVLM.from_hf(raw, processor)
    bare = HookedVLM.from_hf(raw, processor.image_processor)
    assert torch.equal(pixels(bare, [PICTURE, ARRAY / 255.0]), pixels(full, [PICTURE, PICTURE]))
    assert torch.equal(bare(PICTURE), full(PICTURE))
    if kind == "CLIPModel":
        with pytest.raises(TypeError, match="tokenizer"):
            bare(PICTURE, text="a sunset")
        text_only = HookedVLM.from_hf(raw, processor.tokenizer)  # and the other half alone, for text
        assert torch.equal(text_only(text="a sunset"), full(text="a sunset"))
        with pytest.raises(TypeError, match="image processor"):
            text_only(PICTURE)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_with_only_an_image_processor_says_what_is_missing(family):
    model, processor = TINY_MODELS[family]()
    image_processor = getattr(processor, "image_processor", None)
    if isinstance(processor, tuple):  # open_clip: the processor is (preprocess, tokenizer)
        preprocess, _ = processor
        bare = HookedVLM.from_hf(model, preprocess)
        assert torch.equal(pixels(bare, PICTURE), pixels(wrapped(family), PICTURE))
        with pytest.raises(TypeError, match="tokenizer"):
            bare(text="a sunset")
        return
    bare = HookedVLM.from_hf(model, image_processor or processor)  # DINOv2 ships a bare image processor itself
    if takes_prompt(bare):
        with pytest.raises(TypeError, match="tokenizer"):
            bare.prepare_inputs(PICTURE, prompt="What is in the picture?")
    else:
        assert torch.equal(pixels(bare, PICTURE), pixels(wrapped(family), PICTURE))
        # text needs a tokenizer, or (a vision tower alone) a text tower
        with pytest.raises(TypeError, match="tokenizer" if bare.adapter.has_text_tower else "text"):
            bare(PICTURE, text="a sunset")
