"""Figures people can read: heatmaps beside the image (never blended into it), signed values on a diverging map
centred on 0, readouts labelled with the words the user typed, and scans that print a summary."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.plotting import head_grid, layer_heatmaps, layer_position_grid, patch_heatmap, patch_tokens
from hooked_vlm.readouts import LogitDiff, TokenProbability
from hooked_vlm.testing import tiny_llava_onevision


def _images(fig) -> list:
    return [image for ax in fig.axes for image in ax.get_images()]


def _heat(fig):
    """The figure's (last) colour-mapped image: a 2-D array, unlike the RGB picture drawn beside it."""
    return [image for image in _images(fig) if image.get_array().ndim == 2][-1]


def _panel_pixels(fig, path, ax) -> np.ndarray:
    png = matplotlib.image.imread(path)[..., :3]
    box = ax.get_window_extent()
    top, bottom = png.shape[0] - int(box.y1), png.shape[0] - int(box.y0)
    return png[top + 3 : bottom - 3, int(box.x0) + 3 : int(box.x1) - 3]


def test_patch_heatmap_shows_the_picture_unblended_beside_an_opaque_map(tmp_path):
    green = Image.new("RGB", (40, 40), (0, 160, 0))
    path = tmp_path / "heat.png"
    fig = patch_heatmap(green, torch.arange(4.0).view(2, 2), path)
    images = _images(fig)
    assert len(images) == 2 and all(image.get_alpha() in (None, 1.0) for image in images)
    picture = next(ax for ax in fig.axes if ax.get_title() == "image")
    # the picture's own colour, not a mix with the colour map's
    assert np.allclose(_panel_pixels(fig, path, picture).reshape(-1, 3).mean(0), (0, 160 / 255, 0), atol=0.02)


def test_signed_values_get_a_diverging_map_centred_on_zero(tmp_path):
    signed = torch.tensor([[-0.2, 0.05], [0.1, 0.21]])
    figures = [
        head_grid(signed, tmp_path / "heads.png"),
        layer_position_grid(signed, tmp_path / "grid.png", ["0", "1"], ["a", "b"]),
        patch_heatmap(Image.new("RGB", (8, 8)), signed, tmp_path / "heat.png"),
        layer_heatmaps(Image.new("RGB", (8, 8)), signed[None], tmp_path / "layers.png", ["layer 0"]),
        patch_tokens(Image.new("RGB", (8, 8)), [["a", "b"], ["c", "d"]], signed, tmp_path / "tokens.png"),
    ]
    for fig in figures:
        heat = _heat(fig)
        assert heat.cmap.name == "RdBu_r" and heat.norm.vmin == -heat.norm.vmax == pytest.approx(-0.21)
    # a signed quantity whose values happen to be all positive still reads on the same centred scale
    for fig in (
        head_grid(torch.tensor([[0.1, 0.3]]), tmp_path / "pos.png", signed=True),
        patch_heatmap(Image.new("RGB", (8, 8)), torch.tensor([[0.1, 0.3]]), tmp_path / "pos_heat.png", signed=True),
    ):
        heat = _heat(fig)
        assert heat.cmap.name == "RdBu_r" and heat.norm.vmin == -heat.norm.vmax == pytest.approx(-0.3)
    # and a non-negative one (norms, attention) keeps a sequential map over its own range
    heat = _heat(head_grid(torch.tensor([[0.1, 0.3]]), tmp_path / "share.png"))
    assert heat.cmap.name == "viridis" and (heat.norm.vmin, heat.norm.vmax) == pytest.approx((0.1, 0.3))


def test_head_grid_writes_dark_text_on_light_cells_of_a_diverging_map(tmp_path):
    fig = head_grid(torch.tensor([[-1.0, 0.0, 1.0]]), tmp_path / "heads.png")
    colours = [text.get_color() for text in fig.axes[0].texts]
    assert colours == ["white", "black", "white"]  # RdBu_r: dark blue, near-white, dark red


def test_readouts_are_labelled_with_the_words_not_the_ids():
    model = HookedVLM.from_hf(*tiny_llava_onevision())
    tokenizer = model.processor.tokenizer
    a, b, c = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("A", "B", "C"))
    assert repr(LogitDiff("A", "B", tokenizer=model)) == "LogitDiff('A' vs 'B', last token)"
    assert repr(LogitDiff("A", ["B", "C"], tokenizer=model, reduce="mean")) == "LogitDiff('A' vs mean of ['B', 'C'], last token)"
    assert repr(TokenProbability(["A", "B"], tokenizer=model, position=-2, log=True)) == "TokenProbability(['A', 'B'], position -2, log)"
    # ids with a tokenizer decode to their words; without one they stay ids
    assert repr(LogitDiff(a, b, tokenizer=model)) == "LogitDiff('A' vs 'B', last token)"
    assert repr(LogitDiff(a, c)) == f"LogitDiff({a} vs {c}, last token)"


def test_printing_a_feature_scan_shows_a_summary_not_its_tensors():
    from hooked_vlm.sae.features import FeatureScan
    from hooked_vlm.sae.harvesting import ImageSource

    d_sae, k = 500, 8
    fired = torch.zeros(d_sae, dtype=torch.long)
    fired[:3] = torch.tensor([90, 5, 1])  # feature 0 fires on 90 % of the 100 rows; 497 features never fire
    top_values = torch.zeros(d_sae, k)
    top_values[:3, 0] = torch.tensor([1.0, 7.0, 3.0])
    scan = FeatureScan(
        model_name="clip", hook_name="vision.blocks.1.hook_resid_post", positions="patches", prompt=None,
        source=ImageSource([f"img{i}" for i in range(10)], "10 images", lambda a, b: []), n_rows=100, fired=fired,
        activation_sum=fired.float(), top_values=top_values, top_images=torch.zeros(d_sae, k, dtype=torch.long),
        top_patches=torch.zeros(d_sae, k, 3, dtype=torch.long),
    )
    text = repr(scan)
    assert text == (
        "FeatureScan(clip, vision.blocks.1.hook_resid_post, positions='patches', 10 images, 100 rows, d_sae=500, "
        "top 8 per feature; dead 497, median density 0, dense (> 10%) 1; strongest features [1, 2, 0])"
    )
    assert "tensor" not in text and str(scan) == text
