"""Activation harvesting, checked against independent references.

References: ``run_with_cache`` of the same images built with each adapter's own input conventions (one prompt
per image for VLMs), positions computed by hand from the CLIP patch grid and from ``input_ids`` /
``attention_mask`` of the processor outputs, the model's own output for pooled hooks, and a forward hook on
the wrapped LM module (to prove an early stop).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.sae import activation_stream, harvest, image_source
from hooked_vlm.testing import TINY_MODELS, sample_image

PROMPT = "What is in the picture?"
GRID = 4  # tiny CLIP: 32 px images, 8 px patches, 1 CLS + 4 × 4 patches
CHECKER = (torch.arange(GRID)[:, None] + torch.arange(GRID)[None, :]) % 2 == 0


@pytest.fixture(scope="module")
def models():
    return {name: HookedVLM.from_hf(*factory()) for name, factory in TINY_MODELS.items()}


def images(n=5):
    # different aspect ratios: VLM prompts of a batch get different lengths (left padding), LLaVA different tilings
    return [sample_image(width=64 + 24 * (i % 3), height=64, seed=i) for i in range(n)]


def reference(model, batch, hook):
    """``cache[hook]`` and the processor outputs of one batch, built the way each adapter documents."""
    if model.adapter.family in ("clip", "open_clip"):
        prepared = model.prepare_inputs(batch)
    else:
        prepared = model.prepare_inputs([[image] for image in batch], prompt=[PROMPT] * len(batch))
    with torch.no_grad():  # as harvesting runs (without grad, open_clip takes PyTorch's fused attention path)
        _, cache = model.run_with_cache(prepared, names_filter=[hook])
    return cache[hook], prepared.kwargs


def clip_positions(selector, batch):
    """Hand-computed (batch row, position) pairs of a CLIP vision sequence: position 0 is CLS, 1 + r·4 + c a patch."""
    per_row = {
        "all": list(range(1 + GRID * GRID)),
        "cls": [0],
        "patches": list(range(1, 1 + GRID * GRID)),
        "mask": [1 + r * GRID + c for r in range(GRID) for c in range(GRID) if CHECKER[r, c]],
        "callable": [1 + 2 * GRID + c for c in range(GRID)],  # row 2
    }[selector]
    return [(b, p) for b in range(batch) for p in per_row]


def lm_positions(selector, kwargs, image_token):
    """Hand-computed (batch row, position) pairs of an LM sequence from the processor's ids and mask."""
    ids, attention = kwargs["input_ids"].cpu(), kwargs["attention_mask"].cpu().bool()
    picked = {"all": attention, "text": attention & (ids != image_token), "image+newline": ids == image_token}[selector]
    return [tuple(x) for x in picked.nonzero().tolist()]


SELECTORS = {"mask": CHECKER, "callable": lambda layout: layout["vision"].row == 2}

CASES = [
    ("clip", "vision.blocks.1.hook_resid_post", sel) for sel in ("all", "cls", "patches", "mask", "callable")
] + [
    ("clip", "vision.blocks.0.attn.hook_z", "patches"),
    ("open_clip", "vision.blocks.1.hook_resid_post", "all"),
    ("open_clip", "vision.blocks.0.hook_mlp_out", "patches"),
    ("llava_onevision", "vision.blocks.1.hook_resid_post", "patches"),
    ("llava_onevision", "lm.blocks.1.hook_resid_post", "all"),
    ("llava_onevision", "lm.blocks.1.hook_resid_post", "text"),
    ("llava_onevision", "lm.blocks.0.attn.hook_z", "image+newline"),
    ("qwen2_vl", "vision.blocks.1.hook_resid_post", "patches"),
    ("qwen2_vl", "lm.blocks.1.hook_resid_post", "text"),
    ("qwen2_vl", "lm.blocks.0.hook_mlp_out", "image"),
]


@pytest.mark.parametrize("family, hook, selector", CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_harvested_rows_equal_run_with_cache(models, family, hook, selector):
    model = models[family]
    vlm = family not in ("clip", "open_clip")
    positions = SELECTORS.get(selector, selector)
    if selector == "image+newline":  # LLaVA: the image tokens of input_ids are image and newline positions
        positions = {"image": "image", "newline": "newline"}
    batches = {}
    for sel in positions.values() if isinstance(positions, dict) else [positions]:
        for batch in harvest(model, images(), hook, positions=sel, prompt=PROMPT if vlm else None, batch_size=2,
                             progress=False):
            batches.setdefault(batch.start, []).append(batch)
    assert sorted(batches) == [0, 2, 4]
    for start, parts in batches.items():
        batch = images()[start : start + 2]
        expected, kwargs = reference(model, batch, hook)
        rows = torch.cat([p.acts[hook] for p in parts])
        index = torch.cat([p.index[hook] for p in parts])
        batch_row, position = index[:, 1], index[:, 2]
        assert torch.equal(rows, expected[batch_row, position].flatten(1))
        assert rows.shape[1] == expected.shape[-1] * (expected.shape[-2] if "hook_z" in hook else 1)
        if family in ("clip", "open_clip"):
            assert sorted(zip(batch_row.tolist(), position.tolist(), strict=True)) == clip_positions(selector, len(batch))
            assert torch.equal(index[:, 0], batch_row + start)
            patches = position > 0
            assert torch.equal(index[patches, 4], (position[patches] - 1) // GRID)  # row
            assert torch.equal(index[patches, 5], (position[patches] - 1) % GRID)  # col
        elif hook.startswith("lm."):
            image_token = model.raw_model.config.image_token_id
            pairs = sorted(zip(batch_row.tolist(), position.tolist(), strict=True))
            if selector == "image":  # Qwen2-VL has no newline tokens
                assert pairs == lm_positions("image+newline", kwargs, image_token)
            else:
                assert pairs == lm_positions(selector, kwargs, image_token)
            assert torch.equal(index[:, 0], batch_row + start)  # one prompt per image
        else:  # vision towers: every patch of every image, images in order
            assert len(rows) == expected.shape[0] * expected.shape[1]
            assert index[:, 0].unique().tolist() == list(range(start, start + len(batch)))


def test_one_forward_feeds_hooks_of_two_towers_with_their_own_selectors(models):
    model = models["llava_onevision"]
    hooks = {"vision.blocks.1.hook_resid_post": "patches", "lm.blocks.1.hook_resid_post": "image"}
    (batch,) = harvest(model, images(2), list(hooks), positions=hooks, prompt=PROMPT, batch_size=2, progress=False)
    for hook in hooks:
        expected, _ = reference(model, images(2), hook)
        index = batch.index[hook]
        assert torch.equal(batch.acts[hook], expected[index[:, 1], index[:, 2]])


def test_vision_hooks_of_a_vlm_never_run_the_language_model(models):
    model = models["llava_onevision"]
    calls = []
    handle = model.raw_model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        list(harvest(model, images(2), "vision.blocks.0.hook_resid_post", positions="patches", batch_size=2,
                     progress=False))
        assert calls == []
        list(harvest(model, images(2), "lm.blocks.0.hook_resid_post", batch_size=2, progress=False))
        assert calls == [1]
    finally:
        handle.remove()


def test_pooled_hooks_give_one_row_per_image(models):
    model = models["clip"]
    (batch,) = harvest(model, images(3), "hook_image_embeds", batch_size=4, progress=False)
    assert torch.equal(batch.acts["hook_image_embeds"], model(images(3)))
    assert batch.index["hook_image_embeds"][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="pooled"):
        list(harvest(model, images(3), "hook_image_embeds", positions="patches", progress=False))


def test_image_sources_folder_dataset_and_list_agree(models, tmp_path):
    datasets = pytest.importorskip("datasets")
    pictures = images(4)
    for i, picture in enumerate(pictures):
        folder = tmp_path / ("b" if i % 2 else "a")
        folder.mkdir(exist_ok=True)
        picture.save(folder / f"{i}.png")  # PNG is lossless: the same pixels come back
    folder = image_source(tmp_path)
    assert folder.ids == ["a/0.png", "a/2.png", "b/1.png", "b/3.png"]
    order = [0, 2, 1, 3]
    table = datasets.Dataset.from_dict({"name": [f"img{i}" for i in order], "picture": [pictures[i] for i in order]})
    table = table.cast_column("picture", datasets.Image())
    dataset = image_source(table, id_column="name")
    assert dataset.ids == ["img0", "img2", "img1", "img3"]
    listed = image_source([pictures[i] for i in order], ids=["x", "y", "z", "w"])

    def rows(source):
        return torch.cat([b.acts["vision.blocks.0.hook_resid_post"] for b in
                          harvest(models["clip"], source, "vision.blocks.0.hook_resid_post", progress=False)])

    assert torch.equal(rows(folder), rows(dataset))
    assert torch.equal(rows(folder), rows(listed))
    assert image_source([tmp_path / "a" / "0.png"]).ids == [str(tmp_path / "a" / "0.png")]


def test_mistakes_raise_before_any_forward(models, monkeypatch):
    model = models["clip"]
    forwards = []
    monkeypatch.setattr(model.adapter, "forward", lambda prepared: forwards.append(1))
    with pytest.raises(ValueError, match="unknown position selector"):
        next(harvest(model, images(), "vision.blocks.0.hook_resid_post", positions="patchs"))
    with pytest.raises(KeyError, match="hook_resid_pots"):
        next(harvest(model, images(), "vision.blocks.0.hook_resid_pots"))
    with pytest.raises(ValueError, match="attention pattern"):
        next(harvest(model, images(), "vision.blocks.0.attn.hook_pattern"))
    with pytest.raises(KeyError, match="no position selector"):
        next(harvest(model, images(), ["vision.blocks.0.hook_resid_post"], positions={"vision.hook_embed": "all"}))
    assert forwards == []
    with pytest.raises(ValueError, match="no image files"):
        image_source(str(Image.__file__).rsplit("/", 1)[0] + "/__pycache__")


def test_activation_stream_loops_over_the_images(models):
    stream = activation_stream(models["clip"], images(3), "vision.blocks.0.hook_resid_post", batch_size=2,
                               dtype=torch.float64, progress=False)
    chunks = [next(stream) for _ in range(4)]  # 2 forwards per pass
    assert [len(c) for c in chunks] == [34, 17, 34, 17]
    assert torch.equal(chunks[0], chunks[2]) and chunks[0].dtype == torch.float64
    stream.close()


def test_compiled_harvest_gives_the_same_rows(models):
    model = models["clip"]
    hooks = ["vision.blocks.0.hook_resid_post", "vision.blocks.0.attn.hook_z"]
    eager = list(harvest(model, images(), hooks, positions="patches", batch_size=2, progress=False))
    # the eager backend checks the plumbing (truncated tower, taps inside the compiled function) without a compiler
    compiled = list(harvest(model, images(), hooks, positions="patches", batch_size=2, progress=False,
                            compiled={"backend": "eager"}))
    for a, b in zip(eager, compiled, strict=True):
        for hook in hooks:
            # a short last batch runs padded to the compiled size: other kernels, so last-bit differences
            torch.testing.assert_close(a.acts[hook], b.acts[hook], rtol=1e-5, atol=1e-6)
            assert torch.equal(a.index[hook], b.index[hook])
    assert len(model.raw_model.vision_model.encoder.layers) == 2  # the tower is whole again
