"""LLaVA-OneVision adapter, checked on the tiny random model against independent references.

References: the unwrapped model's logits and ``output_hidden_states``, the standalone vision tower's hidden states,
an eager copy's ``output_attentions``, the model's own ``get_image_features`` / ``multi_modal_projector``, the
processor's token arithmetic, edits done by hand with PyTorch hooks on the HF modules, and HF ``generate``.
"""

from __future__ import annotations

import pytest
import torch
from reference import eager_copy
from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.testing import half_and_half_image, meta_model, sample_image
from hooked_vlm.testing.llava_onevision import qwen2_tokenizer, tiny_llava_onevision

PROMPT = "What is in the picture?"

# (width, height) → what the tiny model's anyres does with it (tiles of 16 px, 4×4 patches, pinpoints up to 4×4)
SQUARE = (32, 32)  # 2×2 tiles, 8×8 grid, no padding
WIDE = (70, 20)  # 2×4 tiles, letterbox rows removed
TALL = (20, 70)  # 4×2 tiles, letterbox columns removed: 16×4 grid
DOWNSCALED = (64, 64)  # 4×4 tiles, 16×16 grid > anyres_max_9 → bilinearly down-scaled to 12×12


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava_onevision(seed=0)


@pytest.fixture(scope="module")
def model(tiny):
    return HookedVLM.from_hf(*tiny)


@pytest.fixture(scope="module")
def hf(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def eager(hf):
    return eager_copy(hf)


def image(size, seed=0):
    return sample_image(*size, seed=seed)


def tiles_of(prepared):
    """The tiles the model runs through SigLIP, as ``get_image_features`` cuts them out of ``pixel_values``."""
    layout = prepared.layout
    pixels = prepared.kwargs["pixel_values"]
    return torch.cat([pixels[p.image, : p.n_tiles] for p in layout.images])


@torch.no_grad()
def reference_logits(hf, prepared):
    return hf(**prepared.kwargs).logits


# ---- names and structure -------------------------------------------------------------------------------------------


def test_canonical_hook_names(model):
    names = model.hook_names()
    vision_block = [n.removeprefix("vision.blocks.1.") for n in model.hook_names("vision.blocks.1.*")]
    lm_block = [n.removeprefix("lm.blocks.1.") for n in model.hook_names("lm.blocks.1.*")]
    assert vision_block == [
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid",
        "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
    ]  # fmt: skip
    assert lm_block == [
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
        "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out",
        "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
        "hook_mlp_out", "hook_resid_post",
    ]  # fmt: skip
    towers = [n for n in names if ".blocks." not in n]
    assert towers == [
        "vision.hook_embed", "vision.hook_out", "projector.hook_in", "projector.hook_pre", "projector.hook_post",
        "projector.hook_out", "projector.hook_packed", "lm.hook_embed", "lm.ln_final.hook_normalized",
    ]  # fmt: skip
    assert len(names) == 9 + 2 * 16 + 2 * 19
    # forward order: vision, projector, LM
    assert names.index("vision.blocks.1.hook_resid_post") < names.index("projector.hook_in")
    assert names.index("projector.hook_packed") < names.index("lm.hook_embed") < names.index("lm.blocks.0.hook_resid_pre")


def test_hook_shapes_follow_heads_and_kv_heads(model):
    _, cache = model.run_with_cache(
        image(TALL), prompt=PROMPT, stop_early=False,
        names_filter=["vision.blocks.0.attn.hook_q", "lm.blocks.0.attn.hook_q", "lm.blocks.0.attn.hook_k",
                      "lm.blocks.0.attn.hook_rot_k", "lm.blocks.0.mlp.hook_pre_linear", "projector.hook_packed"],
    )  # fmt: skip
    n_tiles = cache.layout["vision"].shape[0]
    seq = cache.layout["lm"].shape[1]
    assert cache["vision.blocks.0.attn.hook_q"].shape == (n_tiles, 16, 4, 8)
    assert cache["lm.blocks.0.attn.hook_q"].shape == (1, seq, 4, 8)
    assert cache["lm.blocks.0.attn.hook_k"].shape == (1, seq, 2, 8)  # GQA: kv-heads
    assert cache["lm.blocks.0.attn.hook_rot_k"].shape == (1, seq, 2, 8)
    assert cache["lm.blocks.0.mlp.hook_pre_linear"].shape == (1, seq, 37)
    assert cache["projector.hook_packed"].shape == (1, cache.layout.images[0].n_tokens, 32)


# ---- parity with the unwrapped model -------------------------------------------------------------------------------


@pytest.mark.parametrize("hooks", ["none", "one hook", "patterns"])
@pytest.mark.parametrize("batch", [False, True], ids=["one prompt", "padded batch"])
def test_logits_equal_unwrapped_model(model, hf, hooks, batch):
    if batch:
        prepared = model.prepare_inputs([image(TALL), image(SQUARE, 1)], prompt=["Hi", PROMPT])
    else:
        prepared = model.prepare_inputs(image(WIDE), prompt=PROMPT)
    expected = reference_logits(hf, prepared)
    real = prepared.kwargs["attention_mask"].bool()
    if hooks == "none":
        logits = model(prepared)
        assert torch.equal(logits, expected)
    elif hooks == "one hook":
        seen = []
        logits = model.run_with_hooks(prepared, fwd_hooks=[("lm.blocks.0.hook_resid_post", lambda x, hook: seen.append(x))])
        assert seen and torch.equal(logits, expected)
    else:
        logits, cache = model.run_with_cache(prepared, names_filter="*.hook_pattern", stop_early=False)
        assert len(cache) == 4
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)


def test_resid_streams_equal_hf_hidden_states(model, hf):
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    _, cache = model.run_with_cache(prepared, names_filter=lambda n: "resid" in n or "hook_embed" in n or
                                    n in ("vision.hook_out", "lm.ln_final.hook_normalized"))  # fmt: skip
    with torch.no_grad():
        lm_states = hf(**prepared.kwargs, output_hidden_states=True).hidden_states
        vision_states = hf.model.vision_tower(tiles_of(prepared), output_hidden_states=True).hidden_states
    n_lm, n_vision = len(lm_states) - 1, len(vision_states) - 1
    for i in range(n_lm):
        torch.testing.assert_close(cache[f"lm.blocks.{i}.hook_resid_pre"], lm_states[i])
        if i < n_lm - 1:  # HF's last LM hidden state is after the final norm
            torch.testing.assert_close(cache[f"lm.blocks.{i}.hook_resid_post"], lm_states[i + 1])
    final = cache[f"lm.blocks.{n_lm - 1}.hook_resid_post"]
    with torch.no_grad():
        torch.testing.assert_close(hf.model.language_model.norm(final), lm_states[-1])
    torch.testing.assert_close(cache["lm.ln_final.hook_normalized"], lm_states[-1])
    torch.testing.assert_close(cache["lm.hook_embed"], lm_states[0])
    torch.testing.assert_close(cache["vision.hook_embed"], vision_states[0])
    for i in range(n_vision):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.hook_resid_post"], vision_states[i + 1])
    torch.testing.assert_close(cache["vision.hook_out"], vision_states[hf.config.vision_feature_layer])


@pytest.mark.parametrize("feature_layer", [-2, [0, -1]])
def test_vision_hook_out_follows_the_feature_layer(tiny, feature_layer):
    from transformers import LlavaOnevisionForConditionalGeneration

    from hooked_vlm.testing.llava_onevision import tiny_llava_onevision_config

    processor = tiny[1]
    config = tiny_llava_onevision_config(processor.tokenizer)
    config.vision_feature_layer = feature_layer
    model = HookedVLM.from_hf(LlavaOnevisionForConditionalGeneration(config).eval(), processor)
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    _, cache = model.run_with_cache(prepared, names_filter=["vision.hook_out", "projector.hook_in"], stop_early=False)
    with torch.no_grad():
        states = model.raw_model.model.vision_tower(tiles_of(prepared), output_hidden_states=True).hidden_states
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    expected = torch.cat([states[i] for i in layers], dim=-1)
    torch.testing.assert_close(cache["vision.hook_out"], expected)
    torch.testing.assert_close(cache["projector.hook_in"], expected)


def test_patterns_equal_hf_eager_attentions(model, eager):
    prepared = model.prepare_inputs(image(WIDE), prompt=PROMPT)
    _, cache = model.run_with_cache(prepared, names_filter="*.attn.hook_pattern")
    with torch.no_grad():
        lm_attentions = eager(**prepared.kwargs, output_attentions=True).attentions
        vision_attentions = eager.model.vision_tower(tiles_of(prepared), output_attentions=True).attentions
    for i, expected in enumerate(lm_attentions):
        torch.testing.assert_close(cache[f"lm.blocks.{i}.attn.hook_pattern"], expected)
    for i, expected in enumerate(vision_attentions):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.attn.hook_pattern"], expected)


def test_projector_and_packed_features_equal_hf(model, hf):
    prepared = model.prepare_inputs(image(DOWNSCALED), prompt=PROMPT)
    names = ["projector.hook_in", "projector.hook_out", "projector.hook_packed", "lm.hook_embed"]
    _, cache = model.run_with_cache(prepared, names_filter=names)
    kwargs = prepared.kwargs
    with torch.no_grad():
        selected = hf.model.vision_tower(tiles_of(prepared), output_hidden_states=True).hidden_states[-1]
        projected = hf.model.multi_modal_projector(selected)
        packed = hf.model.get_image_features(
            kwargs["pixel_values"], kwargs["image_sizes"], batch_num_images=kwargs["batch_num_images"]
        ).pooler_output
    torch.testing.assert_close(cache["projector.hook_in"], selected)
    torch.testing.assert_close(cache["projector.hook_out"], projected)
    torch.testing.assert_close(cache["projector.hook_packed"][0], torch.cat(packed))
    image_tokens = kwargs["input_ids"] == hf.config.image_token_id
    assert torch.equal(cache.layout.image_token_mask, image_tokens)
    torch.testing.assert_close(cache["lm.hook_embed"][image_tokens], cache["projector.hook_packed"][0])


# ---- layout ----------------------------------------------------------------------------------------------------------


LAYOUT_CASES = {
    "square": [[SQUARE]],
    "wide": [[WIDE]],
    "tall": [[TALL]],
    "downscaled": [[DOWNSCALED]],
    "two images, one prompt": [[SQUARE, TALL]],
    "batch of prompts": [[WIDE, SQUARE], [DOWNSCALED]],
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_token_counts_equal_processor_and_model(model, hf, tiny, case):
    processor = tiny[1]
    sizes = LAYOUT_CASES[case]
    images = [[image(s, seed=k) for k, s in enumerate(row)] for row in sizes]
    prompts = [PROMPT] * len(images)
    _, cache = model.run_with_cache(images, prompt=prompts, names_filter=["vision.hook_embed", "projector.hook_packed"])
    layout, kwargs = cache.layout, model.prepare_inputs(images, prompt=prompts).kwargs
    image_tokens = kwargs["input_ids"] == hf.config.image_token_id
    with torch.no_grad():
        packed = hf.model.get_image_features(
            kwargs["pixel_values"], kwargs["image_sizes"], batch_num_images=kwargs["batch_num_images"]
        ).pooler_output
    assert [p.n_tokens for p in layout.images] == [len(f) for f in packed]  # the model's count
    for row, sizes_of_row in enumerate(sizes):
        in_row = [p for p in layout.images if p.batch == row]
        assert sum(p.n_tokens for p in in_row) == int(image_tokens[row].sum())  # the processor's expansion
        if len(sizes_of_row) == 1:
            (w, h), (p,) = sizes_of_row[0], in_row
            tile = processor.image_processor.size["height"]
            assert p.n_tokens == processor._get_number_of_features(h, w, tile, tile)
        else:
            assert all(p.n_tokens == 16 + 1 and p.n_tiles == 1 for p in in_row)  # multi-image: base tile + newline
    assert torch.equal(layout.image_token_mask, image_tokens)
    assert layout["vision"].shape == tuple(cache["vision.hook_embed"].shape[:2])
    assert layout["packed"].shape == tuple(cache["projector.hook_packed"].shape[:2])
    lm = layout["lm"]
    newlines = (lm.kind == Kind.NEWLINE).sum()
    assert newlines == sum(p.grid[0] if p.grid else 1 for p in layout.images)
    assert ((lm.kind == Kind.IMAGE) | (lm.kind == Kind.NEWLINE)).sum() == image_tokens.sum()
    assert [p.interpolated for p in layout.images] == [s == DOWNSCALED for row in sizes for s in row]
    assert any("interpolated" in note for note in lm.notes) == (DOWNSCALED in sum(sizes, []))


def test_layout_rows_and_cols_point_at_the_patches_they_carry(model):
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    _, cache = model.run_with_cache(prepared, names_filter=["projector.hook_out", "lm.hook_embed"])
    (packing,) = cache.layout.images
    # by hand: 4×2 tiles of 4×4 patches stitched to 16×8; the letterbox leaves columns 2..5 → a 16×4 grid
    assert (packing.tile_grid, packing.unpadded_grid, packing.grid) == ((4, 2), (16, 4), (16, 4))
    lm = cache.layout["lm"]
    batch, position = lm.grid_index(0, tile=1)
    assert batch.shape == (16, 4)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(4), indexing="ij")
    stitched_col = cols + 2
    tile = 1 + (rows // 4) * 2 + stitched_col // 4
    expected = (packing.first_tile + tile) * 16 + (rows % 4) * 4 + stitched_col % 4
    source = torch.full((lm.shape[1],), -1)
    source[packing.positions] = packing.source
    assert torch.equal(source[position], expected)
    # and the LM really carries those patches' projected features there
    features = cache["projector.hook_out"].flatten(0, 1)
    embeds = cache["lm.hook_embed"][0]
    carried = packing.source >= 0
    torch.testing.assert_close(embeds[packing.positions[carried]], features[packing.source[carried]])
    newline = model.raw_model.model.image_newline
    torch.testing.assert_close(embeds[lm.kind[0] == Kind.NEWLINE], newline.expand(16, -1))
    assert torch.equal(lm.col[0][lm.kind[0] == Kind.NEWLINE], torch.full((16,), 4))


def test_grid_views_for_heatmaps(model):
    _, cache = model.run_with_cache(
        image(TALL), prompt=PROMPT, names_filter=["vision.blocks.1.hook_resid_post", "lm.blocks.1.hook_resid_post"]
    )
    layout = cache.layout
    vision = cache["vision.blocks.1.hook_resid_post"]
    grid = layout.image_grid("vision.blocks.1.hook_resid_post", vision, image=0, tile=3)
    assert torch.equal(grid, vision[3].view(4, 4, -1))
    lm = cache["lm.blocks.1.hook_resid_post"]
    hires = layout.image_grid("lm.blocks.1.hook_resid_post", lm, image=0, tile=1)
    (packing,) = layout.images
    rows_with_newline = lm[0, packing.positions[16:]].view(16, 5, -1)
    assert torch.equal(hires, rows_with_newline[:, :4])
    base = layout.image_grid("lm.blocks.1.hook_resid_post", lm, image=0, tile=0)
    assert torch.equal(base, lm[0, packing.positions[:16]].view(4, 4, -1))
    b, positions = layout.image_positions(0)
    assert b == 0 and torch.equal(positions, packing.positions)


def test_patching_one_image_token_changes_only_that_position(model):
    prepared = model.prepare_inputs(image(WIDE), prompt=PROMPT)
    names = ["lm.blocks.0.hook_resid_pre", "lm.blocks.0.hook_resid_post"]
    _, clean = model.run_with_cache(prepared, names_filter=names)
    batch, position = clean.layout["lm"].grid_index(0, tile=1)
    b, p = int(batch[1, 2]), int(position[1, 2])

    def patch(x, hook):
        x = x.clone()
        x[b, p] += 1.0
        return x

    model.add_hook("lm.hook_embed", patch)
    try:
        _, patched = model.run_with_cache(prepared, names_filter=names, reset_hooks_end=False)
    finally:
        model.reset_hooks()
    changed = (patched["lm.blocks.0.hook_resid_pre"] != clean["lm.blocks.0.hook_resid_pre"]).any(-1)
    assert changed.nonzero().tolist() == [[b, p]]
    post_changed = (patched["lm.blocks.0.hook_resid_post"] != clean["lm.blocks.0.hook_resid_post"]).any(-1)[b]
    assert not post_changed[:p].any() and post_changed[p]


# ---- edits mean what they say ------------------------------------------------------------------------------------------


def test_zero_ablating_image_tokens_matches_manual_edit(model, hf):
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    mask = prepared.layout.image_token_mask

    def ablate(x, hook):
        return x.masked_fill(mask[..., None], 0.0)

    logits = model.run_with_hooks(prepared, fwd_hooks=[("lm.hook_embed", ablate)])

    def by_hand(module, args, kwargs):
        image_tokens = prepared.kwargs["input_ids"] == hf.config.image_token_id
        return args, {**kwargs, "inputs_embeds": kwargs["inputs_embeds"].masked_fill(image_tokens[..., None], 0.0)}

    handle = hf.model.language_model.register_forward_pre_hook(by_hand, with_kwargs=True)
    try:
        expected = reference_logits(hf, prepared)
    finally:
        handle.remove()
    assert torch.equal(logits, expected)
    assert not torch.allclose(logits, reference_logits(hf, prepared))
    # the packed features are exactly what is scattered into those positions
    zero_packed = model.run_with_hooks(prepared, fwd_hooks=[("projector.hook_packed", lambda x, hook: x * 0)])
    assert torch.equal(zero_packed, expected)


def test_replacing_projector_out_with_another_image_matches_manual_edit(model, hf):
    first, second = image(SQUARE), half_and_half_image(*SQUARE)
    _, other = model.run_with_cache(second, prompt=PROMPT, names_filter="projector.hook_out")
    replacement = other["projector.hook_out"]
    prepared = model.prepare_inputs(first, prompt=PROMPT)
    logits = model.run_with_hooks(prepared, fwd_hooks=[("projector.hook_out", lambda x, hook: replacement)])
    handle = hf.model.multi_modal_projector.register_forward_hook(lambda module, args, output: replacement)
    try:
        expected = reference_logits(hf, prepared)
    finally:
        handle.remove()
    assert torch.equal(logits, expected)
    # same size, same prompt: after the projector the run is the second image's run
    torch.testing.assert_close(logits, reference_logits(hf, model.prepare_inputs(second, prompt=PROMPT)))
    assert not torch.allclose(logits, reference_logits(hf, prepared))


@pytest.mark.parametrize("name", ["lm.blocks.1.attn.hook_pattern", "vision.blocks.0.attn.hook_attn_scores"])
def test_editing_scores_or_pattern_changes_the_output(model, hf, name):
    prepared = model.prepare_inputs(image(SQUARE), prompt=PROMPT)
    clean = reference_logits(hf, prepared)
    same = model.run_with_hooks(prepared, fwd_hooks=[(name, lambda x, hook: x.clone())])
    torch.testing.assert_close(same, clean, rtol=1e-5, atol=1e-5)

    def edit(x, hook):
        if hook.name.endswith("hook_pattern"):
            return torch.tril(torch.ones_like(x)) / torch.tril(torch.ones_like(x)).sum(-1, keepdim=True)
        return x * 3.0

    edited = model.run_with_hooks(prepared, fwd_hooks=[(name, edit)])
    assert (edited - clean).abs().max() > 1e-3


def test_idle_runs_install_nothing_and_runs_leave_nothing(model, hf, hook_registrations, hook_counts):
    prepared = model.prepare_inputs(image(WIDE), prompt=PROMPT)
    before = hook_counts(hf)
    model(prepared)
    assert hook_registrations.calls == []
    for names in (["projector.hook_packed"], ["projector.hook_packed", "lm.blocks.1.attn.hook_pattern", "lm.hook_embed"]):
        model.run_with_cache(prepared, names_filter=names)
        assert hook_counts(hf) == before
        assert "pack_image_features" not in vars(hf.model)
        assert all(layer.self_attn.config is hf.config.text_config for layer in hf.model.language_model.layers)

    def fail(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(prepared, fwd_hooks=[("projector.hook_packed", fail)])
    assert hook_counts(hf) == before and "pack_image_features" not in vars(hf.model)


# ---- early stop across towers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, lm_runs",
    [(["vision.blocks.1.hook_resid_post"], False), (["projector.hook_packed"], False),
     (["vision.blocks.0.attn.hook_pattern", "projector.hook_out"], False), (["lm.blocks.0.hook_resid_pre"], True)],
)  # fmt: skip
def test_vision_only_requests_never_run_the_language_model(model, hf, names, lm_runs):
    calls = []
    handle = hf.model.language_model.register_forward_pre_hook(lambda module, args: calls.append(module))
    try:
        logits, cache = model.run_with_cache(image(WIDE), prompt=PROMPT, names_filter=names)
    finally:
        handle.remove()
    assert logits is None and set(cache) == set(names)
    assert bool(calls) == lm_runs


# ---- position / head selection -------------------------------------------------------------------------------------------


def test_positions_and_heads_select_from_the_lm_layout(model):
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    name = "lm.blocks.1.attn.hook_pattern"
    _, full = model.run_with_cache(prepared, names_filter=name)
    lm = prepared.layout["lm"]
    for selector, kind in (("image", Kind.IMAGE), ("newline", Kind.NEWLINE), ("text", Kind.TEXT)):
        _, sliced = model.run_with_cache(prepared, names_filter=name, positions=selector, heads=[1, 3])
        rows = (lm.kind[0] == kind).nonzero()[:, 0]
        assert torch.equal(sliced[name], full[name][:, [1, 3]][:, :, rows])
    assert (lm.kind[0] == Kind.NEWLINE).sum() == 16


# ---- generation ----------------------------------------------------------------------------------------------------------


def test_generate_without_hooks_equals_hf_generate(model, hf):
    prepared = model.prepare_inputs([image(SQUARE), image(TALL, 1)], prompt=["Describe it.", PROMPT])
    out = model.generate(prepared, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = hf.generate(**prepared.kwargs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert torch.equal(out.new_tokens, expected[:, prepared.kwargs["input_ids"].shape[1] :])
    assert len(out.text) == 2


def test_steering_changes_generation_deterministically_at_every_step(model):
    prepared = model.prepare_inputs(image(SQUARE), prompt=PROMPT)
    steer = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 4.0
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    record = "lm.blocks.1.hook_resid_post"
    plain = model.generate(prepared, cache_names=record, cache_device="cpu", **kwargs)
    with model.hooks(fwd_hooks=[("lm.blocks.0.hook_resid_post", lambda x, hook: x + steer)]):
        steered = model.generate(prepared, cache_names=record, cache_device="cpu", **kwargs)
        again = model.generate(prepared, **kwargs)
    assert torch.equal(steered.sequences, again.sequences)
    assert not torch.equal(steered.new_tokens, plain.new_tokens)
    steps, plain_steps = steered.step_cache[record], plain.step_cache[record]
    assert len(steps) == len(plain_steps) == 6  # prefill + one forward per further token
    assert steps[0].shape[:2] == (1, prepared.kwargs["input_ids"].shape[1]) and steps[1].shape[:2] == (1, 1)
    assert all(s.device.type == "cpu" for s in steps)
    assert all(not torch.allclose(s, p) for s, p in zip(steps, plain_steps, strict=True))  # the hook acted at every step
    assert torch.equal(model.generate(prepared, **kwargs).sequences, plain.sequences)  # and is gone afterwards


# ---- inputs ----------------------------------------------------------------------------------------------------------------


def test_input_forms(model, hf, tiny):
    processor = tiny[1]
    picture = image(WIDE)
    from_images = model.prepare_inputs(picture, prompt=PROMPT)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ready = dict(processor(text=[text], images=[[picture]], return_tensors="pt"))
    assert torch.equal(model(ready), model(from_images))
    assert torch.equal(model(picture, text=text), model(from_images))

    alone = model.prepare_inputs(picture)
    decoded = processor.tokenizer.decode(alone.kwargs["input_ids"][0])
    assert decoded.startswith("<|im_start|>user\n<image>") and decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "\n" not in decoded.replace("<image>", "")[len("<|im_start|>user\n") : -len("<|im_end|>\n<|im_start|>assistant\n")]

    several = model.prepare_inputs([image(SQUARE), image(TALL, 1)], prompt=PROMPT)
    assert several.kwargs["input_ids"].shape[0] == 1 and several.kwargs["batch_num_images"].tolist() == [2]
    per_prompt = model.prepare_inputs([image(SQUARE), image(TALL, 1)], prompt=["a", "b"])
    assert per_prompt.kwargs["batch_num_images"].tolist() == [1, 1]
    nested = model.prepare_inputs([[image(SQUARE), image(TALL, 1)], [image(WIDE)]], prompt=["a", "b"])
    assert nested.kwargs["batch_num_images"].tolist() == [2, 1]
    assert [p.batch for p in nested.layout.images] == [0, 0, 1]
    text_only = model.prepare_inputs(prompt="Hello")
    assert (text_only.layout["lm"].kind == Kind.TEXT).all() and "vision" not in text_only.layout.towers
    assert torch.equal(model(text_only), reference_logits(hf, text_only))

    with pytest.raises(TypeError, match="not both"):
        model.prepare_inputs(picture, prompt=PROMPT, text=text)
    with pytest.raises(ValueError, match="3 prompts for 1 image lists"):
        model.prepare_inputs(picture, prompt=["a", "b", "c"])
    with pytest.raises(TypeError, match="image sizes"):
        model.prepare_inputs(torch.zeros(1, 3, 16, 16), prompt=PROMPT)
    with pytest.raises(ValueError, match="placeholders do not match"):
        broken = dict(ready, input_ids=ready["input_ids"].clone())
        broken["input_ids"][0, (broken["input_ids"][0] == hf.config.image_token_id).nonzero()[0, 0]] = 0
        _ = model.prepare_inputs(broken).layout  # built on first use


# ---- loading: offline checkpoint, device_map ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # image_newline: a parameter
def test_saved_checkpoint_loads_with_and_without_device_map(tiny, tmp_path):
    hf, processor = tiny
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # accelerate dispatches (and hooks) a model only when its map spans several devices; on a CPU-only machine,
    # offloading one LM block to disk is the way to get there (its weights live on the meta device between calls)
    device_map = {
        "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
        "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    names = ["vision.hook_out", "lm.blocks.1.attn.hook_pattern", "lm.blocks.1.hook_resid_post"]
    for kwargs in ({}, {"device_map": device_map, "offload_folder": str(tmp_path / "offload")}):
        loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **kwargs)
        assert loaded.adapter.family == "llava_onevision"
        assert hasattr(loaded.raw_model, "hf_device_map") == bool(kwargs)
        prepared = loaded.prepare_inputs(image(TALL), prompt=PROMPT)
        logits, cache = loaded.run_with_cache(prepared, names_filter=names, stop_early=False, device="cpu")
        torch.testing.assert_close(logits, reference_logits(hf, prepared), rtol=1e-5, atol=1e-5)
        assert all(t.device.type == "cpu" for t in cache.values()) and len(cache) == 3
        with torch.no_grad():
            expected = hf.generate(**prepared.kwargs, max_new_tokens=3, do_sample=False)
        assert torch.equal(loaded.generate(prepared, max_new_tokens=3, do_sample=False).sequences, expected)


# ---- real checkpoint configs on the meta device ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, d_lm, n_lm, heads, kv_heads, d_head",
    [("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 896, 24, 14, 2, 64),
     ("llava-hf/llava-onevision-qwen2-7b-ov-hf", 3584, 28, 28, 4, 128)],
)  # fmt: skip
def test_real_configs_on_meta_device(name, d_lm, n_lm, heads, kv_heads, d_head):
    model = HookedVLM.from_hf(meta_model(name))
    vision, lm = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head) == (26, 1152, 16, 72)
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads, lm.d_head) == (n_lm, d_lm, heads, kv_heads, d_head)
    assert len(model.hook_names()) == 9 + 26 * 16 + n_lm * 19
    raw = model.raw_model
    assert raw.model.language_model.layers[0].self_attn.k_proj.out_features == kv_heads * d_head
    assert raw.model.multi_modal_projector.linear_1.in_features == 1152
    # token counts at real size (899×1024 is the transformers integration test's 6551), against the processor
    sizes = torch.tensor([[899, 1024], [384, 384], [480, 640], [1080, 1920], [300, 2000]])
    packings = model.adapter.image_packing(sizes)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(),
        tokenizer=qwen2_tokenizer(["<image>", "<video>"]),
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    expected = [processor._get_number_of_features(h, w, 384, 384) for h, w in sizes.tolist()]
    assert [p.n_tokens for p in packings] == expected == [6551, 1485, 2929, 7269, 4804]
    assert [p.interpolated for p in packings] == [False, False, False, True, False]
    assert packings[3].unpadded_grid == (75, 135) and packings[3].grid == (60, 108)
    assert packings[0].n_tiles == 10 and packings[0].tile_grid == (3, 3)

