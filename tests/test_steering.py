"""Steering vectors, SAE feature clamps and sweeps, checked against independent references.

References: PyTorch hooks placed by hand on the Hugging Face modules, HF ``output_hidden_states``, HF ``generate``
without any hook, probe shifts computed by hand (``scale * w · direction``), position indices computed from the
processor's token ids and the patch grid arithmetic (not from the layout), and ``sae.encode`` / ``sae.W_dec``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.readouts import Probe
from hooked_vlm.steering import (
    METADATA_KEY,
    FeatureClamp,
    Patches,
    SteeringVector,
    steer,
    steering_hooks,
    steering_mask,
    sweep,
)
from hooked_vlm.testing import TINY_MODELS, sample_image

PROMPT = "What is in the picture?"
GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
GRID = 4  # tiny CLIP: 32 px images, 8 px patches → 4×4 patches after 1 CLS


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip():
    raw, processor = TINY_MODELS["clip"]()
    return HookedVLM.from_hf(raw, processor)


@pytest.fixture(scope="module")
def llava():
    raw, processor = TINY_MODELS["llava_onevision"]()
    return HookedVLM.from_hf(raw, processor)


@pytest.fixture(scope="module")
def qwen():
    raw, processor = TINY_MODELS["qwen2_vl"]()
    return HookedVLM.from_hf(raw, processor)


@pytest.fixture(scope="module")
def images():
    return [sample_image(seed=0), sample_image(seed=1, width=80, height=120)]


def add_at(module, delta, index=None):
    """A hand-made PyTorch hook adding ``delta`` to a module's output (at ``index`` of ``[batch, pos]``)."""

    def hook(mod, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        edited = hidden.clone()
        if index is None:
            edited += delta
        else:
            edited[index] += delta
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return module.register_forward_hook(hook)


def linear_probe(hook_name, d, seed=1, position=None):
    """A linear :class:`Probe` ``w · x + b`` with known weights, and ``w``."""
    linear = nn.Linear(d, 1)
    with torch.no_grad():
        linear.weight.copy_(randn(1, d, seed=seed))
        linear.bias.fill_(0.3)
    return Probe(hook_name, linear, position=position), linear.weight[0].detach().clone()


# ---- a zero vector, probes, positions ----------------------------------------------------------------------------


def test_zero_vector_changes_nothing_bit_identically(clip, llava, images):
    plain = clip(images, text=["a cat", "sunset"])
    zeros = [
        SteeringVector.from_tensor("vision.blocks.0.hook_resid_mid", torch.zeros(32)),  # edits go back by subtraction
        SteeringVector.from_tensor("vision.blocks.1.attn.hook_z", torch.zeros(4, 8), positions="patches"),
        SteeringVector.from_tensor("text.blocks.0.hook_resid_post", torch.zeros(32), scale=5.0, positions="text"),
        SteeringVector.from_tensor("hook_image_embeds", randn(16), scale=0.0),
    ]
    with steer(clip, zeros):
        steered = clip(images, text=["a cat", "sunset"])
    assert torch.equal(steered, plain)

    prepared = llava.prepare_inputs(images[0], prompt=PROMPT)
    plain = llava.generate(prepared, **GREEDY)
    vectors = [SteeringVector.from_tensor(n, randn(32), scale=0.0) for n in ("projector.hook_out", "lm.blocks.0.hook_resid_mid")]
    with steer(llava, vectors):
        assert torch.equal(llava(prepared), llava.raw_model(**prepared.kwargs).logits)
        assert torch.equal(llava.generate(prepared, **GREEDY).sequences, plain.sequences)


@pytest.mark.parametrize(
    "hook_name, position",
    [("hook_image_embeds", None), ("vision.blocks.1.hook_resid_post", 0), ("vision.blocks.1.hook_resid_post", "patches")],
)
def test_steering_at_the_probe_hook_moves_its_readout_by_scale_times_w_dot_direction(clip, images, hook_name, position):
    d = 16 if hook_name == "hook_image_embeds" else 32
    probe, w = linear_probe(hook_name, d, position=position)
    _, cache = clip.run_with_cache(images, names_filter=[hook_name])
    before = probe(None, cache)
    for vector in (
        SteeringVector.from_probe(probe, scale=3.0),  # unit direction: shift 3‖w‖, at the positions the probe reads
        SteeringVector.from_probe(probe, scale=-2.0, normalize=False),  # shift -2‖w‖²
        SteeringVector.from_tensor(hook_name, randn(d, seed=2), scale=1.5, positions=position if position is not None else "all"),
    ):
        with steer(clip, vector):
            _, cache = clip.run_with_cache(images, names_filter=[hook_name])
        expected = vector.scale * (w @ vector.direction)
        torch.testing.assert_close(probe(None, cache) - before, expected.expand(2), rtol=1e-5, atol=1e-5)
    vector = SteeringVector.from_probe(probe)
    assert vector.positions == (position if position is not None else "all") and vector.hook_name == hook_name
    assert vector.provenance["weight_norm"] == pytest.approx(float(w.norm()))
    torch.testing.assert_close(vector.direction, w / w.norm())
    torch.testing.assert_close(SteeringVector.from_probe(probe, normalize=False).direction, w)


def test_probe_without_a_direction_or_with_several_hooks_is_refused():
    mlp = Probe("hook_image_embeds", nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 1)))
    with pytest.raises(ValueError, match="non-linear"):
        SteeringVector.from_probe(mlp)
    two, _ = linear_probe("hook_image_embeds", 16)
    two.hook_names = ("hook_image_embeds", "vision.hook_out")
    with pytest.raises(ValueError, match="one-hook probe"):
        SteeringVector.from_probe(two)


@pytest.mark.parametrize(
    "positions, picked",
    [
        ("all", list(range(17))),
        ("cls", [0]),
        ("patches", list(range(1, 17))),
        (Patches(((0, 1), (2, 3))), [1 + 0 * GRID + 1, 1 + 2 * GRID + 3]),
        ([(3, 0)], [1 + 3 * GRID + 0]),
        (torch.eye(GRID, dtype=torch.bool), [1 + i * GRID + i for i in range(GRID)]),
    ],
)
def test_positions_touch_only_the_chosen_positions(clip, images, positions, picked):
    name = "vision.blocks.0.hook_resid_post"
    vector = SteeringVector.from_tensor(name, randn(32), scale=2.0, positions=positions)
    _, plain = clip.run_with_cache(images, names_filter=[name, "vision.blocks.1.hook_resid_post"])
    with steer(clip, vector):
        _, steered = clip.run_with_cache(images, names_filter=[name, "vision.blocks.1.hook_resid_post"])
    changed = (steered[name] != plain[name]).any(-1)
    expected = torch.zeros(2, 17, dtype=torch.bool)
    expected[:, picked] = True
    assert torch.equal(changed, expected)
    torch.testing.assert_close(steered[name][expected] - plain[name][expected], vector.vector.expand(int(expected.sum()), -1))

    # downstream, the run equals the model edited by hand at those positions
    raw = clip.raw_model
    handle = add_at(raw.vision_model.encoder.layers[0], vector.vector, (slice(None), picked))
    try:
        with torch.no_grad():
            reference = raw.vision_model(pixel_values=clip.prepare_inputs(images).kwargs["pixel_values"], output_hidden_states=True)
    finally:
        handle.remove()
    torch.testing.assert_close(steered["vision.blocks.1.hook_resid_post"], reference.hidden_states[2], rtol=0, atol=1e-6)


def test_lm_positions_follow_the_token_ids(llava, qwen, images):
    """Image / text positions of the LM are the processor's image-token ids and attention mask, whatever the layout says."""
    for model in (llava, qwen):
        prepared = model.prepare_inputs([images[0], images[1]], prompt=["Describe it.", PROMPT])  # left-padded batch
        ids, attention = prepared.kwargs["input_ids"], prepared.kwargs["attention_mask"].bool()
        is_image = ids == model.raw_model.config.image_token_id
        if model is llava:  # newline tokens are image tokens too; the "image" selector takes the patches only
            is_image = is_image & (prepared.layout["lm"].kind != Kind.NEWLINE)
        name = "lm.blocks.0.hook_resid_post"
        for positions, expected in (("image", is_image), ("text", attention & (ids != model.raw_model.config.image_token_id)), ("all", attention)):
            vector = SteeringVector.from_tensor(name, randn(32), positions=positions)
            _, plain = model.run_with_cache(prepared, names_filter=[name])
            with steer(model, vector):
                _, steered = model.run_with_cache(prepared, names_filter=[name])
            assert torch.equal((steered[name] != plain[name]).any(-1), expected), (type(model.raw_model).__name__, positions)


def test_mask_resolution_for_generation_steps(llava, images):
    layout = llava.prepare_inputs(images[0], prompt=PROMPT).layout
    n = layout["lm"].shape[1]
    name = "lm.blocks.0.hook_resid_post"
    image = steering_mask(layout, name, "image", 1, n)
    assert image.sum() > 0 and not steering_mask(layout, name, "image", 1, 1).any()  # decode steps have no image tokens
    assert steering_mask(layout, name, "generated", 1, 1).all() and not steering_mask(layout, name, "generated", 1, n).any()
    assert not steering_mask(layout, name, "prompt", 1, 1).any() and steering_mask(layout, name, "prompt", 1, n).all()
    full = steering_mask(layout, name, "image", 3, n + 2)  # beams repeat the prompt; no KV cache: whole sequence again
    assert torch.equal(full[:, :n], image.expand(3, -1)) and not full[:, n:].any()
    assert steering_mask(layout, name, "all", 3, n + 2).all()


# ---- cross-component steering --------------------------------------------------------------------------------------


def test_projector_and_vision_steering_are_read_in_the_lm_output(llava, images):
    raw = llava.raw_model
    prepared = llava.prepare_inputs(images[0], prompt=PROMPT)
    with torch.no_grad():
        plain = raw(**prepared.kwargs).logits
    projector = SteeringVector.from_tensor("projector.hook_out", randn(32, seed=3), scale=2.0)
    # (row, col) = (1, 2) of every SigLIP tile: flat patch index 1 * 4 + 2 in each row of [tiles, 16, d]
    patch = SteeringVector.from_tensor("vision.blocks.0.hook_resid_post", randn(32, seed=4), scale=3.0, positions=[(1, 2)])
    cases = (
        (projector, raw.model.multi_modal_projector, None),
        (patch, raw.model.vision_tower.encoder.layers[0], (slice(None), 1 * 4 + 2)),
    )
    for vector, module, index in cases:
        handle = add_at(module, vector.vector, index)
        try:
            with torch.no_grad():
                reference = raw(**prepared.kwargs).logits
        finally:
            handle.remove()
        with steer(llava, vector):
            steered = llava(prepared)
        hooked = llava.run_with_hooks(prepared, fwd_hooks=steering_hooks(llava, vector))
        assert not torch.allclose(reference, plain)
        torch.testing.assert_close(steered, reference, rtol=0, atol=1e-5)
        assert torch.equal(hooked, steered)


def test_steering_the_last_vision_block_of_llava_reaches_the_lm(llava, images):
    # transformers records the projector's vision layer with its own (permanent) forward hook, installed on the
    # first run; our taps must run before it or the edit never reaches the projector
    prepared = llava.prepare_inputs(images[0], prompt=PROMPT)
    plain = llava(prepared)
    with steer(llava, SteeringVector.from_tensor("vision.hook_out", randn(32, seed=4), scale=3.0)):
        assert not torch.allclose(llava(prepared), plain)


# ---- generation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_steered_generation_is_deterministic_and_removing_it_restores_hf_generate(family, llava, qwen, images):
    model = llava if family == "llava" else qwen
    prepared = model.prepare_inputs(images[0], prompt=PROMPT)
    with torch.no_grad():
        hf = model.raw_model.generate(**prepared.kwargs, **GREEDY)
    vectors = [
        SteeringVector.from_tensor("vision.blocks.0.hook_resid_post", randn(32, seed=5), scale=4.0),
        SteeringVector.from_tensor("lm.blocks.1.hook_resid_post", randn(32, seed=6), scale=4.0, positions="generated"),
    ]
    for vector in vectors:
        with steer(model, vector):
            first = model.generate(prepared, **GREEDY)
            second = model.generate(prepared, **GREEDY)
        assert torch.equal(first.sequences, second.sequences)
        assert not torch.equal(first.sequences, hf)
        assert torch.equal(model.generate(prepared, **GREEDY).sequences, hf)
    n = prepared.kwargs["input_ids"].shape[1]
    assert torch.equal(first.sequences[:, : n + 1], hf[:, : n + 1])  # "generated" leaves the first new token alone


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "image"])
def test_generation_steps_are_steered_where_the_positions_say(llava, images, positions):
    name = "lm.blocks.0.hook_resid_post"
    prepared = llava.prepare_inputs(images, prompt=["Describe it.", PROMPT])  # two prompts, left padding
    vector = SteeringVector.from_tensor(name, randn(32, seed=7), positions=positions)
    before: list[torch.Tensor] = []
    with llava.hooks([(name, lambda x, hook: before.append(x.clone()))]):  # attached first: sees the value before steering
        with steer(llava, vector):
            after = llava.generate(prepared, cache_names=[name], **GREEDY).step_cache[name]
    ids, attention = prepared.kwargs["input_ids"], prepared.kwargs["attention_mask"].bool()
    prompt_expected = {
        "all": attention, "prompt": attention, "generated": torch.zeros_like(attention),
        "image": (ids == llava.raw_model.config.image_token_id) & (prepared.layout["lm"].kind != Kind.NEWLINE),
    }[positions]
    decode_expected = positions in ("all", "generated")
    assert len(before) == len(after) == GREEDY["max_new_tokens"]
    for step, (x, y) in enumerate(zip(before, after, strict=True)):
        changed = (x != y).any(-1)
        assert torch.equal(changed, prompt_expected if step == 0 else torch.full_like(changed, decode_expected)), step
        torch.testing.assert_close((y - x)[changed], vector.vector.expand(int(changed.sum()), -1))


def test_beam_search_steers_the_prompt_positions_of_every_beam(llava, images):
    name = "lm.blocks.0.hook_resid_post"
    prepared = llava.prepare_inputs(images[0], prompt=PROMPT)
    vector = SteeringVector.from_tensor(name, randn(32, seed=9), positions="image")
    before: list[torch.Tensor] = []
    with llava.hooks([(name, lambda x, hook: before.append(x.clone()))]), steer(llava, vector):
        after = llava.generate(prepared, cache_names=[name], num_beams=2, max_new_tokens=3, do_sample=False).step_cache[name]
    is_image = (prepared.kwargs["input_ids"] == llava.raw_model.config.image_token_id) & (prepared.layout["lm"].kind != Kind.NEWLINE)
    assert before[0].shape[0] == 2  # the prompt, once per beam
    assert torch.equal((after[0] != before[0]).any(-1), is_image.expand(2, -1))
    assert all(torch.equal(x, y) for x, y in zip(before[1:], after[1:], strict=True))


# ---- building vectors ------------------------------------------------------------------------------------------------


def test_mean_difference_matches_hf_hidden_states(clip):
    positive = [sample_image(seed=s) for s in range(3)]
    negative = [Image.new("RGB", (48, 48), (20 * s, 30, 200)) for s in range(2)]
    name = "vision.blocks.0.hook_resid_post"
    vector = SteeringVector.from_mean_difference(clip, name, positive, negative, positions="patches", batch_size=2)
    raw, processor = clip.raw_model, clip.processor

    def hf_mean(images):
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = raw.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        return hidden[:, 1:].mean(1).mean(0)  # patches of each image, then images

    torch.testing.assert_close(vector.direction, hf_mean(positive) - hf_mean(negative), rtol=1e-5, atol=1e-6)
    assert vector.positions == "patches" and vector.provenance["method"] == "mean_difference"
    assert vector.provenance["n_positive"] == 3 and vector.provenance["read_positions"] == "patches"


def test_mean_difference_over_image_tokens_of_a_vlm(llava, images):
    name = "lm.blocks.0.hook_resid_post"  # hidden_states[1] (the last of them is after the final norm)
    pairs = [(images[0], "Describe it."), (images[1], PROMPT)]
    vector = SteeringVector.from_mean_difference(llava, name, pairs, [images[0]], prompt=PROMPT, positions="image")
    raw = llava.raw_model

    def hf_mean(image, prompt):
        prepared = llava.prepare_inputs(image, prompt=prompt)
        with torch.no_grad():
            hidden = raw(**prepared.kwargs, output_hidden_states=True).hidden_states[1][0]
        is_image = (prepared.kwargs["input_ids"][0] == raw.config.image_token_id) & (prepared.layout["lm"].kind[0] != Kind.NEWLINE)
        return hidden[is_image].mean(0)

    expected = (hf_mean(*pairs[0]) + hf_mean(*pairs[1])) / 2 - hf_mean(images[0], PROMPT)
    torch.testing.assert_close(vector.direction, expected, rtol=1e-5, atol=1e-5)


def test_sae_feature_direction_is_its_decoder_row():
    sae = make_sae("lm.blocks.0.hook_resid_post")
    vector = SteeringVector.from_sae_feature(sae, 5, scale=2.0, positions="generated")
    assert torch.equal(vector.direction, sae.W_dec[5].detach()) and vector.hook_name == "lm.blocks.0.hook_resid_post"
    assert vector.provenance == {"method": "sae_feature", "feature": 5, "d_sae": 64, "sae_model": None, "neuronpedia_id": None}


def test_save_and_load_keep_direction_and_metadata(tmp_path):
    vectors = [
        SteeringVector.from_tensor("vision.blocks.0.hook_resid_post", randn(32), scale=2.5, positions=Patches([(0, 1)], tile=0), note="x"),
        SteeringVector.from_tensor("vision.blocks.1.attn.hook_z", randn(4, 8), positions=torch.eye(4, dtype=torch.bool)),
        SteeringVector.from_tensor("lm.blocks.0.hook_resid_post", randn(32).half(), scale=-1.0, positions="generated"),
    ]
    for i, vector in enumerate(vectors):
        path = vector.save(tmp_path / f"v{i}.safetensors")
        loaded = SteeringVector.load(path)
        assert torch.equal(loaded.direction, vector.direction) and loaded.direction.dtype == vector.direction.dtype
        assert (loaded.hook_name, loaded.scale, loaded.provenance) == (vector.hook_name, vector.scale, vector.provenance)
        if isinstance(vector.positions, torch.Tensor):
            assert torch.equal(loaded.positions, vector.positions)
        else:
            assert loaded.positions == vector.positions
    with safe_open(str(tmp_path / "v0.safetensors"), "pt") as f:
        assert '"note": "x"' in f.metadata()[METADATA_KEY]
    with pytest.raises(TypeError, match="cannot be saved"):
        SteeringVector.from_tensor("vision.hook_embed", randn(32), positions=lambda layout: None).save(tmp_path / "c.safetensors")


# ---- SAE clamping ------------------------------------------------------------------------------------------------


def make_sae(hook_name, d_in=32, d_sae=64, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    sae.cfg.metadata.hook_name = hook_name
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return sae.eval()


def test_clamping_changes_the_activation_by_target_minus_current_times_the_decoder_row(llava, images):
    name, downstream = "vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_pre"
    sae = make_sae(name)
    prepared = llava.prepare_inputs(images[0], prompt=PROMPT)
    _, original = llava.run_with_cache(prepared, names_filter=[name])
    feature, target = 7, 4.0
    clamp = FeatureClamp.from_sae(sae, feature, target, positions=Patches([(1, 2), (3, 0)]))
    with llava.saes(sae, use_error_term=True):
        _, plain = llava.run_with_cache(prepared, names_filter=[downstream])
        with steer(llava, clamp):
            _, clamped = llava.run_with_cache(prepared, names_filter=[downstream, f"{name}.hook_sae_acts_post"])
    torch.testing.assert_close(plain[downstream], original[name], rtol=0, atol=1e-5)  # the error term: exact
    with torch.no_grad():
        current = sae.encode(original[name])[..., feature]  # [tiles, 16]
    chosen = torch.zeros(current.shape, dtype=torch.bool)
    chosen[:, [1 * 4 + 2, 3 * 4 + 0]] = True  # those cells of every tile
    expected = torch.where(chosen, target - current, 0.0)[..., None] * sae.W_dec[feature].detach()
    torch.testing.assert_close(clamped[downstream] - plain[downstream], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(clamped[f"{name}.hook_sae_acts_post"][..., feature] == target, chosen)


def test_clamping_a_vision_feature_changes_the_lm_text_and_removing_it_restores_hf_generate(llava, images):
    sae = make_sae("vision.blocks.0.hook_resid_post")
    prepared = llava.prepare_inputs(images[0], prompt=PROMPT)
    with torch.no_grad():
        hf = llava.raw_model.generate(**prepared.kwargs, **GREEDY)
    with llava.saes(sae, use_error_term=True):
        assert torch.equal(llava.generate(prepared, **GREEDY).sequences, hf)  # with the error term: unchanged
        with steer(llava, FeatureClamp.from_sae(sae, 7, 30.0)):
            first = llava.generate(prepared, **GREEDY).sequences
            second = llava.generate(prepared, **GREEDY).sequences
        swept = sweep(llava, prepared, FeatureClamp.from_sae(sae, 7, 0.0), [30.0], generate_kwargs=GREEDY, progress=False)
    assert torch.equal(first, second) and not torch.equal(first, hf)
    assert swept.rows[0]["text"] == llava.adapter.decode(first[:, hf.shape[1] - GREEDY["max_new_tokens"] :])[0]
    assert swept.scale_name == "clamped feature value" and swept.rows[0]["label"] == "vision.blocks.0.hook_resid_post feature 7"
    assert torch.equal(llava.generate(prepared, **GREEDY).sequences, hf)


# ---- sweeps --------------------------------------------------------------------------------------------------------


def test_sweep_table_matches_single_runs_and_plots(clip, images, tmp_path):
    probe, w = linear_probe("hook_image_embeds", 16)
    vector = SteeringVector.from_probe(probe)
    result = sweep(clip, images, vector, [-2.0, 0.0, 1.0, 3.0], readout=probe, progress=False)
    _, cache = clip.run_with_cache(images, names_filter=["hook_image_embeds"])
    base = probe(None, cache).detach()
    assert [(r["scale"], r["batch"]) for r in result.rows] == [(s, b) for s in (-2.0, 0.0, 1.0, 3.0) for b in (0, 1)]
    for row in result.rows:
        expected = base[row["batch"]] + row["scale"] * w.norm()  # from_probe: unit direction
        assert row["readout"] == pytest.approx(float(expected), abs=1e-4)
    assert [r["readout"] for r in result.rows if r["scale"] == 0.0] == base.tolist()
    written = result.save(tmp_path, "probe")
    assert [p.name for p in written] == ["probe.md", "probe.png"] and all(p.stat().st_size > 0 for p in written)
    assert "| label | scale | batch | readout |" in written[0].read_text()


def test_layer_sweep_with_generation_writes_texts_side_by_side(llava, images, tmp_path):
    vector = SteeringVector.from_tensor("lm.blocks.0.hook_resid_post", randn(32, seed=8))
    hooks = ["lm.blocks.0.hook_resid_post", "lm.blocks.1.hook_resid_post"]
    result = sweep(llava, images[0], vector, [0.0, 6.0], hook_names=hooks, prompt=PROMPT, generate_kwargs=GREEDY, progress=False)
    plain = llava.generate(images[0], prompt=PROMPT, **GREEDY).text[0]
    with steer(llava, vector.replace(hook_name=hooks[1], scale=6.0)):
        steered = llava.generate(images[0], prompt=PROMPT, **GREEDY).text[0]
    texts = {(r["label"], r["scale"]): r["text"] for r in result.rows}
    assert texts[(hooks[0], 0.0)] == texts[(hooks[1], 0.0)] == plain
    assert texts[(hooks[1], 6.0)] == steered != plain
    table = result.texts_side_by_side().splitlines()
    assert table[0] == f"| steering scale | {hooks[0]} | {hooks[1]} |" and len(table) == 4
    assert [p.name for p in result.save(tmp_path)] == ["sweep.md", "sweep_texts.md"]


# ---- errors ------------------------------------------------------------------------------------------------------


def test_errors_are_loud_and_early(clip, images):
    with pytest.raises(ValueError, match=r"\(row, col\) pairs"):
        Patches((1, 2))
    with pytest.raises(ValueError, match="needs an LM hook"):
        SteeringVector.from_tensor("vision.blocks.0.hook_resid_post", randn(32), positions="generated")
    for nothing in ("image", Patches([(GRID, 0)])):  # no image tokens in a vision tower; a row past the grid
        with pytest.raises(ValueError, match="no position|select nothing"), steer(clip, SteeringVector.from_tensor("vision.blocks.0.hook_resid_post", randn(32), positions=nothing)):
            clip(images)
    with pytest.raises(ValueError, match="no position axis"), steer(clip, SteeringVector.from_tensor("hook_image_embeds", randn(16), positions="cls")):
        clip(images)
    with pytest.raises(ValueError, match="does not fit 'vision.blocks.0.hook_resid_post'"), steer(clip, SteeringVector.from_tensor("vision.blocks.0.hook_resid_post", randn(16))):
        clip(images)
    with pytest.raises(KeyError, match="unknown hook name"), steer(clip, SteeringVector.from_tensor("vision.blocks.9.hook_resid_post", randn(32))):
        pass
    with pytest.raises(ValueError, match="no SAE is spliced"):
        FeatureClamp("vision.blocks.0.hook_resid_post", 3, 1.0).fwd_hook(clip)
    with pytest.raises(ValueError, match="nothing to record"):
        sweep(clip, images, SteeringVector.from_tensor("hook_image_embeds", randn(16)), [1.0])
    assert not any(hp.has_any_hook() for hp in clip.hook_dict.values())  # failed runs left no hook behind
