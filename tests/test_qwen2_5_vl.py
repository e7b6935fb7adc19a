"""Qwen2.5-VL through HookedVLM, checked against HF's own outputs (output_hidden_states of both towers, the eager
attention weights of every vision window and image, get_image_features), PyTorch hooks placed straight on the HF
modules, and hand-made edits."""

from itertools import pairwise

import pytest
import torch
from reference import chat, direct_hooks, eager_copy
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from hooked_vlm import HookedVLM
from hooked_vlm.layout import Kind
from hooked_vlm.testing import half_and_half_image, meta_model, real_size_inputs, sample_image
from hooked_vlm.testing.qwen2_5_vl import tiny_qwen2_5_vl

TOL = 1e-5
SQUARE = sample_image(84, 84)  # 6×6 patches, 3×3 merged: windows of 4×4, 4×2, 2×4 and 2×2 patches
TALL = sample_image(56, 168, seed=1)  # 12×4 patches: three full windows
WIDE = half_and_half_image(112, 56)  # 4×8 patches, no resize: two full windows, black left, white right
# attention segments in packed order: windows (blocks 0, 2) and images (block 1) of 36 + 48 + 32 patches
WINDOWS = [0, 16, 24, 32, 36, 52, 68, 84, 100, 116]
IMAGES = [0, 36, 84, 116]
N_PATCHES = 116


@pytest.fixture(scope="module")
def qwen():
    raw, processor = tiny_qwen2_5_vl()
    return HookedVLM.from_hf(raw, processor), raw, processor


@pytest.fixture(scope="module")
def eager(qwen):
    _, raw, _ = qwen
    return eager_copy(raw)


@pytest.fixture(scope="module")
def inputs(qwen):
    """Two prompts, left-padded: two images of different shapes in the first, one in the second."""
    _, _, processor = qwen
    texts = [chat(processor, 2, "Compare the two pictures."), chat(processor, 1, "Hi")]
    return dict(processor(text=texts, images=[SQUARE, TALL, WIDE], padding=True, padding_side="left", return_tensors="pt"))


def vision_hidden_states(raw, inputs):
    with torch.no_grad():
        return raw.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True)


# ---------------------------------------------------------------------------------------------------------------
# Outputs with and without hooks.


def test_no_hooks_is_the_stock_forward(qwen, inputs, hook_registrations, hook_counts):
    model, raw, _ = qwen
    before = hook_counts(raw)
    with torch.no_grad():
        ours = model(inputs)
        theirs = raw(**inputs).logits
    assert torch.equal(ours, theirs)
    assert hook_registrations.calls == []
    assert hook_counts(raw) == before


def test_one_hook_and_pattern_capture_keep_logits(qwen, inputs, hook_counts):
    model, raw, _ = qwen
    before = hook_counts(raw)
    patterns = model.hook_names("*.attn.hook_pattern")
    assert len(patterns) == 3 + 2
    with torch.no_grad():
        reference = raw(**inputs).logits
        out, _ = model.run_with_cache(inputs, names_filter="vision.blocks.0.hook_resid_post", stop_early=False)
        assert torch.equal(out, reference)
        out, cache = model.run_with_cache(inputs, names_filter=patterns, stop_early=False)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], reference[real], atol=TOL, rtol=0)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (1, 4, N_PATCHES, N_PATCHES)
    assert all(block.attn.config is raw.model.visual.config for block in raw.model.visual.blocks)
    assert hook_counts(raw) == before


# ---------------------------------------------------------------------------------------------------------------
# Every hook against HF.


def test_vision_residuals_match_vision_hidden_states(qwen, inputs):
    """HF's vision hidden_states are the blocks' inputs/outputs in the tower's own (window) order."""
    model, raw, _ = qwen
    hidden = vision_hidden_states(raw, inputs).hidden_states
    assert len(hidden) == 3 + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=["vision.*.hook_resid_*", "vision.hook_out"])
    for i in range(3):
        assert torch.equal(cache[f"vision.blocks.{i}.hook_resid_pre"][0], hidden[i])
        assert torch.equal(cache[f"vision.blocks.{i}.hook_resid_post"][0], hidden[i + 1])
        mid = cache[f"vision.blocks.{i}.hook_resid_mid"][0]
        block = raw.model.visual.blocks[i]
        torch.testing.assert_close(hidden[i + 1], mid + block.mlp(block.norm2(mid)), atol=TOL, rtol=0)
    assert torch.equal(cache["vision.hook_out"][0], hidden[3])


def test_vision_block_and_merger_hooks_match_module_hooks(qwen, inputs):
    model, raw, _ = qwen
    spec = {"embed": ("model.visual.patch_embed", "out")}
    for i in range(3):
        b = f"model.visual.blocks.{i}"
        spec |= {
            f"{i}.ln1": (f"{b}.norm1", "out"), f"{i}.qkv": (f"{b}.attn.qkv", "out"), f"{i}.z": (f"{b}.attn.proj", "in"),
            f"{i}.attn_out": (f"{b}.attn", "out"), f"{i}.mid": (f"{b}.norm2", "in"), f"{i}.ln2": (f"{b}.norm2", "out"),
            f"{i}.gate": (f"{b}.mlp.gate_proj", "out"), f"{i}.up": (f"{b}.mlp.up_proj", "out"),
            f"{i}.act": (f"{b}.mlp.down_proj", "in"), f"{i}.mlp_out": (f"{b}.mlp", "out"),
        }
    spec |= {
        "merger_in": ("model.visual.merger", "in"), "ln_q": ("model.visual.merger.ln_q", "out"),
        "mlp_in": ("model.visual.merger.mlp", "in"), "mlp0": ("model.visual.merger.mlp.0", "out"),
        "mlp1": ("model.visual.merger.mlp.1", "out"), "merger_out": ("model.visual.merger", "out"),
    }  # fmt: skip
    store, handles = direct_hooks(raw, spec)
    try:
        with torch.no_grad():
            raw(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    attention_function = ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs,
            names_filter=lambda n: n.startswith(("vision.", "projector.")) and not n.endswith(attention_function),
        )

    def same(name, reference):
        assert cache[name].shape[0] == 1, name
        assert torch.equal(cache[name][0], reference), name

    same("vision.hook_embed", store["embed"])
    for i in range(3):
        v, qkv = f"vision.blocks.{i}", store[f"{i}.qkv"].unflatten(-1, (3, 4, 8))
        same(f"{v}.ln1.hook_normalized", store[f"{i}.ln1"])
        for j, kind in enumerate("qkv"):
            same(f"{v}.attn.hook_{kind}", qkv[:, j])
        same(f"{v}.attn.hook_z", store[f"{i}.z"].unflatten(-1, (4, 8)))
        same(f"{v}.hook_attn_out", store[f"{i}.attn_out"])
        same(f"{v}.hook_resid_mid", store[f"{i}.mid"])
        same(f"{v}.ln2.hook_normalized", store[f"{i}.ln2"])
        same(f"{v}.mlp.hook_pre", store[f"{i}.gate"])  # SwiGLU: the gate's pre-activation
        same(f"{v}.mlp.hook_pre_linear", store[f"{i}.up"])
        same(f"{v}.mlp.hook_post", store[f"{i}.act"])
        torch.testing.assert_close(  # hook_post = silu(gate) · up, by hand
            cache[f"{v}.mlp.hook_post"][0], torch.nn.functional.silu(store[f"{i}.gate"]) * store[f"{i}.up"], atol=TOL, rtol=0
        )
        same(f"{v}.hook_mlp_out", store[f"{i}.mlp_out"])
    same("projector.hook_in", store["merger_in"])
    same("projector.ln.hook_normalized", store["ln_q"])
    same("projector.hook_merged", store["ln_q"].reshape(-1, 4 * 32))
    same("projector.hook_merged", store["mlp_in"])
    same("projector.hook_pre", store["mlp0"])
    same("projector.hook_post", store["mlp1"])
    same("projector.hook_out", store["merger_out"])
    # the LM gets the merger's rows with the window order undone
    layout = model.prepare_inputs(inputs).layout
    with torch.no_grad():
        features = raw.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert torch.equal(cache["projector.hook_out"][0][torch.argsort(layout.window_index)], torch.cat(features))


def test_vision_patterns_match_eager_attention_weights(qwen, eager, inputs, monkeypatch):
    """Reference: HF's own eager attention weights, one softmax per window (windowed blocks 0, 2) or per image
    (full block 1), captured from the function the vision attention calls."""
    model, _, processor = qwen
    weights: list[torch.Tensor] = []
    original = modeling_qwen2_5_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, w = original(module, *args, **kwargs)
        if isinstance(module, modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention):
            weights.append(w[0])
        return out, w

    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", recording)
    with torch.no_grad():
        eager(**inputs)
    monkeypatch.undo()
    names = [f"vision.blocks.{i}.attn.{n}" for i in range(3) for n in ("hook_pattern", "hook_attn_scores")]
    ours = HookedVLM.from_hf(eager, processor)
    with torch.no_grad():
        _, cache = ours.run_with_cache(inputs, names_filter=names)
        _, sdpa = model.run_with_cache(inputs, names_filter=names)
    layout = cache.layout
    assert len(weights) == 9 + 3 + 9  # windows of block 0, images of block 1, windows of block 2
    for i, bounds in enumerate([WINDOWS, IMAGES, WINDOWS]):
        assert layout.attention_segments(i) == bounds
        segments = [weights.pop(0) for _ in pairwise(bounds)]
        pattern = cache[f"vision.blocks.{i}.attn.hook_pattern"][0]
        scores = cache[f"vision.blocks.{i}.attn.hook_attn_scores"][0]
        inside = torch.zeros(N_PATCHES, N_PATCHES, dtype=torch.bool)
        for (start, end), reference in zip(pairwise(bounds), segments, strict=True):
            torch.testing.assert_close(pattern[:, start:end, start:end], reference, atol=TOL, rtol=0)
            inside[start:end, start:end] = True
        assert (pattern[:, ~inside] == 0).all() and (scores[:, ~inside] == torch.finfo(scores.dtype).min).all()
        torch.testing.assert_close(sdpa[f"vision.blocks.{i}.attn.hook_pattern"][0], pattern, atol=TOL, rtol=0)


def test_windows_are_squares_of_the_raster_grid(qwen, inputs):
    """Each windowed segment holds the patches of one 4×4 (or clipped) square of its image's raster grid."""
    model, _, _ = qwen
    vision = model.prepare_inputs(inputs).layout["vision"]
    for start, end in pairwise(WINDOWS):
        image = vision.image[0, start:end]
        window_row, window_col = vision.row[0, start:end] // 4, vision.col[0, start:end] // 4
        assert (image == image[0]).all() and (window_row == window_row[0]).all() and (window_col == window_col[0]).all()
    sizes = [b - a for a, b in pairwise(WINDOWS)]
    assert sizes == [16, 8, 8, 4, 16, 16, 16, 16, 16]


def test_lm_hooks_match_hidden_states_and_eager_attentions(qwen, eager, inputs):
    model, raw, _ = qwen
    with torch.no_grad():
        out = raw(**inputs, output_hidden_states=True)
        attentions = eager(**inputs, output_attentions=True).attentions
        _, cache = model.run_with_cache(inputs, names_filter=["lm.*.hook_resid_post", "lm.hook_embed", "lm.ln_final.*"])
        _, patterns = model.run_with_cache(inputs, names_filter="lm.*.attn.hook_pattern")
    hidden = out.hidden_states
    assert torch.equal(cache["lm.hook_embed"], hidden[0])
    assert torch.equal(cache["lm.blocks.0.hook_resid_post"], hidden[1])
    assert torch.equal(cache["lm.ln_final.hook_normalized"], hidden[2])
    torch.testing.assert_close(raw.model.language_model.norm(cache["lm.blocks.1.hook_resid_post"]), hidden[2], atol=0, rtol=0)
    real = inputs["attention_mask"].bool()
    for i in range(2):
        pattern = patterns[f"lm.blocks.{i}.attn.hook_pattern"].transpose(1, 2)
        torch.testing.assert_close(pattern[real], attentions[i].transpose(1, 2)[real], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Layout and edits.


def test_raster_layout_undoes_the_window_order(qwen):
    """Left half black, right half white: every vision hook, in window order, maps back to the same raster grid as
    the patch embeddings (processor order); the LM's image tokens are the merger's rows on the merged grid."""
    model, _, _ = qwen
    names = ["vision.hook_embed", "vision.blocks.0.hook_resid_pre", "projector.hook_out", "lm.hook_embed"]
    with torch.no_grad():
        _, cache = model.run_with_cache([SQUARE, WIDE], prompt="x", names_filter=names)
    layout = cache.layout
    for j in (0, 1):
        embed, pre = (layout.image_grid(n, cache[n], image=j) for n in names[:2])
        assert torch.equal(embed, pre)
        out, lm = (layout.image_grid(n, cache[n], image=j) for n in names[2:])
        assert torch.equal(out, lm)
    wide = layout.image_grid("vision.blocks.0.hook_resid_pre", cache["vision.blocks.0.hook_resid_pre"], image=1)
    left, right = wide[:, :4].flatten(0, 1), wide[:, 4:].flatten(0, 1)
    assert wide.shape[:2] == (4, 8) and (left == left[0]).all() and (right == right[0]).all()
    assert not torch.equal(left[0], right[0])
    assert layout["vision"].grids == [(6, 6), (4, 8)] and layout["lm"].grids == [(3, 3), (2, 4)]


def test_edit_at_one_patch_stays_in_its_window_then_its_image(qwen, inputs):
    """A change to one patch before windowed block 0 changes block 0's output only inside that patch's window,
    and full block 1's output only inside that patch's image."""
    model, _, _ = qwen
    layout = model.prepare_inputs(inputs).layout
    target = int(layout["vision"].grid_index(1, 0)[1][5, 2])  # image 1 (TALL), raster row 5, col 2
    window = next((a, b) for a, b in pairwise(WINDOWS) if a <= target < b)
    image = (IMAGES[1], IMAGES[2])

    def bump(resid, hook):
        resid = resid.clone()
        resid[0, target] += 5.0
        return resid

    names = ["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"]
    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter=names)
        with model.hooks(fwd_hooks=[("vision.blocks.0.hook_resid_pre", bump)]):
            _, edited = model.run_with_cache(inputs, names_filter=names)
    for name, (start, end) in zip(names, (window, image), strict=True):
        changed = (edited[name][0] - base[name][0]).abs().amax(-1) > 0
        assert changed[start:end].all(), name
        assert not changed[:start].any() and not changed[end:].any(), name


def test_edit_at_one_lm_image_token_changes_only_later_positions(qwen, inputs):
    model, raw, processor = qwen
    image_positions = (inputs["input_ids"][0] == processor.image_token_id).nonzero()[:, 0]
    position = int(image_positions[3])

    def bump(resid, hook):
        resid = resid.clone()
        resid[0, position] += 3.0
        return resid

    with torch.no_grad():
        reference = raw(**inputs).logits
        edited = model.run_with_hooks(inputs, fwd_hooks=[("lm.blocks.0.hook_resid_post", bump)])
    changed = (edited - reference).abs().amax(-1) > 1e-4
    assert not changed[0, :position].any() and changed[0, position:].all()
    assert not changed[1].any()  # the other prompt is untouched


def test_early_stop_never_runs_the_language_model(qwen, inputs):
    model, raw, _ = qwen
    calls = []
    handle = raw.model.language_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad():
            out, cache = model.run_with_cache(inputs, names_filter="vision.blocks.1.attn.hook_pattern")
    finally:
        handle.remove()
    assert out is None and list(cache) == ["vision.blocks.1.attn.hook_pattern"] and calls == []
    with torch.no_grad():
        assert torch.equal(model(inputs), raw(**inputs).logits)  # no state left from the stopped run


def test_selectors_and_token_counts(qwen, inputs):
    model, _, processor = qwen
    layout = model.prepare_inputs(inputs).layout
    image = inputs["input_ids"] == processor.image_token_id
    assert torch.equal(layout.mask("image", "lm.blocks.0.hook_resid_post"), image)
    assert torch.equal(layout.mask("text", "lm.blocks.0.hook_resid_post"), inputs["attention_mask"].bool() & ~image)
    assert layout.mask("patches", "vision.blocks.2.hook_resid_post").shape == (1, N_PATCHES)
    assert layout.mask("patches", "projector.ln.hook_normalized").shape == (1, N_PATCHES)
    assert layout.mask("all", "projector.hook_out").shape == (1, N_PATCHES // 4)
    for j, (w, h) in enumerate([(84, 84), (56, 168), (112, 56)]):
        expected = processor.image_processor.get_number_of_image_patches(h, w, {})
        assert int((layout["vision"].image == j).sum()) == expected
        assert int(((layout["lm"].kind == Kind.IMAGE) & (layout["lm"].image == j)).sum()) == expected // 4


def test_generate_matches_the_unwrapped_model(qwen, inputs):
    model, raw, _ = qwen
    options = dict(max_new_tokens=3, do_sample=False, min_new_tokens=3)
    with torch.no_grad():
        theirs = raw.generate(**inputs, **options)
        ours = model.generate(inputs, cache_names=["vision.blocks.2.attn.hook_pattern"], **options)
    assert torch.equal(ours.sequences, theirs)
    assert len(ours.step_cache["vision.blocks.2.attn.hook_pattern"]) == 1  # the images are encoded once


@pytest.mark.parametrize(
    ("name", "d_lm", "layers", "heads", "kv_heads"),
    [("Qwen/Qwen2.5-VL-3B-Instruct", 2048, 36, 16, 2), ("Qwen/Qwen2.5-VL-7B-Instruct", 3584, 28, 28, 4)],
)
def test_real_size_configs_on_meta(name, d_lm, layers, heads, kv_heads):
    raw = meta_model(name)
    assert isinstance(raw, Qwen2_5_VLForConditionalGeneration)
    model = HookedVLM.from_hf(raw)
    assert model.adapter.family == "qwen2_5_vl"
    vision, lm = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head, vision.d_mlp) == (32, 1280, 16, 80, 3420)
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads, lm.d_head) == (layers, d_lm, heads, kv_heads, 128)
    per_vision_block = len(model.hook_names("vision.blocks.0.*"))
    assert len(model.hook_names("vision.blocks.*")) == 32 * per_vision_block
    assert "vision.blocks.31.mlp.hook_pre_linear" in model.hook_dict
    for hook in model.hook_dict.values():  # every tap names a real module of the checkpoint's tree
        raw.get_submodule(hook.tap.module)
    visual = raw.model.visual
    assert visual.blocks[0].mlp.gate_proj.out_features == 3420 and visual.merger.mlp[2].out_features == d_lm
    assert visual.fullatt_block_indexes == [7, 15, 23, 31] and visual.window_size == 112
    assert raw.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    layout = model.prepare_inputs(real_size_inputs(model)).layout
    assert layout.attention_segments(0) == [0, 64, 128, 192, 256]  # 224 px: 16×16 patches, four 8×8 windows
    assert layout.attention_segments(7) == [0, 256]



def test_head_results_sum_to_the_attention_output(qwen, inputs):
    """``attn.hook_result`` per head, summed over heads plus ``proj``'s bias, is the block's attention output."""
    model, raw, _ = qwen
    names = ["vision.blocks.0.attn.hook_result", "vision.blocks.0.hook_attn_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
    result = cache[names[0]]
    assert result.shape == (1, N_PATCHES, 4, 32)
    total = result.sum(2) + raw.model.visual.blocks[0].attn.proj.bias
    torch.testing.assert_close(total, cache[names[1]], atol=TOL, rtol=0)
