"""Compiled harvest: truncated, compiled tower forward with the taps inside, against run_with_cache."""

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.compiled import CompiledHarvest
from hooked_vlm.testing import sample_image, tiny_clip, tiny_open_clip

NAMES = ["vision.blocks.0.hook_resid_post", "vision.blocks.0.attn.hook_z", "vision.blocks.0.mlp.hook_post"]


def blocks_of(raw):
    return raw.vision_model.encoder.layers if hasattr(raw, "vision_model") else raw.visual.transformer.resblocks


@pytest.mark.parametrize("factory", [tiny_clip, tiny_open_clip])
def test_compiled_harvest_equals_run_with_cache_and_restores(factory, hook_counts):
    raw, processor = factory()
    model = HookedVLM.from_hf(raw, processor)
    images = [sample_image(seed=i) for i in range(3)]
    before = hook_counts(raw)
    with torch.no_grad():
        _, reference = model.run_with_cache(images, names_filter=NAMES)
        _, reference_two = model.run_with_cache(images[:2], names_filter=NAMES)
    ran = []
    probe = blocks_of(raw)[1].register_forward_pre_hook(lambda m, a: ran.append(1))  # the block after the last hook
    try:
        with CompiledHarvest(model, NAMES, compile_kwargs={"backend": "eager", "mode": None}) as harvest:
            assert len(blocks_of(raw)) == 1  # truncated after block 0
            first, second = harvest(images), harvest(images[:2], positions="patches")
    finally:
        probe.remove()
    assert ran == []
    for name in NAMES:
        assert torch.equal(first[name], reference[name])
    # the short batch ran padded to the compiled size: another batch size, so float-close rather than bit-equal
    torch.testing.assert_close(second[NAMES[0]], reference_two[NAMES[0]][:, 1:], atol=1e-6, rtol=1e-6)
    assert len(blocks_of(raw)) == 2 and hook_counts(raw) == before
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_compiled_harvest_with_inductor_matches():
    raw, processor = tiny_clip()
    model = HookedVLM.from_hf(raw, processor)
    images = [sample_image(seed=i) for i in range(2)]
    with torch.no_grad():
        _, reference = model.run_with_cache(images, names_filter=NAMES[0])
    with CompiledHarvest(model, NAMES[:1], compile_kwargs={"mode": "default"}) as harvest:
        out = harvest(images)[NAMES[0]]
    torch.testing.assert_close(out, reference[NAMES[0]], atol=1e-5, rtol=1e-5)


def test_compiled_harvest_refuses_two_towers_and_use_outside_with():
    raw, processor = tiny_clip()
    model = HookedVLM.from_hf(raw, processor)
    with pytest.raises(ValueError, match="one tower"):
        CompiledHarvest(model, ["vision.blocks.0.hook_resid_post", "text.blocks.0.hook_resid_post"])
    with pytest.raises(RuntimeError, match="context manager"):
        CompiledHarvest(model, NAMES)(sample_image())


def test_attention_backends_pick_the_kernel():
    from torch.nn.attention import SDPBackend

    raw, processor = tiny_clip()
    model = HookedVLM.from_hf(raw, processor)
    images = [sample_image(seed=i) for i in range(2)]
    with torch.no_grad():
        _, reference = model.run_with_cache(images, names_filter=NAMES[0])
    with CompiledHarvest(model, NAMES[:1], compile_kwargs={"backend": "eager", "mode": None},
                         attention_backends=[SDPBackend.MATH]) as harvest:
        torch.testing.assert_close(harvest(images)[NAMES[0]], reference[NAMES[0]], atol=1e-5, rtol=1e-5)
    with CompiledHarvest(model, NAMES[:1], compile_kwargs={"backend": "eager", "mode": None},
                         attention_backends=[SDPBackend.CUDNN_ATTENTION]) as harvest:
        with pytest.raises(RuntimeError, match="No viable backend"):  # no cuDNN kernel on the CPU
            harvest(images)


def test_a_short_last_batch_is_padded_not_recompiled(caplog):
    raw, processor = tiny_clip()
    model = HookedVLM.from_hf(raw, processor)
    images = [sample_image(seed=i) for i in range(3)]
    with torch.no_grad():
        _, reference = model.run_with_cache(images[:2], names_filter=NAMES)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()  # they count across the process, and earlier tests compiled too

    with caplog.at_level("INFO", logger="hooked_vlm.compiled"):
        with CompiledHarvest(model, NAMES, compile_kwargs={"backend": "eager", "mode": None}) as harvest:
            harvest(images)  # compiled for batches of 3
            graphs = counters["stats"]["unique_graphs"]
            assert not counters["graph_break"] and graphs == 1, f"{graphs} graphs, breaks: {dict(counters['graph_break'])}"
            short = harvest(images[:2])  # padded to 3: no new graph
            patches = harvest(images[:1], positions="patches")
            assert counters["stats"]["unique_graphs"] == graphs
    assert harvest.batch == 3 and harvest.compile_s is not None and harvest.compile_s > 0
    assert "first call" in caplog.text and "compiling included" in caplog.text
    for name in NAMES:
        assert short[name].shape[0] == 2
        torch.testing.assert_close(short[name], reference[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(patches[NAMES[0]], reference[NAMES[0]][:1, 1:], atol=1e-6, rtol=1e-6)
