"""Qwen3-VL through HookedVLM, checked against HF's own outputs (output_hidden_states of both towers, the eager
attention weights of every image, the features HF injects with DeepStack), PyTorch hooks placed straight on the HF
modules, interleaved M-RoPE and QK norm computed by hand, and hand-made edits."""

from itertools import pairwise

import pytest
import torch
from hooked_vlm.adapters.qwen2_vl import window_order
from reference import chat, direct_hooks, eager_copy
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl import modeling_qwen3_vl

from hooked_vlm import HookedVLM
from hooked_vlm.layout import Kind
from hooked_vlm.testing import half_and_half_image, meta_model, real_size_inputs, sample_image
from hooked_vlm.testing.qwen3_vl import tiny_qwen3_vl, tiny_qwen3_vl_moe

TOL = 1e-5
SQUARE = sample_image(96, 96)  # 6×6 patches of 16 px, 3×3 merged tokens
TALL = sample_image(64, 128, seed=1)  # 8×4 patches
WIDE = half_and_half_image(128, 64)  # 4×8 patches, black left, white right
IMAGES = [0, 36, 68, 100]  # packed patch offsets of the three images
N_PATCHES = 100
D_VISION, D_LM, D_HEAD_LM = 32, 32, 16
DEEPSTACK = [0, 1]  # vision blocks feeding the deepstack mergers; their features are added after LM blocks 0, 1


@pytest.fixture(scope="module")
def qwen():
    raw, processor = tiny_qwen3_vl()
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
    return dict(
        processor(text=texts, images=[SQUARE, TALL, WIDE], padding=True, padding_side="left", return_tensors="pt")
    )


def run_with_direct_hooks(raw, inputs, spec):
    store, handles = direct_hooks(raw, spec)
    try:
        with torch.no_grad():
            logits = raw(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return store, logits


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
    assert "_deepstack_process" not in raw.model.language_model.__dict__


def test_one_hook_deepstack_hooks_and_pattern_capture_keep_logits(qwen, inputs, hook_counts):
    model, raw, _ = qwen
    before = hook_counts(raw)
    patterns = model.hook_names("*.attn.hook_pattern")
    assert len(patterns) == 3 + 3
    with torch.no_grad():
        reference = raw(**inputs).logits
        out, _ = model.run_with_cache(inputs, names_filter="vision.blocks.0.hook_resid_post", stop_early=False)
        assert torch.equal(out, reference)
        out, _ = model.run_with_cache(inputs, names_filter=["*deepstack*"], stop_early=False)
        assert torch.equal(out, reference)  # the replaced addition is bit-identical to HF's in-place one
        out, cache = model.run_with_cache(inputs, names_filter=patterns, stop_early=False)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], reference[real], atol=TOL, rtol=0)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (1, 4, N_PATCHES, N_PATCHES)
    assert all(block.attn.config is raw.model.visual.config for block in raw.model.visual.blocks)
    assert "_deepstack_process" not in raw.model.language_model.__dict__
    assert hook_counts(raw) == before


# ---------------------------------------------------------------------------------------------------------------
# Every hook against HF.


def test_vision_residuals_match_vision_hidden_states(qwen, inputs):
    model, raw, _ = qwen
    with torch.no_grad():
        hidden = raw.model.visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True
        ).hidden_states
        _, cache = model.run_with_cache(inputs, names_filter=["vision.*.hook_resid_*", "vision.hook_*"])
    assert len(hidden) == 3 + 1
    assert torch.equal(cache["vision.hook_embed"][0], hidden[0])
    for i in range(3):
        assert torch.equal(cache[f"vision.blocks.{i}.hook_resid_pre"][0], hidden[i])
        assert torch.equal(cache[f"vision.blocks.{i}.hook_resid_post"][0], hidden[i + 1])
        mid = cache[f"vision.blocks.{i}.hook_resid_mid"][0]
        block = raw.model.visual.blocks[i]
        torch.testing.assert_close(hidden[i + 1], mid + block.mlp(block.norm2(mid)), atol=TOL, rtol=0)
    assert torch.equal(cache["vision.hook_out"][0], hidden[3])


def test_position_embeddings_are_the_learned_table_resampled_to_each_grid(qwen, inputs):
    """vision.hook_embed − vision.hook_patch_embed: the 4×4 learned table, bilinearly resampled (align_corners) to
    each image's patch grid, in the processor's merge-window order: computed here with F.interpolate."""
    model, raw, _ = qwen
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=["vision.hook_patch_embed", "vision.hook_embed"])
    added = (cache["vision.hook_embed"] - cache["vision.hook_patch_embed"])[0]
    table = raw.model.visual.pos_embed.weight.detach().reshape(4, 4, D_VISION).permute(2, 0, 1)[None]
    for (start, end), (_, h, w) in zip(pairwise(IMAGES), inputs["image_grid_thw"].tolist(), strict=True):
        grid = torch.nn.functional.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]
        rows, cols = window_order(h, w, 2)
        torch.testing.assert_close(added[start:end], grid[:, rows, cols].T, atol=TOL, rtol=0)


def test_vision_block_merger_and_deepstack_hooks_match_module_hooks(qwen, inputs):
    model, raw, _ = qwen
    spec = {"patch_embed": ("model.visual.patch_embed", "out")}
    for i in range(3):
        b = f"model.visual.blocks.{i}"
        spec |= {
            f"{i}.in": (b, "in"),
            f"{i}.out": (b, "out"),
            f"{i}.ln1": (f"{b}.norm1", "out"),
            f"{i}.qkv": (f"{b}.attn.qkv", "out"),
            f"{i}.z": (f"{b}.attn.proj", "in"),
            f"{i}.attn_out": (f"{b}.attn", "out"),
            f"{i}.mid": (f"{b}.norm2", "in"),
            f"{i}.ln2": (f"{b}.norm2", "out"),
            f"{i}.fc1": (f"{b}.mlp.linear_fc1", "out"),
            f"{i}.act": (f"{b}.mlp.linear_fc2", "in"),
            f"{i}.mlp_out": (f"{b}.mlp", "out"),
        }
    mergers = {"projector": "model.visual.merger"}
    mergers |= {f"projector.deepstack.{k}": f"model.visual.deepstack_merger_list.{k}" for k in range(2)}
    for prefix, path in mergers.items():
        spec |= {
            f"{prefix}.in": (path, "in"),
            f"{prefix}.norm_in": (f"{path}.norm", "in"),
            f"{prefix}.norm": (f"{path}.norm", "out"),
            f"{prefix}.fc1_in": (f"{path}.linear_fc1", "in"),
            f"{prefix}.fc1": (f"{path}.linear_fc1", "out"),
            f"{prefix}.act": (f"{path}.act_fn", "out"),
            f"{prefix}.out": (path, "out"),
        }
    store, _ = run_with_direct_hooks(raw, inputs, spec)
    attention_function = ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs,
            names_filter=lambda n: n.startswith(("vision.", "projector.")) and not n.endswith(attention_function),
        )

    def same(name, reference):
        assert cache[name].shape[0] == 1, name
        assert torch.equal(cache[name][0], reference), name

    same("vision.hook_patch_embed", store["patch_embed"])
    same("vision.hook_embed", store["0.in"])
    for i in range(3):
        v, qkv = f"vision.blocks.{i}", store[f"{i}.qkv"].unflatten(-1, (3, 4, 8))
        same(f"{v}.ln1.hook_normalized", store[f"{i}.ln1"])
        for j, kind in enumerate("qkv"):
            same(f"{v}.attn.hook_{kind}", qkv[:, j])
        same(f"{v}.attn.hook_z", store[f"{i}.z"].unflatten(-1, (4, 8)))
        same(f"{v}.hook_attn_out", store[f"{i}.attn_out"])
        same(f"{v}.hook_resid_mid", store[f"{i}.mid"])
        same(f"{v}.ln2.hook_normalized", store[f"{i}.ln2"])
        same(f"{v}.mlp.hook_pre", store[f"{i}.fc1"])
        same(f"{v}.mlp.hook_post", store[f"{i}.act"])
        same(f"{v}.hook_mlp_out", store[f"{i}.mlp_out"])
    # the main merger norms per patch, then merges; the deepstack mergers merge, then norm the merged vector
    same("projector.hook_in", store["2.out"])
    same("projector.ln.hook_normalized", store["projector.norm"])
    same("projector.hook_merged", store["projector.norm"].reshape(-1, 4 * D_VISION))
    same("projector.hook_merged", store["projector.fc1_in"])
    for k, block in enumerate(DEEPSTACK):
        p = f"projector.deepstack.{k}"
        same(f"{p}.hook_in", store[f"{block}.out"])  # the output of vision block deepstack_visual_indexes[k]
        same(f"{p}.hook_merged", store[f"{block}.out"].reshape(-1, 4 * D_VISION))
        same(f"{p}.hook_merged", store[f"{p}.norm_in"])
        same(f"{p}.ln.hook_normalized", store[f"{p}.norm"])
        same(f"{p}.ln.hook_normalized", store[f"{p}.fc1_in"])
    for p in mergers:
        same(f"{p}.hook_pre", store[f"{p}.fc1"])
        same(f"{p}.hook_post", store[f"{p}.act"])
        same(f"{p}.hook_out", store[f"{p}.out"])
    with torch.no_grad():
        features = raw.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(cache["projector.hook_out"][0], torch.cat(features.pooler_output))
    for k in range(2):
        assert torch.equal(cache[f"projector.deepstack.{k}.hook_out"][0], torch.cat(features.deepstack_features[k]))


def test_vision_patterns_match_eager_attention_weights(qwen, eager, inputs, monkeypatch):
    """Reference: HF's own eager attention weights, one softmax per image, captured from the function the vision
    attention calls (once per image, as cu_seqlens splits the packed sequence)."""
    model, _, processor = qwen
    weights: list[torch.Tensor] = []
    original = modeling_qwen3_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, w = original(module, *args, **kwargs)
        if isinstance(module, modeling_qwen3_vl.Qwen3VLVisionAttention):
            weights.append(w[0])
        return out, w

    monkeypatch.setattr(modeling_qwen3_vl, "eager_attention_forward", recording)
    with torch.no_grad():
        eager(**inputs)
    monkeypatch.undo()
    names = [f"vision.blocks.{i}.attn.{n}" for i in range(3) for n in ("hook_pattern", "hook_attn_scores")]
    ours = HookedVLM.from_hf(eager, processor)
    with torch.no_grad():
        _, cache = ours.run_with_cache(inputs, names_filter=names)
        _, sdpa = model.run_with_cache(inputs, names_filter=names)
    assert len(weights) == 3 * 3
    for i in range(3):
        pattern = cache[f"vision.blocks.{i}.attn.hook_pattern"][0]
        scores = cache[f"vision.blocks.{i}.attn.hook_attn_scores"][0]
        inside = torch.zeros(N_PATCHES, N_PATCHES, dtype=torch.bool)
        for start, end in pairwise(IMAGES):
            torch.testing.assert_close(pattern[:, start:end, start:end], weights.pop(0), atol=TOL, rtol=0)
            inside[start:end, start:end] = True
        assert (pattern[:, ~inside] == 0).all() and (scores[:, ~inside] == torch.finfo(scores.dtype).min).all()
        torch.testing.assert_close(sdpa[f"vision.blocks.{i}.attn.hook_pattern"][0], pattern, atol=TOL, rtol=0)


def test_lm_hooks_match_hidden_states_and_eager_attentions(qwen, eager, inputs):
    """HF's LM hidden_states are each decoder layer's output, before the DeepStack addition that follows it."""
    model, raw, _ = qwen
    with torch.no_grad():
        out = raw(**inputs, output_hidden_states=True)
        attentions = eager(**inputs, output_attentions=True).attentions
        _, cache = model.run_with_cache(inputs, names_filter=["lm.*.hook_resid_*", "lm.hook_embed", "lm.ln_final.*"])
        _, patterns = model.run_with_cache(inputs, names_filter="lm.*.attn.hook_pattern")
    hidden = out.hidden_states
    assert len(hidden) == 3 + 1
    assert torch.equal(cache["lm.hook_embed"], hidden[0])
    assert torch.equal(cache["lm.blocks.0.hook_resid_pre"], hidden[0])
    for i in range(2):
        assert torch.equal(cache[f"lm.blocks.{i}.hook_resid_post"], hidden[i + 1])
    assert torch.equal(cache["lm.ln_final.hook_normalized"], hidden[3])
    torch.testing.assert_close(
        raw.model.language_model.norm(cache["lm.blocks.2.hook_resid_post"]), hidden[3], atol=0, rtol=0
    )
    real = inputs["attention_mask"].bool()
    for i in range(3):
        pattern = patterns[f"lm.blocks.{i}.attn.hook_pattern"].transpose(1, 2)
        torch.testing.assert_close(pattern[real], attentions[i].transpose(1, 2)[real], atol=TOL, rtol=0)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def test_qk_norm_and_interleaved_mrope_by_hand(qwen, inputs):
    """q_norm/k_norm outputs are RMSNorm per head of hook_q/hook_k; hook_rot_q/k rotate them with frequencies
    assigned to (t, h, w) round-robin (sections [4, 2, 2] of 8: t h w t h w t t), from the model's 3-D positions."""
    model, raw, _ = qwen
    a = "lm.blocks.1.attn."
    names = [
        a + n
        for n in ("hook_q", "hook_k", "q_norm.hook_normalized", "k_norm.hook_normalized", "hook_rot_q", "hook_rot_k")
    ]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
        positions, _ = raw.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
    attn = raw.model.language_model.layers[1].self_attn
    for kind, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
        x = cache[a + f"hook_{kind}"]
        by_hand = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        torch.testing.assert_close(cache[a + f"{kind}_norm.hook_normalized"], by_hand, atol=TOL, rtol=0)
    n_freq = D_HEAD_LM // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D_HEAD_LM, 2).float() / D_HEAD_LM))
    axis = torch.tensor(
        [1 if j % 3 == 1 and j < 3 * 2 else 2 if j % 3 == 2 and j < 3 * 2 else 0 for j in range(n_freq)]
    )
    assert axis.tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    angles = positions[axis].permute(1, 2, 0).float() * inv_freq  # [batch, seq, n_freq]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None]  # one per head
    for kind in "qk":
        x = cache[a + f"{kind}_norm.hook_normalized"]
        rotated = x * angles.cos() + _rotate_half(x) * angles.sin()
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(cache[a + f"hook_rot_{kind}"][real], rotated[real], atol=1e-4, rtol=0)
    image = inputs["input_ids"] == raw.config.image_token_id
    assert not torch.equal(positions[1][image], positions[2][image])  # rows and columns differ on the image


# ---------------------------------------------------------------------------------------------------------------
# DeepStack.


def test_deepstack_hooks_equal_what_hf_injects(qwen, inputs):
    """Reference: plain PyTorch hooks on the HF decoder layers; what the next layer (or the final norm) receives
    minus what layer k returned is HF's DeepStack addition, at the image tokens only."""
    model, raw, processor = qwen
    lm = "model.language_model"
    spec = {f"{k}.out": (f"{lm}.layers.{k}", "out") for k in range(2)}
    spec |= {"1.next": (f"{lm}.layers.2", "in"), "0.next": (f"{lm}.layers.1", "in")}
    store, _ = run_with_direct_hooks(raw, inputs, spec)
    names = ["lm.blocks.*.hook_deepstack", "lm.blocks.*.hook_resid_*", "projector.deepstack.*.hook_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
    assert "lm.blocks.2.hook_deepstack" not in model.hook_dict  # two deepstack levels, after LM blocks 0 and 1
    image = inputs["input_ids"] == processor.image_token_id
    for k in range(2):
        added = cache[f"lm.blocks.{k}.hook_deepstack"]
        assert added.shape == (2, inputs["input_ids"].shape[1], D_LM)
        injected = store[f"{k}.next"] - store[f"{k}.out"]
        torch.testing.assert_close(added, injected, atol=TOL, rtol=0)
        assert (added[~image] == 0).all() and (injected[~image] == 0).all()
        assert torch.equal(added[image], cache[f"projector.deepstack.{k}.hook_out"][0])  # rows in image-token order
        assert torch.equal(cache[f"lm.blocks.{k + 1}.hook_resid_pre"], cache[f"lm.blocks.{k}.hook_resid_post"] + added)
        assert torch.equal(cache[f"lm.blocks.{k}.hook_resid_post"], store[f"{k}.out"])
    assert torch.equal(cache["lm.blocks.2.hook_resid_pre"], store["1.next"])


def test_removing_one_deepstack_level_matches_hf_without_it(qwen, inputs):
    """Zeroing lm.blocks.0.hook_deepstack, or projector.deepstack.0.hook_out, gives the logits of HF's model whose
    deepstack merger 0 returns zeros (a forward hook on the HF module); level 1 still counts."""
    model, raw, _ = qwen
    handle = raw.model.visual.deepstack_merger_list[0].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            without = raw(**inputs).logits
    finally:
        handle.remove()
    with torch.no_grad():
        full = raw(**inputs).logits
        by_lm = model.run_with_hooks(
            inputs, fwd_hooks=[("lm.blocks.0.hook_deepstack", lambda x, hook: torch.zeros_like(x))]
        )
        by_merger = model.run_with_hooks(
            inputs, fwd_hooks=[("projector.deepstack.0.hook_out", lambda x, hook: torch.zeros_like(x))]
        )
        both = model.run_with_hooks(inputs, fwd_hooks=[("*.hook_deepstack", lambda x, hook: torch.zeros_like(x))])
    assert not torch.allclose(without, full, atol=1e-3)
    assert torch.equal(by_lm, without) and torch.equal(by_merger, without)
    assert not torch.allclose(both, without, atol=1e-3)


def test_an_edit_of_a_deepstack_mergers_input_changes_only_what_deepstack_injects(qwen, inputs):
    """projector.deepstack.0.hook_in is the merger's own input: editing it leaves vision block 1 and the main merger
    alone, and changes deepstack level 0 only."""
    model, _, _ = qwen
    names = ["vision.blocks.1.hook_resid_post", "projector.hook_out", "projector.deepstack.0.hook_out"]
    names += ["projector.deepstack.1.hook_out", "lm.hook_embed"]
    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter=names)
        with model.hooks(fwd_hooks=[("projector.deepstack.0.hook_in", lambda x, hook: x * 2)]):
            _, edited = model.run_with_cache(inputs, names_filter=names)
    for name in names:
        assert torch.equal(edited[name], base[name]) == (name != "projector.deepstack.0.hook_out"), name


def test_gradients_flow_through_the_deepstack_addition(qwen, inputs):
    """The merger output reaches the LM only through the addition: its gradient is hook_deepstack's gradient at the
    image tokens (attribution patching relies on it)."""
    model, _, processor = qwen
    kept = {}

    def keep(x, hook):
        kept[hook.name] = x = x.clone()
        x.retain_grad()
        return x

    names = ["projector.deepstack.0.hook_out", "lm.blocks.0.hook_deepstack"]
    logits = model.run_with_hooks(inputs, fwd_hooks=[(name, keep) for name in names])
    logits[:, -1].sum().backward()
    model.raw_model.zero_grad(set_to_none=True)
    image = inputs["input_ids"] == processor.image_token_id
    merger, added = (kept[name].grad for name in names)
    assert merger.abs().max() > 0
    assert torch.equal(merger[0], added[image])


def test_deepstack_edit_at_one_text_position_changes_only_later_positions(qwen, inputs):
    """An edit is honoured where the model adds nothing too: a text position's addition, and only what follows."""
    model, raw, processor = qwen
    text = ((inputs["input_ids"][0] != processor.image_token_id) & inputs["attention_mask"][0].bool()).nonzero()[:, 0]
    position = int(text[-3])

    def bump(added, hook):
        added[0, position] += 2.0  # in place: the edited tensor is what gets added

    with torch.no_grad():
        reference = raw(**inputs).logits
        edited = model.run_with_hooks(inputs, fwd_hooks=[("lm.blocks.1.hook_deepstack", bump)])
    changed = (edited - reference).abs().amax(-1) > 1e-4
    assert not changed[0, :position].any() and changed[0, position:].all()
    assert not changed[1].any()


# ---------------------------------------------------------------------------------------------------------------
# Layout and edits.


def test_edit_at_one_patch_stays_in_its_image(qwen, inputs):
    model, _, _ = qwen
    layout = model.prepare_inputs(inputs).layout
    target = int(layout["vision"].grid_index(1, 0)[1][5, 2])  # image 1 (TALL), raster row 5, col 2
    assert IMAGES[1] <= target < IMAGES[2]

    def bump(resid, hook):
        resid = resid.clone()
        resid[0, target] += torch.linspace(-5.0, 5.0, D_VISION)  # not constant: LayerNorm would cancel a constant shift
        return resid

    name = "vision.blocks.0.hook_resid_post"
    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter=name)
        with model.hooks(fwd_hooks=[("vision.blocks.0.hook_resid_pre", bump)]):
            _, edited = model.run_with_cache(inputs, names_filter=name)
    changed = (edited[name][0] - base[name][0]).abs().amax(-1) > 0
    assert changed[IMAGES[1] : IMAGES[2]].all()
    assert not changed[: IMAGES[1]].any() and not changed[IMAGES[2] :].any()


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
    assert not changed[1].any()


def test_layout_maps_every_hook_to_the_same_raster_grid(qwen):
    """Left half black, right half white: vision hooks (merge-window order) and the deepstack merger's input map
    back to the same raster patch grid; the deepstack output, the projector output and the LM's image tokens to
    the merged grid."""
    model, _, _ = qwen
    names = [
        "vision.hook_patch_embed",
        "projector.deepstack.0.hook_in",
        "projector.deepstack.0.hook_out",
        "lm.hook_embed",
    ]
    with torch.no_grad():
        _, cache = model.run_with_cache([SQUARE, WIDE], prompt="x", names_filter=names + ["projector.hook_out"])
    layout = cache.layout
    assert layout.tower_for("projector.deepstack.0.hook_in") is layout["vision"]
    assert layout.tower_for("projector.deepstack.1.ln.hook_normalized") is layout["projector"]
    wide = layout.image_grid(names[0], cache[names[0]], image=1)
    left, right = wide[:, :4].flatten(0, 1), wide[:, 4:].flatten(0, 1)
    assert wide.shape[:2] == (4, 8) and (left == left[0]).all() and (right == right[0]).all()
    assert not torch.equal(left[0], right[0])
    assert layout.image_grid(names[1], cache[names[1]], image=1).shape == (4, 8, D_VISION)
    merged = layout.image_grid("projector.hook_out", cache["projector.hook_out"], image=1)
    assert torch.equal(merged, layout.image_grid("lm.hook_embed", cache["lm.hook_embed"], image=1))
    assert layout.image_grid(names[2], cache[names[2]], image=1).shape == (2, 4, D_LM)
    assert layout["vision"].grids == [(6, 6), (4, 8)] and layout["lm"].grids == [(3, 3), (2, 4)]


def test_early_stop_never_runs_the_language_model(qwen, inputs):
    model, raw, _ = qwen
    calls = []
    handle = raw.model.language_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad():
            out, cache = model.run_with_cache(inputs, names_filter="projector.deepstack.1.hook_out")
    finally:
        handle.remove()
    assert out is None and list(cache) == ["projector.deepstack.1.hook_out"] and calls == []
    with torch.no_grad():
        assert torch.equal(model(inputs), raw(**inputs).logits)


def test_selectors_and_token_counts(qwen, inputs):
    model, _, processor = qwen
    layout = model.prepare_inputs(inputs).layout
    image = inputs["input_ids"] == processor.image_token_id
    assert torch.equal(layout.mask("image", "lm.blocks.0.hook_deepstack"), image)
    assert torch.equal(layout.mask("text", "lm.blocks.0.hook_resid_post"), inputs["attention_mask"].bool() & ~image)
    assert layout.mask("patches", "vision.blocks.2.hook_resid_post").shape == (1, N_PATCHES)
    assert layout.mask("patches", "projector.deepstack.0.hook_in").shape == (1, N_PATCHES)
    assert layout.mask("all", "projector.deepstack.0.hook_merged").shape == (1, N_PATCHES // 4)
    for j, (w, h) in enumerate([(96, 96), (64, 128), (128, 64)]):
        expected = processor.image_processor.get_number_of_image_patches(h, w, {})
        assert int((layout["vision"].image == j).sum()) == expected
        assert int(((layout["lm"].kind == Kind.IMAGE) & (layout["lm"].image == j)).sum()) == expected // 4


def test_generate_matches_the_unwrapped_model(qwen, inputs):
    model, raw, _ = qwen
    options = dict(max_new_tokens=3, do_sample=False, min_new_tokens=3)
    with torch.no_grad():
        theirs = raw.generate(**inputs, **options)
        ours = model.generate(inputs, cache_names=["lm.blocks.0.hook_deepstack"], **options)
    assert torch.equal(ours.sequences, theirs)
    assert len(ours.step_cache["lm.blocks.0.hook_deepstack"]) == 1  # added once, in the prompt's forward


def test_head_results_sum_to_the_attention_output(qwen, inputs):
    model, raw, _ = qwen
    names = ["lm.blocks.0.attn.hook_result", "lm.blocks.0.hook_attn_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
    assert cache[names[0]].shape == (2, inputs["input_ids"].shape[1], 4, D_LM)
    torch.testing.assert_close(cache[names[0]].sum(2), cache[names[1]], atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "vision_sizes", "lm_sizes", "deepstack"),
    [
        ("Qwen/Qwen3-VL-2B-Instruct", (24, 1024, 4096), (28, 2048, 16, 8, 6144), [5, 11, 17]),
        ("Qwen/Qwen3-VL-4B-Instruct", (24, 1024, 4096), (36, 2560, 32, 8, 9728), [5, 11, 17]),
        ("Qwen/Qwen3-VL-8B-Instruct", (27, 1152, 4304), (36, 4096, 32, 8, 12288), [8, 16, 24]),
    ],
)
def test_real_size_configs_on_meta(name, vision_sizes, lm_sizes, deepstack):
    raw = meta_model(name)
    assert isinstance(raw, Qwen3VLForConditionalGeneration)
    model = HookedVLM.from_hf(raw)
    assert model.adapter.family == "qwen3_vl"
    vision, lm = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.d_mlp, vision.n_heads, vision.d_head) == (
        *vision_sizes,
        16,
        vision_sizes[1] // 16,
    )
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads, lm.d_mlp, lm.d_head) == (*lm_sizes, 128)
    per_vision_block = len(model.hook_names("vision.blocks.0.*"))
    per_lm_block = len(model.hook_names("lm.blocks.20.*"))
    assert len(model.hook_names("vision.blocks.*")) == vision.n_layers * per_vision_block
    assert len(model.hook_names("lm.blocks.*")) == lm.n_layers * per_lm_block + 3  # + hook_deepstack of blocks 0-2
    assert model.hook_names("lm.blocks.*.hook_deepstack") == [f"lm.blocks.{k}.hook_deepstack" for k in range(3)]
    assert len(model.hook_names("projector.deepstack.*")) == 3 * 6
    for hook in model.hook_dict.values():  # every tap names a real module of the checkpoint's tree
        raw.get_submodule(hook.tap.module)
    assert model.adapter.deepstack_visual_indexes == deepstack
    assert raw.config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert raw.model.visual.deepstack_merger_list[0].linear_fc2.out_features == lm.d_model
    layout = model.prepare_inputs(real_size_inputs(model)).layout
    assert layout["vision"].shape == (1, 256) and layout["projector"].shape == (1, 64)  # 256 px: 16×16 patches


def test_moe_variant_hooks_its_sparse_blocks_at_their_boundaries():
    """Qwen3-VL-MoE: sparse MoE blocks (router + fused experts) have hook_mlp_out but no mlp.hook_pre/post; the
    dense block of mlp_only_layers has them all; DeepStack is the same."""
    raw, processor = tiny_qwen3_vl_moe()
    model = HookedVLM.from_hf(raw, processor)
    assert model.adapter.family == "qwen3_vl" and model.adapter.towers()[1].d_mlp is None
    assert model.hook_names("lm.blocks.0.mlp.*") == [] and model.hook_names("lm.blocks.2.mlp.*") == []
    assert model.hook_names("lm.blocks.1.mlp.*") == [f"lm.blocks.1.mlp.hook_{n}" for n in ("pre", "pre_linear", "post")]
    prepared = model.prepare_inputs([SQUARE], prompt="x")
    spec = {f"{i}": (f"model.language_model.layers.{i}.mlp", "out") for i in range(3)}
    store, logits = run_with_direct_hooks(raw, prepared.kwargs, spec)
    with torch.no_grad():
        out, cache = model.run_with_cache(
            prepared, names_filter=["lm.*.hook_mlp_out", "*.hook_deepstack"], stop_early=False
        )
    assert torch.equal(out, logits)
    for i in range(3):
        assert torch.equal(cache[f"lm.blocks.{i}.hook_mlp_out"], store[f"{i}"])
    assert set(model.hook_names("*.hook_deepstack")) == {"lm.blocks.0.hook_deepstack", "lm.blocks.1.hook_deepstack"}


def test_activation_patching_of_deepstack_and_lm_hooks_equals_hand_patches(qwen):
    """Batched patching (the vision tower runs for every copy: the LM takes the DeepStack features too) equals
    patching one cell at a time by hand with run_with_hooks."""
    from hooked_vlm.patching import activation_patching
    from hooked_vlm.readouts import LogitDiff

    model, _, _ = qwen
    readout = LogitDiff("A", "B", tokenizer=model)
    clean, corrupted = (model.prepare_inputs(sample_image(96, 64, seed=s), prompt="Answer A or B.") for s in (0, 3))
    hooks = ["lm.blocks.*.hook_deepstack", "lm.blocks.*.hook_resid_post"]
    result = activation_patching(
        model, clean, corrupted, readout, hooks, positions="image", batch_size=4, progress=False
    )
    image = clean.layout.mask("image", "lm.hook_embed")[0].nonzero()[:, 0]
    assert result.values.shape == (5, len(image)) and (result.effect().abs() > 1e-4).any()
    with torch.no_grad():
        _, source = model.run_with_cache(clean, names_filter=["*.hook_deepstack", "lm.blocks.*.hook_resid_post"])
    for row, name in enumerate(result.labels["hook"]):
        for column in (0, len(image) - 1):
            position = int(image[column])

            def patch(x, hook, position=position):
                x = x.clone()
                x[:, position] = source[hook.name][:, position]
                return x

            with torch.no_grad():
                logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
            by_hand = float(readout(logits, None).mean())
            torch.testing.assert_close(float(result.values[row, column]), by_hand, atol=2e-5, rtol=0)
