"""Loading in worker processes (hooked_vlm.sae.pipeline): the same rows, provenance and order as one thread.

Reference: the single-thread path (``workers=0``, itself checked against ``run_with_cache`` in
test_sae_harvest.py), over the same sources, for each family's own processor (CLIP and open_clip transforms,
LLaVA-OneVision's anyres tiling, Qwen2-VL's dynamic resolution). Two workers and a few images keep it fast.
"""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.sae import ActivationStore, harvest, harvest_to_store
from hooked_vlm.sae.pipeline import _Forwards, default_workers
from hooked_vlm.testing import sample_image, tiny_clip, tiny_llava_onevision, tiny_open_clip, tiny_qwen2_vl

FAMILIES = {
    "clip": (tiny_clip, ["vision.blocks.0.hook_resid_post", "hook_image_embeds"], None),
    "open_clip": (tiny_open_clip, ["vision.blocks.1.hook_resid_post"], None),
    "llava_onevision": (tiny_llava_onevision, ["vision.blocks.0.hook_resid_post", "lm.blocks.0.hook_resid_post"], "Hi"),
    "qwen2_vl": (tiny_qwen2_vl, ["vision.blocks.0.hook_resid_post", "lm.blocks.0.hook_resid_post"], "Hi"),
}


def pictures(n=5):
    # other sizes per image: other tilings (LLaVA-OneVision) and patch counts (Qwen2-VL), prompts of other lengths
    return [sample_image(width=48 + 16 * (i % 3), height=48 + 8 * (i % 2), seed=i) for i in range(n)]


def assert_same_batches(one, many, hooks):
    assert [(b.start, b.stop) for b in one] == [(b.start, b.stop) for b in many]
    for a, b in zip(one, many, strict=True):
        for hook in hooks:
            assert torch.equal(a.acts[hook], b.acts[hook]), hook
            assert torch.equal(a.index[hook], b.index[hook]), hook


@pytest.mark.parametrize("family", FAMILIES)
def test_workers_give_the_rows_of_one_thread_in_order(family):
    factory, hooks, prompt = FAMILIES[family]
    model = HookedVLM.from_hf(*factory())
    images = pictures()
    one = list(harvest(model, images, hooks, prompt=prompt, batch_size=2, progress=False, workers=0))
    many = list(harvest(model, images, hooks, prompt=prompt, batch_size=2, progress=False, workers=2))
    assert len(many) == 3
    assert_same_batches(one, many, hooks)


def test_folders_datasets_and_stores_through_workers(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = HookedVLM.from_hf(*tiny_clip())
    hooks = ["vision.blocks.0.hook_resid_post"]
    images = pictures(5)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")  # lossless: the same pixels come back
    table = datasets.Dataset.from_dict({"picture": images}).cast_column("picture", datasets.Image())
    reference = list(harvest(model, images, hooks, batch_size=2, progress=False))
    for source in (tmp_path, table):
        assert_same_batches(reference, list(harvest(model, source, hooks, batch_size=2, progress=False, workers=2)),
                            hooks)
    # a store through workers, resumed from the middle: the rows of a one-thread store, each image once
    one = harvest_to_store(model, images, hooks, tmp_path / "one", batch_size=2, shard_mb=0.002, progress=False)
    many = harvest_to_store(model, tmp_path, hooks, tmp_path / "many", batch_size=2, shard_mb=0.002, progress=False,
                            workers=2)
    assert many.n_shards == one.n_shards > 1
    assert torch.equal(many.read(hooks[0]), one.read(hooks[0]))
    assert torch.equal(many.index(hooks[0]), one.index(hooks[0]))
    assert ActivationStore(tmp_path / "many").image_ids == [f"{i}.png" for i in range(5)]


def test_items_are_built_only_in_workers_and_the_default_leaves_a_core():
    model = HookedVLM.from_hf(*tiny_clip())
    from hooked_vlm.sae.harvesting import image_source

    with pytest.raises(RuntimeError, match="DataLoader workers"):
        _Forwards(model, image_source(pictures(2)), None, [(0, 2)])[0]
    assert 0 <= default_workers() <= 32
