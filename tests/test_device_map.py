"""Models spread by accelerate (``device_map``, offloading) against the same model left whole.

No GPU here, but accelerate's machinery is the same on the CPU: a map over ``"cpu"`` and ``"disk"`` wraps the
forward of every placed module in an ``AlignDevicesHook``, keeps offloaded weights on the meta device between
calls and moves activations at every module boundary, as a map over several GPUs does (that one runs in
tests/test_multi_gpu.py). The maps here place every block and projector stage on its own, offloading every third;
``accelerate.cpu_offload`` leaves no weight outside the meta device at all.

References: a deep copy of the model taken before it was dispatched, under the same hooks (its own hooks are
checked against plain PyTorch hooks in the per-family tests), and the raw Hugging Face forward.
"""

from __future__ import annotations

import copy

import accelerate
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_vlm import HookedVLM
from hooked_vlm.lens import logit_lens
from hooked_vlm.patching import ablation_hooks, activation_patching, knockout_hooks
from hooked_vlm.readouts import LogitDiff
from hooked_vlm.steering import SteeringVector, steer
from hooked_vlm.taps import current_device
from hooked_vlm.testing import TINY_MODELS, alternating_device_map, dispatch, sample_image

PROMPT = "Describe the image."
CLEAN, CORRUPTED = sample_image(seed=0), sample_image(seed=3)  # same size: same token layout
READOUT = LogitDiff(5, 7)


def dispatched(family: str, placement: str, offload_dir) -> tuple[HookedVLM, HookedVLM]:
    """``(whole, spread)``: the same tiny model left as built, and spread by accelerate."""
    raw, processor = TINY_MODELS[family]()
    whole = HookedVLM.from_hf(copy.deepcopy(raw), processor)
    if placement == "alternating":
        # every unit is placed and hooked; every third one offloaded (reading weights from disk is slow on the CPU)
        dispatch(raw, alternating_device_map(raw, ["disk", "cpu", "cpu"]), offload_dir=str(offload_dir))
    else:
        accelerate.cpu_offload(raw, execution_device="cpu")
    return whole, HookedVLM.from_hf(raw, processor)


FAMILIES = ("llava_onevision", "qwen2_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    return dispatched(request.param, "alternating", tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module", params=[(f, p) for f in FAMILIES for p in ("alternating", "cpu_offload")],
                ids=lambda param: "-".join(param))
def any_pair(request, tmp_path_factory):
    """Both placements; the cheap checks run on both, the sweeps on the alternating map only."""
    return dispatched(*request.param, tmp_path_factory.mktemp("offload"))


def offloaded(model: HookedVLM) -> set[str]:
    return {name for name, p in model.raw_model.named_parameters() if p.device.type == "meta"}


def forwards(model: HookedVLM) -> dict[str, object]:
    """Each module's instance ``forward`` (accelerate's wrapper where it placed one)."""
    return {name: m.__dict__.get("forward") for name, m in model.raw_model.named_modules()}


def test_weights_are_offloaded_and_inputs_go_to_the_execution_device(any_pair):
    _, spread = any_pair
    assert offloaded(spread), "the map offloads nothing: it would not exercise accelerate's hooks"
    assert hasattr(spread.raw_model, "_hf_hook")
    assert current_device(spread.raw_model) == torch.device("cpu")  # not the meta device of the first weight
    prepared = spread.prepare_inputs(CLEAN, prompt=PROMPT)
    assert {v.device.type for v in prepared.kwargs.values() if isinstance(v, torch.Tensor)} == {"cpu"}


def test_outputs_and_every_cached_hook_equal_the_whole_model(any_pair):
    whole, spread = any_pair
    prepared = whole.prepare_inputs(CLEAN, prompt=PROMPT)
    with torch.no_grad():
        reference = whole.raw_model(**prepared.kwargs).logits
        assert torch.equal(spread(prepared), reference)
        # every canonical hook: vision, projector, LM (attention patterns are recomputed eagerly: not the sdpa logits)
        logits, cache = spread.run_with_cache(prepared)
        expected_logits, expected = whole.run_with_cache(prepared)
    assert torch.equal(logits, expected_logits)
    assert cache.keys() == expected.keys() and len(cache) == len(whole.hook_names())
    for name in expected.keys():
        assert torch.equal(cache[name], expected[name]), name
    _, on_cpu = spread.run_with_cache(prepared, names_filter="lm.blocks.*.hook_resid_post", device="cpu",
                                      dtype=torch.float64)
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in on_cpu.values())


def test_steering_and_hook_edits_equal_the_whole_model(pair):
    whole, spread = pair
    d_lm = whole.adapter.towers()[1].d_model
    d_vision = whole.adapter.towers()[0].d_model
    generator = torch.Generator().manual_seed(0)
    vectors = [
        SteeringVector.from_tensor("lm.blocks.1.hook_resid_mid", torch.randn(d_lm, generator=generator), scale=4.0,
                                   positions="image"),
        SteeringVector.from_tensor("vision.blocks.1.hook_resid_pre", torch.randn(d_vision, generator=generator)),
    ]
    prepared = whole.prepare_inputs(CLEAN, prompt=PROMPT)
    with torch.no_grad():
        plain = whole(prepared)
        with steer(whole, vectors):
            expected = whole(prepared)
        with steer(spread, vectors):
            steered = spread(prepared)
        # mean ablation of the image tokens and an image → last token knockout, one run
        edits = [*ablation_hooks(whole, prepared, "lm.blocks.0.hook_mlp_out"),
                 *knockout_hooks(whole, prepared, source="image", target=-1, layers=[1])]
        edited = whole.run_with_hooks(prepared, fwd_hooks=edits)
        edits = [*ablation_hooks(spread, prepared, "lm.blocks.0.hook_mlp_out"),
                 *knockout_hooks(spread, prepared, source="image", target=-1, layers=[1])]
        assert torch.equal(spread.run_with_hooks(prepared, fwd_hooks=edits), edited)
    assert not torch.equal(expected, plain) and not torch.equal(edited, plain)
    assert torch.equal(steered, expected)


def test_activation_patching_equals_the_whole_model(pair):
    whole, spread = pair
    # two positions × two layers in batches of three: the second batch replays block 0 (reuse_prefix) by
    # shadowing accelerate's own wrapper of its forward, which must come back afterwards
    options = dict(positions=[-2, -1], prompt=PROMPT, batch_size=3, progress=False)
    before = forwards(spread)
    lm = activation_patching(spread, CLEAN, CORRUPTED, READOUT, "lm.blocks.*.hook_resid_post", **options)
    expected = activation_patching(whole, CLEAN, CORRUPTED, READOUT, "lm.blocks.*.hook_resid_post", **options)
    assert forwards(spread) == before
    assert torch.equal(lm.values, expected.values) and lm.clean_value == expected.clean_value
    assert not torch.equal(lm.values, torch.full_like(lm.values, lm.base_value))
    vision = activation_patching(spread, CLEAN, CORRUPTED, READOUT, "vision.blocks.*.hook_resid_post", prompt=PROMPT,
                                 progress=False)
    expected = activation_patching(whole, CLEAN, CORRUPTED, READOUT, "vision.blocks.*.hook_resid_post", prompt=PROMPT,
                                   progress=False)
    assert torch.equal(vision.values, expected.values)


def test_sae_splice_equals_the_whole_model(pair):
    whole, spread = pair
    hook = "lm.blocks.0.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=whole.adapter.towers()[1].d_model, d_sae=64,
                                        metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        prepared = whole.prepare_inputs(CLEAN, prompt=PROMPT)
        expected = whole.run_with_saes(prepared, saes=[sae])
        assert torch.equal(spread.run_with_saes(prepared, saes=[sae]), expected)
        assert not torch.equal(expected, whole(prepared))


def test_early_stop_leaves_no_weight_loaded_and_no_hook_behind(any_pair, hook_counts):
    whole, spread = any_pair
    prepared = whole.prepare_inputs(CLEAN, prompt=PROMPT)
    meta, hooks, forward = offloaded(spread), hook_counts(spread.raw_model), forwards(spread)
    names = ["vision.blocks.0.hook_resid_post", "projector.hook_out"]
    with torch.no_grad():
        output, cache = spread.run_with_cache(prepared, names_filter=names)
        _, expected = whole.run_with_cache(prepared, names_filter=names)
        assert output is None and all(torch.equal(cache[n], expected[n]) for n in names)
        # The stop leaves accelerate's forwards it interrupts before they offload again: only weights held directly
        # by such a module stay loaded until its next call, i.e. LLaVA-OneVision's image_newline (one vector).
        assert meta - offloaded(spread) <= {"model.image_newline"}
        assert hook_counts(spread.raw_model) == hooks and forwards(spread) == forward
        assert torch.equal(spread(prepared), whole.raw_model(**prepared.kwargs).logits)


def test_logit_lens_equals_the_whole_model(pair):
    # the lens calls the final norm and lm_head itself, outside the forward: accelerate's wrappers place them
    whole, spread = pair
    lens = logit_lens(spread, CLEAN, prompt=PROMPT, words=[5, 7])
    expected = logit_lens(whole, CLEAN, prompt=PROMPT, words=[5, 7])
    assert torch.equal(lens.top_ids, expected.top_ids) and torch.equal(lens.word_probs, expected.word_probs)


def test_generate_equals_the_whole_model(pair):
    whole, spread = pair
    options = dict(prompt=PROMPT, max_new_tokens=3, do_sample=False)
    vector = SteeringVector.from_tensor("lm.blocks.0.hook_resid_post", torch.ones(whole.adapter.towers()[1].d_model))
    with torch.no_grad(), steer(whole, vector):
        expected = whole.generate(CLEAN, **options, cache_names="lm.blocks.1.hook_resid_post")
    with torch.no_grad(), steer(spread, vector):
        generated = spread.generate(CLEAN, **options, cache_names="lm.blocks.1.hook_resid_post", cache_device="cpu")
    assert torch.equal(generated.sequences, expected.sequences)
    steps = generated.step_cache["lm.blocks.1.hook_resid_post"]
    assert len(steps) == 3 and all(torch.equal(a, b) for a, b in zip(steps, expected.step_cache["lm.blocks.1.hook_resid_post"], strict=True))


def test_from_pretrained_with_a_device_map(tmp_path):
    raw, processor = TINY_MODELS["llava_onevision"]()
    raw.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # a CPU budget smaller than the model: "auto" keeps the first modules on the CPU and offloads the rest to disk
    spread = HookedVLM.from_pretrained(
        str(tmp_path), device_map="auto", max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "offload")
    )
    assert {"cpu", "disk"} <= set(spread.raw_model.hf_device_map.values()) and offloaded(spread)
    on_cpu = HookedVLM.from_pretrained(str(tmp_path), device_map="cpu")
    names = ["vision.blocks.1.hook_resid_post", "projector.hook_packed", "lm.blocks.1.hook_resid_mid"]
    prepared = spread.prepare_inputs(CLEAN, prompt=PROMPT)  # the loaded processor (it may differ from the in-memory one)
    with torch.no_grad():
        reference = raw(**prepared.kwargs).logits
        for model in (spread, on_cpu):
            logits, cache = model.run_with_cache(prepared, names_filter=names, stop_early=False)
            _, expected = HookedVLM.from_hf(raw, processor).run_with_cache(prepared, names_filter=names)
            assert torch.equal(logits, reference)
            assert all(torch.equal(cache[n], expected[n]) for n in names)


def test_open_clip_takes_no_device_map():
    with pytest.raises(ValueError, match="open_clip models load on one device"):  # before any download
        HookedVLM.from_pretrained("open_clip:ViT-L-14/openai", device_map="auto")


def test_dispatch_by_strategy(tmp_path):
    raw, processor = TINY_MODELS["llava_onevision"]()
    whole = HookedVLM.from_hf(copy.deepcopy(raw), processor)
    with pytest.raises(ValueError, match="device_map must be one of"):
        dispatch(raw, "everywhere")
    dispatch(raw, "sequential", max_memory={"cpu": 60_000}, offload_dir=str(tmp_path))
    assert "disk" in raw.hf_device_map.values()
    spread = HookedVLM.from_hf(raw, processor)
    prepared = whole.prepare_inputs(CLEAN, prompt=PROMPT)
    with torch.no_grad():
        assert torch.equal(spread(prepared), whole(prepared))
