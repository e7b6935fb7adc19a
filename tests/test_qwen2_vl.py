"""Qwen2-VL through HookedVLM, checked against HF's own outputs, PyTorch hooks placed straight on the HF modules,
an eager recomputation of vision attention from the modules' own q/k and rotary, and hand-made edits."""

from itertools import pairwise

import pytest
import torch
from PIL import Image
from reference import chat, direct_hooks, eager_copy
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from hooked_vlm import HookedVLM
from hooked_vlm.layout import Kind
from hooked_vlm.testing import half_and_half_image, meta_model, sample_image
from hooked_vlm.testing.qwen2_vl import tiny_qwen2_vl

TOL = 1e-5
WIDE = half_and_half_image(112, 56)  # a 4×8 patch grid: no resize, so the black/white split falls on patch edges
TALL = sample_image(56, 168, seed=1)  # 12×4 patches
SQUAT = sample_image(100, 70)  # resized to 56×112: 4×8 patches


@pytest.fixture(scope="module")
def qwen():
    raw, processor = tiny_qwen2_vl()
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
    return dict(processor(text=texts, images=[SQUAT, TALL, WIDE], padding=True, padding_side="left", return_tensors="pt"))


def module_values(raw, inputs, spec):
    store, handles = direct_hooks(raw, spec)
    try:
        with torch.no_grad():
            raw(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return store


def vision_configs_restored(raw) -> bool:
    return all(block.attn.config is raw.model.visual.config for block in raw.model.visual.blocks)


# ---------------------------------------------------------------------------------------------------------------
# Outputs and every hook against HF.


def test_no_hooks_is_the_stock_forward(qwen, inputs, hook_registrations, hook_counts):
    model, raw, _ = qwen
    before = hook_counts(raw)
    with torch.no_grad():
        ours = model(inputs)
        theirs = raw(**inputs).logits
    assert torch.equal(ours, theirs)
    assert hook_registrations.calls == []
    assert hook_counts(raw) == before


def test_one_hook_and_pattern_capture_keep_logits(qwen, inputs):
    model, raw, _ = qwen
    patterns = model.hook_names("*.attn.hook_pattern")
    assert len(patterns) == 4
    with torch.no_grad():
        reference = raw(**inputs).logits
        out, _ = model.run_with_cache(inputs, names_filter="lm.blocks.0.hook_resid_post", stop_early=False)
        assert torch.equal(out, reference)
        out, cache = model.run_with_cache(inputs, names_filter=patterns, stop_early=False)
    real = inputs["attention_mask"].bool()  # left padding: what a fully masked query row yields differs (unused)
    torch.testing.assert_close(out[real], reference[real], atol=TOL, rtol=0)
    assert cache["vision.blocks.1.attn.hook_pattern"].shape == (1, 4, 112, 112)  # 32 + 48 + 32 packed patches
    assert vision_configs_restored(raw)
    assert raw.model.language_model.layers[0].self_attn.config is raw.model.language_model.config


def test_lm_hooks_match_hidden_states_and_eager_attentions(qwen, eager, inputs):
    model, raw, _ = qwen
    n = model.adapter.towers()[1].n_layers
    with torch.no_grad():
        out = raw(**inputs, output_hidden_states=True)
        attentions = eager(**inputs, output_attentions=True).attentions
        _, cache = model.run_with_cache(inputs, names_filter="lm.*.hook_resid_post", stop_early=False)
        _, cache2 = model.run_with_cache(inputs, names_filter=["lm.hook_embed", "lm.ln_final.hook_normalized"])
        _, patterns = model.run_with_cache(inputs, names_filter="lm.*.attn.hook_pattern")
    hidden = out.hidden_states  # layer 0's input, every layer's output but the last, then the final norm's output
    assert torch.equal(cache2["lm.hook_embed"], hidden[0])
    for i in range(n - 1):
        assert torch.equal(cache[f"lm.blocks.{i}.hook_resid_post"], hidden[i + 1])
    last = cache[f"lm.blocks.{n - 1}.hook_resid_post"]
    torch.testing.assert_close(raw.model.language_model.norm(last), hidden[n], atol=0, rtol=0)
    assert torch.equal(cache2["lm.ln_final.hook_normalized"], hidden[n])
    real = inputs["attention_mask"].bool()
    for i in range(n):
        pattern = patterns[f"lm.blocks.{i}.attn.hook_pattern"].transpose(1, 2)  # [batch, q, head, k]
        torch.testing.assert_close(pattern[real], attentions[i].transpose(1, 2)[real], atol=TOL, rtol=0)


def test_vision_and_projector_hooks_match_module_hooks(qwen, inputs):
    model, raw, _ = qwen
    spec = {"embed": ("model.visual.patch_embed", "out")}
    for i in range(2):
        b = f"model.visual.blocks.{i}"
        spec |= {
            f"{i}.pre": (b, "in"), f"{i}.ln1": (f"{b}.norm1", "out"), f"{i}.qkv": (f"{b}.attn.qkv", "out"),
            f"{i}.z": (f"{b}.attn.proj", "in"), f"{i}.attn_out": (f"{b}.attn", "out"), f"{i}.mid": (f"{b}.norm2", "in"),
            f"{i}.ln2": (f"{b}.norm2", "out"), f"{i}.fc1": (f"{b}.mlp.fc1", "out"), f"{i}.act": (f"{b}.mlp.fc2", "in"),
            f"{i}.mlp_out": (f"{b}.mlp", "out"), f"{i}.post": (b, "out"),
        }
    spec |= {
        "merger_in": ("model.visual.merger", "in"), "ln_q": ("model.visual.merger.ln_q", "out"),
        "mlp_in": ("model.visual.merger.mlp", "in"), "mlp0": ("model.visual.merger.mlp.0", "out"),
        "mlp1": ("model.visual.merger.mlp.1", "out"), "merger_out": ("model.visual.merger", "out"),
    }
    ref = module_values(raw, inputs, spec)
    attention_function = ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs,
            names_filter=lambda name: name.startswith(("vision.", "projector.")) and not name.endswith(attention_function),
            stop_early=False,
        )

    def same(name, reference):
        assert cache[name].shape[0] == 1, name  # packed: one leading axis over all images
        assert torch.equal(cache[name][0], reference), name

    same("vision.hook_embed", ref["embed"])
    for i in range(2):
        v = f"vision.blocks.{i}"
        qkv = ref[f"{i}.qkv"].unflatten(-1, (3, 4, 8))
        same(f"{v}.hook_resid_pre", ref[f"{i}.pre"])
        same(f"{v}.ln1.hook_normalized", ref[f"{i}.ln1"])
        for j, kind in enumerate("qkv"):
            same(f"{v}.attn.hook_{kind}", qkv[:, j])
        same(f"{v}.attn.hook_z", ref[f"{i}.z"].unflatten(-1, (4, 8)))
        same(f"{v}.hook_attn_out", ref[f"{i}.attn_out"])
        same(f"{v}.hook_resid_mid", ref[f"{i}.mid"])
        same(f"{v}.ln2.hook_normalized", ref[f"{i}.ln2"])
        same(f"{v}.mlp.hook_pre", ref[f"{i}.fc1"])
        same(f"{v}.mlp.hook_post", ref[f"{i}.act"])
        same(f"{v}.hook_mlp_out", ref[f"{i}.mlp_out"])
        same(f"{v}.hook_resid_post", ref[f"{i}.post"])
    same("vision.hook_out", ref["1.post"])
    same("projector.hook_in", ref["merger_in"])
    same("projector.ln.hook_normalized", ref["ln_q"])
    same("projector.hook_merged", ref["ln_q"].reshape(-1, 4 * 32))  # the 2×2 merge: 4 consecutive patches
    same("projector.hook_merged", ref["mlp_in"])
    same("projector.hook_pre", ref["mlp0"])
    same("projector.hook_post", ref["mlp1"])
    same("projector.hook_out", ref["merger_out"])
    with torch.no_grad():
        features = raw.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert torch.equal(cache["projector.hook_out"][0], torch.cat(features))


def test_vision_attention_matches_eager_recomputation_per_image(qwen, inputs):
    """Reference: the HF module's own qkv and rotary (cos/sin the block was called with), softmax per image."""
    model, raw, _ = qwen
    block = raw.model.visual.blocks[1]
    seen = {}
    handles = [
        block.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True),
        block.norm1.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o)),
    ]
    try:
        with torch.no_grad():
            raw(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    q, k, v = block.attn.qkv(seen["x"]).reshape(-1, 3, 4, 8).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    names = [f"vision.blocks.1.attn.{n}" for n in ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z")]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
    torch.testing.assert_close(cache[names[0]][0], q, atol=TOL, rtol=0)
    torch.testing.assert_close(cache[names[1]][0], k, atol=TOL, rtol=0)
    scores, pattern = cache[names[2]][0], cache[names[3]][0]
    bounds = seen["cu_seqlens"].tolist()
    assert bounds == [0, 32, 80, 112]  # one attention segment per image, in packed order
    inside = torch.zeros(112, 112, dtype=torch.bool)
    for start, end in pairwise(bounds):
        qi, ki = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
        expected = (qi @ ki.transpose(1, 2)) * 8**-0.5
        torch.testing.assert_close(scores[:, start:end, start:end], expected, atol=TOL, rtol=0)
        torch.testing.assert_close(pattern[:, start:end, start:end], expected.softmax(-1), atol=TOL, rtol=0)
        inside[start:end, start:end] = True
    assert (pattern[:, ~inside] == 0).all()  # block-diagonal: attention never crosses images
    assert (scores[:, ~inside] == torch.finfo(scores.dtype).min).all()
    z = (pattern @ v.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(cache[names[4]][0], z, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Edits.


def test_vision_pattern_and_score_edits_mean_what_they_say(qwen, inputs):
    model, raw, _ = qwen
    bounds = [0, 32, 80, 112]
    cached = {}

    def keep(t, hook):
        cached[hook.name] = t

    def uniform_per_image(pattern, hook):
        inside = pattern > 0
        return inside / inside.sum(-1, keepdim=True)

    def flat_scores(scores, hook):  # scores 0 everywhere, cross-image entries included
        return torch.zeros_like(scores)

    for edit, edit_fn in (("hook_pattern", uniform_per_image), ("hook_attn_scores", flat_scores)):
        with torch.no_grad():
            logits = model.run_with_hooks(
                inputs,
                fwd_hooks=[
                    (f"vision.blocks.0.attn.{edit}", edit_fn),
                    ("vision.blocks.0.attn.hook_v", keep),
                    ("vision.blocks.0.attn.hook_z", keep),
                ],
            )
        v, z = cached["vision.blocks.0.attn.hook_v"][0], cached["vision.blocks.0.attn.hook_z"][0]
        if edit == "hook_pattern":
            for start, end in pairwise(bounds):
                torch.testing.assert_close(z[start:end], v[start:end].mean(0).expand_as(z[start:end]), atol=TOL, rtol=0)
        else:  # the edit is honoured across images too: every patch attends to all patches of the run
            torch.testing.assert_close(z, v.mean(0).expand_as(z), atol=TOL, rtol=0)
        assert not torch.allclose(logits, raw(**inputs).logits, atol=1e-3)


def test_fused_qkv_edits_write_back(qwen, inputs):
    model, _, _ = qwen
    cached = {}

    def keep(t, hook):
        cached[hook.name] = t

    def zero(t, hook):
        return torch.zeros_like(t)

    with torch.no_grad():
        model.run_with_hooks(
            inputs,
            fwd_hooks=[
                ("vision.blocks.0.attn.hook_q", zero),
                ("vision.blocks.0.attn.hook_v", zero),
                ("vision.blocks.0.attn.hook_k", keep),
                ("vision.blocks.0.attn.hook_rot_q", keep),
                ("vision.blocks.0.attn.hook_rot_k", keep),
                ("vision.blocks.0.attn.hook_z", keep),
            ],
        )
    assert (cached["vision.blocks.0.attn.hook_rot_q"] == 0).all()  # q = 0 stays 0 under rotary
    assert (cached["vision.blocks.0.attn.hook_z"] == 0).all()  # v = 0 ⇒ z = 0
    assert cached["vision.blocks.0.attn.hook_rot_k"].abs().sum() > 0  # k untouched
    assert cached["vision.blocks.0.attn.hook_k"].abs().sum() > 0


def test_rotary_hooks_alone_keep_the_models_own_attention(qwen, eager, inputs):
    """With only rot_q/rot_k hooked, each image's attention runs on the model's own implementation."""
    model, raw, processor = qwen
    bounds = [0, 32, 80, 112]
    cached = {}

    def keep(t, hook):
        cached[hook.name] = t

    with torch.no_grad():
        reference = raw(**inputs).logits
        out, _ = model.run_with_cache(inputs, names_filter="vision.*.attn.hook_rot_*", stop_early=False)
        torch.testing.assert_close(out, reference, atol=TOL, rtol=0)
        out, _ = HookedVLM.from_hf(eager, processor).run_with_cache(
            inputs, names_filter="vision.*.attn.hook_rot_*", stop_early=False
        )
        torch.testing.assert_close(out, eager(**inputs).logits, atol=TOL, rtol=0)
        edited = model.run_with_hooks(
            inputs,
            fwd_hooks=[
                ("vision.blocks.1.attn.hook_rot_q", lambda t, hook: torch.zeros_like(t)),  # ⇒ uniform within an image
                ("vision.blocks.1.attn.hook_v", keep),
                ("vision.blocks.1.attn.hook_z", keep),
            ],
        )
    v, z = cached["vision.blocks.1.attn.hook_v"][0], cached["vision.blocks.1.attn.hook_z"][0]
    for start, end in pairwise(bounds):
        torch.testing.assert_close(z[start:end], v[start:end].mean(0).expand_as(z[start:end]), atol=TOL, rtol=0)
    assert not torch.allclose(edited, reference, atol=1e-3)


def test_patching_vision_resid_mid_matches_hand_edit(qwen, inputs):
    model, raw, _ = qwen
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="vision.blocks.0.hook_resid_mid")
    new_mid = cache["vision.blocks.0.hook_resid_mid"].flip(1)  # [1, patches, d]: another patch order

    block = raw.model.visual.blocks[0]
    handle = block.register_forward_hook(lambda m, a, o: new_mid[0] + m.mlp(m.norm2(new_mid[0])))
    try:
        with torch.no_grad():
            expected = raw(**inputs).logits
    finally:
        handle.remove()
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.0.hook_resid_mid", lambda t, hook: new_mid)])
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_lm_pattern_edit_means_what_it_says(qwen, inputs):
    model, raw, _ = qwen
    cached = {}

    def keep(t, hook):
        cached[hook.name] = t

    def attend_to_self(pattern, hook):
        return torch.eye(pattern.shape[-1]).expand_as(pattern)

    with torch.no_grad():
        same = model.run_with_hooks(inputs, fwd_hooks=[("lm.blocks.1.attn.hook_pattern", lambda t, hook: t.clone())])
        edited = model.run_with_hooks(
            inputs,
            fwd_hooks=[
                ("lm.blocks.1.attn.hook_pattern", attend_to_self),
                ("lm.blocks.1.attn.hook_v", keep),
                ("lm.blocks.1.attn.hook_z", keep),
            ],
        )
        reference = raw(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[real], reference[real], atol=TOL, rtol=0)
    v = cached["lm.blocks.1.attn.hook_v"]  # [batch, pos, 2 kv heads, d_head]: query head h reads kv head h // 2
    torch.testing.assert_close(cached["lm.blocks.1.attn.hook_z"], v.repeat_interleave(2, dim=2), atol=TOL, rtol=0)
    assert not torch.allclose(edited, reference, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Layout.


@pytest.mark.parametrize("size", [(100, 70), (56, 168), (224, 56), (90, 90), (300, 300), (31, 200)])
def test_image_token_counts_match_the_processor(qwen, size):
    model, _, processor = qwen
    other = sample_image(60, 60, seed=2)
    prepared = model.prepare_inputs([sample_image(*size), other], prompt="Two images.")
    layout = prepared.layout
    lm, vision, projector = layout["lm"], layout["vision"], layout["projector"]
    for j, (w, h) in enumerate([size, (60, 60)]):
        expected = processor.image_processor.get_number_of_image_patches(h, w, {})
        assert int((vision.image == j).sum()) == expected
        assert int((projector.image == j).sum()) == expected // 4
        assert int(((lm.kind == Kind.IMAGE) & (lm.image == j)).sum()) == expected // 4
        t, gh, gw = layout.image_grid_thw[j].tolist()
        assert (t, gh * gw) == (1, expected) and vision.grids[j] == (gh, gw) and lm.grids[j] == (gh // 2, gw // 2)
    n_pads = int((prepared.kwargs["input_ids"] == processor.image_token_id).sum())
    assert int((lm.kind == Kind.IMAGE).sum()) == n_pads


def test_raster_mapping_undoes_the_merge_windows(qwen):
    """Left half black, right half white (and the same turned by 90°): the patch embeddings' grid columns (rows)
    must split the same way. Later hooks mix positions (attention), so the merged grid and the LM's image tokens
    are checked against the patch grid through the model's own merge and scatter."""
    model, _, _ = qwen
    tall = WIDE.transpose(Image.Transpose.ROTATE_90)  # top half white, bottom half black
    names = ["vision.hook_embed", "projector.ln.hook_normalized", "projector.hook_merged", "projector.hook_out", "lm.hook_embed"]
    with torch.no_grad():
        _, cache = model.run_with_cache([WIDE, tall], prompt="x", names_filter=names)
        _, single = model.run_with_cache(WIDE, prompt="x", names_filter=names)
    layout = cache.layout

    def halves(grid, axis):
        first, second = (half.flatten(0, 1) for half in grid.chunk(2, dim=axis))
        return (first == first[0]).all() and (second == second[0]).all() and not torch.equal(first[0], second[0])

    wide, turned = (layout.image_grid("vision.hook_embed", cache["vision.hook_embed"], image=j) for j in (0, 1))
    assert wide.shape[:2] == (4, 8) and turned.shape[:2] == (8, 4)
    assert halves(wide, 1) and halves(turned, 0)
    assert torch.equal(wide[0, 0], turned[-1, 0])  # black top-left of one is the black bottom-left of the other
    for j in (0, 1):
        normed, merged, out, lm = (layout.image_grid(n, cache[n], image=j) for n in names[1:])
        rows, cols = normed.shape[:2]
        windows = normed.reshape(rows // 2, 2, cols // 2, 2, -1).transpose(1, 2).flatten(2)  # 2×2 windows, raster
        assert torch.equal(merged, windows) and torch.equal(lm, out)
    for name in names:
        grid = single.to_patch_grid(name)
        assert torch.equal(grid[0], single.layout.image_grid(name, single[name]))
    assert single.to_patch_grid("lm.hook_embed").shape == (1, 2, 4, 32)
    with pytest.raises(ValueError, match="several images"):
        cache.to_patch_grid("vision.hook_embed")


def test_position_selectors_and_sliced_caches(qwen, inputs):
    model, _, processor = qwen
    layout = model.prepare_inputs(inputs).layout
    image = inputs["input_ids"] == processor.image_token_id
    assert torch.equal(layout.mask("image", "lm.blocks.0.hook_resid_post"), image)
    assert torch.equal(layout.mask("text", "lm.blocks.0.hook_resid_post"), inputs["attention_mask"].bool() & ~image)
    assert layout.mask("patches", "vision.blocks.0.hook_resid_post").shape == (1, 112)
    assert layout.mask("patches", "projector.ln.hook_normalized").shape == (1, 112)  # the merger's norm runs per patch
    assert layout.mask("patches", "projector.hook_out").all() and layout.mask("all", "projector.hook_out").shape == (1, 28)

    one = model.prepare_inputs(WIDE, prompt="What is on the left?")  # "image" keeps the same count in every row
    names = ["lm.blocks.0.hook_resid_post", "lm.blocks.0.attn.hook_pattern", "vision.blocks.0.attn.hook_z"]
    with torch.no_grad():
        _, full = model.run_with_cache(one, names_filter=names)
        _, part = model.run_with_cache(one, names_filter=names[:2], positions="image", heads=[1])
    picked = (one.kwargs["input_ids"][0] == processor.image_token_id).nonzero()[:, 0]
    assert torch.equal(part[names[0]], full[names[0]][:, picked])
    assert torch.equal(part[names[1]], full[names[1]][:, [1]][:, :, picked])
    patch_mask = torch.zeros(4, 8, dtype=torch.bool)
    patch_mask[0, 5] = True  # row 0, col 5: merge window (0, 2), offset (0, 1) → packed index 2 · 4 + 1
    with torch.no_grad():
        _, corner = model.run_with_cache(one, names_filter="vision.blocks.0.attn.hook_z", positions=patch_mask)
    assert int(full.layout["vision"].grid_index(0)[1][0, 5]) == 9
    assert torch.equal(corner["vision.blocks.0.attn.hook_z"], full["vision.blocks.0.attn.hook_z"][:, [9]])


# ---------------------------------------------------------------------------------------------------------------
# State, generation, loading.


def test_runs_do_not_leak_state(qwen, inputs):
    model, raw, processor = qwen
    a = dict(processor(text=[chat(processor, 1, "A")], images=[SQUAT], return_tensors="pt"))
    with torch.no_grad():
        first = model(a)
        assert model(inputs).shape[0] == 2  # B: another batch size, several images
        out, cache = model.run_with_cache(inputs, names_filter="vision.blocks.0.attn.hook_rot_q")  # stops mid-replay
        assert out is None and list(cache) == ["vision.blocks.0.attn.hook_rot_q"]
        model.generate(inputs, max_new_tokens=2, do_sample=False)
        model(prompt="text only")
        raw.model.rope_deltas = torch.tensor([[17], [-3]])  # stale offsets of some earlier use of the raw model
        again = model(a)
        fresh = raw(**a).logits
    assert torch.equal(first, again) and torch.equal(again, fresh)
    assert vision_configs_restored(raw)


def test_generate_with_hooks_at_every_step(qwen):
    model, raw, processor = qwen
    prompts = ["Describe.", "What is on the left?"]
    raw_inputs = dict(
        processor(
            text=[chat(processor, 1, p) for p in prompts], images=[SQUAT, WIDE], padding=True, padding_side="left",
            return_tensors="pt",
        )
    )
    options = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with torch.no_grad():
        theirs = raw.generate(**raw_inputs, **options)
        ours = model.generate([SQUAT, WIDE], prompt=prompts, **options)
        _, prompt_cache = model.run_with_cache(raw_inputs, names_filter="lm.blocks.1.hook_resid_post")
        recorded = model.generate(
            [SQUAT, WIDE], prompt=prompts, cache_names=["lm.blocks.1.hook_resid_post", "vision.hook_out"],
            cache_device="cpu", **options,
        )
    assert torch.equal(ours.sequences, theirs) and torch.equal(recorded.sequences, theirs)
    steps = recorded.step_cache["lm.blocks.1.hook_resid_post"]
    assert [s.shape[1] for s in steps] == [raw_inputs["input_ids"].shape[1], 1, 1, 1]
    torch.testing.assert_close(steps[0], prompt_cache["lm.blocks.1.hook_resid_post"], atol=TOL, rtol=0)
    assert len(recorded.step_cache["vision.hook_out"]) == 1  # the images are encoded once, at prefill

    direction = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 20

    def steer(resid, hook):
        return resid + direction

    with torch.no_grad(), model.hooks(fwd_hooks=[("lm.blocks.0.hook_resid_post", steer)]):
        steered = model.generate([SQUAT, WIDE], prompt=prompts, **options)
        again = model.generate([SQUAT, WIDE], prompt=prompts, **options)
    assert torch.equal(steered.sequences, again.sequences)
    assert not torch.equal(steered.new_tokens, ours.new_tokens)
    assert steered.text == processor.batch_decode(steered.new_tokens, skip_special_tokens=True)


def test_from_pretrained_device_map_and_pixel_bounds(qwen, tmp_path, monkeypatch):
    _, raw, processor = qwen
    raw.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu")
    assert loaded.adapter.family == "qwen2_vl" and not hasattr(loaded.raw_model, "hf_device_map")
    prepared = loaded.prepare_inputs(SQUAT, prompt="Hi")
    with torch.no_grad():
        reference = raw(**prepared.kwargs).logits
        assert torch.equal(loaded(prepared), reference)
        expected = raw.generate(**prepared.kwargs, max_new_tokens=3, do_sample=False)

    # accelerate dispatches (and hooks) a model only when its map spans several devices; on a CPU-only machine,
    # offloading one LM block to disk gets there. No device is named, so a .to("cuda") would fail here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device_map = {
        "model.visual": "cpu", "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    mapped = HookedVLM.from_pretrained(
        str(tmp_path), device_map=device_map, offload_folder=str(tmp_path / "offload"), max_pixels=64 * 28 * 28
    )
    assert hasattr(mapped.raw_model, "hf_device_map")
    names = ["vision.blocks.1.attn.hook_pattern", "lm.blocks.1.attn.hook_pattern", "lm.blocks.1.hook_resid_post"]
    with torch.no_grad():
        logits, cache = mapped.run_with_cache(prepared, names_filter=names, stop_early=False)
    torch.testing.assert_close(logits, reference, atol=TOL, rtol=0)
    assert len(cache) == 3
    assert torch.equal(mapped.generate(prepared, max_new_tokens=3, do_sample=False).sequences, expected)

    big = sample_image(400, 300)  # max_pixels at load time sets the processor's bound; min/max_pixels per call too
    assert mapped.prepare_inputs(big, prompt="Hi").layout.image_grid_thw.tolist() == [[1, 12, 18]]
    assert loaded.prepare_inputs(big, prompt="Hi").layout.image_grid_thw.tolist() == [[1, 6, 8]]
    per_call = loaded.prepare_inputs(big, prompt="Hi", min_pixels=36 * 28 * 28, max_pixels=36 * 28 * 28)
    assert per_call.layout.image_grid_thw.tolist() == [[1, 10, 12]]


@pytest.mark.parametrize(
    ("name", "d_lm", "heads", "kv_heads"),
    [("Qwen/Qwen2-VL-2B-Instruct", 1536, 12, 2), ("Qwen/Qwen2-VL-7B-Instruct", 3584, 28, 4)],
)
def test_real_size_configs_on_meta(name, d_lm, heads, kv_heads):
    raw = meta_model(name)
    assert isinstance(raw, Qwen2VLForConditionalGeneration)
    model = HookedVLM.from_hf(raw)
    vision, lm = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head, vision.d_mlp) == (32, 1280, 16, 80, 5120)
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads, lm.d_head) == (28, d_lm, heads, kv_heads, 128)
    assert len(model.hook_names("vision.blocks.*")) == 32 * 18 and len(model.hook_names("lm.blocks.*")) == 28 * 19
    for hook in model.hook_dict.values():  # every tap names a real module of the checkpoint's tree
        raw.get_submodule(hook.tap.module)
    assert raw.model.visual.blocks[0].attn.qkv.out_features == 3 * 1280
    assert raw.model.visual.merger.mlp[0].in_features == 4 * 1280 and raw.model.visual.merger.mlp[2].out_features == d_lm
    assert raw.model.language_model.layers[0].self_attn.k_proj.out_features == kv_heads * 128
    assert raw.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_bad_inputs(qwen, inputs):
    model, raw, _ = qwen
    with pytest.raises(TypeError, match="image_grid_thw"):
        model(torch.zeros(4, 1176))
    with pytest.raises(NotImplementedError, match="video"):
        model({**inputs, "pixel_values_videos": torch.zeros(1)})
    with pytest.raises(ValueError, match="2 prompts for 3 image lists"):
        model([[SQUAT], [TALL], [WIDE]], prompt=["a", "b"])
    with pytest.raises(TypeError, match="not both"):
        model(SQUAT, prompt="a", text="b")
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}  # as a 4.x processor returned them
    with torch.no_grad():
        assert torch.equal(model(without), raw(**inputs).logits)
    assert model.prepare_inputs(SQUAT, prompt="a").kwargs.keys() == model.prepare_inputs(
        dict(model.processor(text=[chat(model.processor, 1, "a")], images=[SQUAT], return_tensors="pt"))
    ).kwargs.keys()
