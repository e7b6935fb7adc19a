"""DINOv2 (with and without registers) through HookedVLM, against HF's own outputs and hand computations: every block
hook with layer scale in place, per-head results after λ₁, the decomposition, CLS / register / patch selectors."""

import copy

import pytest
import torch
from reference import forward_with_direct_hooks

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.testing import meta_model, sample_image, tiny_dinov2

TOL = 1e-5
VARIANTS = {"plain": {}, "registers": {"registers": 2}, "swiglu": {"swiglu": True}}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def dino(request):
    """``(variant, model, raw, eager copy, processor outputs)`` for two images of different aspect ratios."""
    raw, processor = tiny_dinov2(**VARIANTS[request.param])
    eager = copy.deepcopy(raw)
    eager.set_attn_implementation("eager")
    images = [sample_image(seed=0), sample_image(seed=1, width=40, height=100)]
    inputs = dict(processor(images=images, return_tensors="pt"))
    return request.param, HookedVLM.from_hf(raw, processor), raw, eager, inputs


def _references(raw, n_layers, swiglu, inputs):
    spec = {}
    for i in range(n_layers):
        layer = f"encoder.layer.{i}"
        spec |= {
            f"{i}.ln1": (f"{layer}.norm1", "out"),
            f"{i}.q": (f"{layer}.attention.q_proj", "out"),
            f"{i}.k": (f"{layer}.attention.k_proj", "out"),
            f"{i}.v": (f"{layer}.attention.v_proj", "out"),
            f"{i}.z": (f"{layer}.attention.o_proj", "in"),
            f"{i}.o": (f"{layer}.attention.o_proj", "out"),
            f"{i}.attn_out": (f"{layer}.layer_scale1", "out"),
            f"{i}.mid": (f"{layer}.norm2", "in"),
            f"{i}.ln2": (f"{layer}.norm2", "out"),
            f"{i}.pre": (f"{layer}.mlp.{'gate_proj' if swiglu else 'fc1'}", "out"),
            f"{i}.post": (f"{layer}.mlp.{'down_proj' if swiglu else 'fc2'}", "in"),
            f"{i}.mlp": (f"{layer}.mlp", "out"),
            f"{i}.mlp_out": (f"{layer}.layer_scale2", "out"),
        }
        if swiglu:
            spec[f"{i}.up"] = (f"{layer}.mlp.up_proj", "out")
    store, out = forward_with_direct_hooks(raw, spec, **inputs, output_hidden_states=True)
    return store, out


def test_every_block_hook_matches_hf(dino):
    variant, model, raw, eager, inputs = dino
    (info,) = model.adapter.towers()
    store, out = _references(raw, info.n_layers, variant == "swiglu", inputs)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision."), stop_early=False)
    heads = lambda t: t.unflatten(-1, (info.n_heads, info.d_head))  # noqa: E731
    for i in range(info.n_layers):
        p = f"vision.blocks.{i}."
        scale1 = raw.encoder.layer[i].layer_scale1.lambda1
        assert not torch.allclose(scale1, torch.ones(())), "a layer scale of ones would not test its placement"
        expected = {
            "hook_resid_pre": out.hidden_states[i],
            "ln1.hook_normalized": store[f"{i}.ln1"],
            "attn.hook_q": heads(store[f"{i}.q"]),
            "attn.hook_k": heads(store[f"{i}.k"]),
            "attn.hook_v": heads(store[f"{i}.v"]),
            "attn.hook_pattern": attentions[i],
            "attn.hook_z": heads(store[f"{i}.z"]),
            "hook_attn_out": store[f"{i}.attn_out"],  # after λ₁: what the block adds
            "hook_resid_mid": store[f"{i}.mid"],
            "ln2.hook_normalized": store[f"{i}.ln2"],
            "mlp.hook_pre": store[f"{i}.pre"],
            "mlp.hook_post": store[f"{i}.post"],
            "hook_mlp_out": store[f"{i}.mlp_out"],  # after λ₂
            "hook_resid_post": out.hidden_states[i + 1],
        }
        if variant == "swiglu":
            expected["mlp.hook_pre_linear"] = store[f"{i}.up"]
        for name, reference in expected.items():
            torch.testing.assert_close(cache[p + name], reference, atol=TOL, rtol=0, msg=f"{variant} {p}{name}")
        torch.testing.assert_close(cache[p + "hook_attn_out"], store[f"{i}.o"] * scale1, atol=TOL, rtol=0)
        torch.testing.assert_close(
            cache[p + "hook_resid_mid"], cache[p + "hook_resid_pre"] + cache[p + "hook_attn_out"], atol=0, rtol=0
        )
        torch.testing.assert_close(
            cache[p + "hook_resid_post"], cache[p + "hook_resid_mid"] + cache[p + "hook_mlp_out"], atol=0, rtol=0
        )
        torch.testing.assert_close(cache[p + "attn.hook_attn_scores"].softmax(-1), attentions[i], atol=TOL, rtol=0)
    torch.testing.assert_close(cache["vision.hook_embed"], out.hidden_states[0], atol=0, rtol=0)
    torch.testing.assert_close(cache["vision.ln_final.hook_normalized"], out.last_hidden_state, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["vision.hook_out"], out.pooler_output, atol=TOL, rtol=0)


def test_head_results_are_z_times_w_o_and_the_decomposition_scales_them(dino):
    """attn.hook_result is z[head] @ W_O[head] before λ₁, as in every family; the adapter's attn_layer_scale is λ₁."""
    _, model, raw, _, inputs = dino
    (info,) = model.adapter.towers()
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: "blocks.1" in n, stop_early=False)
    layer = raw.encoder.layer[1]
    z, result = cache["vision.blocks.1.attn.hook_z"], cache["vision.blocks.1.attn.hook_result"]
    for head in range(info.n_heads):
        cols = slice(head * info.d_head, (head + 1) * info.d_head)
        by_hand = z[:, :, head] @ layer.attention.o_proj.weight[:, cols].T
        torch.testing.assert_close(result[:, :, head], by_hand, atol=TOL, rtol=0)
    scale = model.adapter.attn_layer_scale("vision", 1)
    assert scale is layer.layer_scale1.lambda1
    projected = result.sum(-2) + layer.attention.o_proj.bias
    torch.testing.assert_close(projected * scale, cache["vision.blocks.1.hook_attn_out"], atol=TOL, rtol=0)
    from hooked_vlm.decomposition import Tower

    torch.testing.assert_close(Tower(model, "vision").head_results(cache, 1), result * scale, atol=0, rtol=0)

    def double_head_1(x, hook):
        x = x.clone()
        x[..., 1, :] *= 2
        return x

    with torch.no_grad():
        with model.hooks([("vision.blocks.1.attn.hook_result", double_head_1)]):
            by_result = model(inputs)
        with model.hooks([("vision.blocks.1.attn.hook_z", double_head_1)]):
            by_z = model(inputs)
        plain = model(inputs)
    assert not torch.allclose(by_z, plain, atol=1e-4)
    torch.testing.assert_close(by_result, by_z, atol=TOL, rtol=0)


def test_full_decomposition_sums_to_the_final_residual(dino):
    _, model, raw, _, inputs = dino
    from hooked_vlm.decomposition import needed_hooks

    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=[*needed_hooks(), "vision.hook_out"], stop_early=False)
    stack, labels = cache.get_full_resid_decomposition(tower="vision", return_labels=True)
    assert labels[-2:] == ["embed", "bias"] and len(labels) == 2 * 4 + 2 + 2
    torch.testing.assert_close(stack.sum(0), cache["vision.blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        cache.get_full_resid_decomposition(1, mlp_input=True, tower="vision").sum(0),
        cache["vision.blocks.1.hook_resid_mid"], atol=1e-5, rtol=0,
    )  # fmt: skip
    # through the final layernorm at the CLS token: the pooled output, up to the norm's bias
    at_cls = cache.get_full_resid_decomposition(tower="vision", pos_slice=0, apply_ln=True)
    torch.testing.assert_close(at_cls.sum(0) + raw.layernorm.bias, cache["vision.hook_out"], atol=1e-4, rtol=0)


def test_outputs_with_no_hook_one_hook_and_pattern_capture_equal_the_raw_models(dino):
    _, model, raw, _, inputs = dino
    with torch.no_grad():
        reference = raw(**inputs).pooler_output
        plain = model(inputs)
        one = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.hook_resid_mid", lambda x, hook: None)])
        with_patterns = model.run_with_hooks(
            inputs, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)]
        )
    assert torch.equal(plain, reference) and torch.equal(one, reference)
    torch.testing.assert_close(with_patterns, reference, atol=TOL, rtol=0)


def test_edits_at_one_patch_change_only_what_follows_from_them(dino):
    _, model, _, _, inputs = dino
    layout = model.prepare_inputs(inputs).layout
    patch = int(layout["vision"].patch_positions(0)[2, 1])
    names = ["vision.blocks.0.hook_attn_out", "vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_attn_out"]

    def shift(x, hook):
        x = x.clone()
        x[0, patch] += 1.0
        return x

    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter=names, stop_early=False)
        with model.hooks([("vision.blocks.0.attn.hook_q", shift)]):
            _, by_query = model.run_with_cache(inputs, names_filter=names, stop_early=False)
        with model.hooks([("vision.blocks.0.hook_resid_mid", shift)]):
            _, by_mid = model.run_with_cache(inputs, names_filter=names, stop_early=False)
    only = torch.zeros(layout["vision"].shape, dtype=torch.bool)
    only[0, patch] = True
    changed = (by_query["vision.blocks.0.hook_attn_out"] - base["vision.blocks.0.hook_attn_out"]).abs().amax(-1) > 1e-6
    assert torch.equal(changed, only)
    moved = (by_query["vision.blocks.1.hook_attn_out"] - base["vision.blocks.1.hook_attn_out"]).abs().amax(-1) > 1e-6
    assert moved[0].sum() > 1 and not moved[1].any()
    # a resid_mid edit reaches the block output at that position only (through the layer-scaled MLP), as if computed
    post = (by_mid["vision.blocks.0.hook_resid_post"] - base["vision.blocks.0.hook_resid_post"]).abs().amax(-1) > 1e-6
    assert torch.equal(post, only)
    assert torch.equal(by_mid["vision.blocks.0.hook_attn_out"], base["vision.blocks.0.hook_attn_out"])


def test_layout_selectors_cls_registers_patches(dino):
    variant, model, raw, _, inputs = dino
    layout = model.prepare_inputs(inputs).layout
    hook = "vision.blocks.0.hook_resid_post"
    registers = raw.config.num_register_tokens if variant == "registers" else 0
    grid = raw.config.image_size // raw.config.patch_size
    cls, patches = layout.mask("cls", hook), layout.mask("patches", hook)
    assert cls[:, 0].all() and cls.sum() == 2
    assert patches[:, 1 + registers :].all() and patches.sum() == 2 * grid * grid
    assert layout["vision"].grids == [(grid, grid)] * 2
    if registers:
        expected = torch.zeros(1 + registers + grid * grid, dtype=torch.bool)
        expected[1 : 1 + registers] = True
        assert torch.equal(layout.mask("registers", hook)[0], expected)
        assert torch.equal(layout.mask("register", hook), layout["vision"].kind == Kind.REGISTER)
    else:
        with pytest.raises(ValueError, match="matches no position"):
            layout.mask("registers", hook)
    # (row, col) follows the embedding arithmetic: patch (r, c) is the conv of pixels [r·p:(r+1)·p, c·p:(c+1)·p] plus
    # the position embedding of patch index r·cols + c (positions count CLS first; registers carry none)
    embeddings, p = raw.embeddings, raw.config.patch_size
    r, c = 2, 1
    position = int(layout["vision"].patch_positions(0)[r, c])
    assert position == 1 + registers + r * grid + c
    with torch.no_grad():
        conv = embeddings.patch_embeddings.projection(
            inputs["pixel_values"][:1, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
        )
        _, cache = model.run_with_cache(inputs, names_filter="vision.hook_embed")
    expected = conv.flatten(1)[0] + embeddings.position_embeddings[0, 1 + r * grid + c]
    torch.testing.assert_close(cache["vision.hook_embed"][0, position], expected, atol=TOL, rtol=0)


def test_text_is_refused():
    raw, processor = tiny_dinov2()
    model = HookedVLM.from_hf(raw, processor)
    with pytest.raises(TypeError, match="vision tower alone"):
        model(sample_image(), text=["a cat"])
    with pytest.raises(TypeError, match="vision tower alone"):
        model(sample_image(), prompt="what is this?")


@pytest.mark.parametrize(
    ("name", "family", "registers"),
    [("facebook/dinov2-large", "dinov2", 0), ("facebook/dinov2-with-registers-large", "dinov2_with_registers", 4)],
)
def test_real_size_configs_on_meta(name, family, registers):
    raw = meta_model(name)
    model = HookedVLM.from_hf(raw)
    assert model.adapter.family == family
    (vision,) = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head, vision.d_mlp) == (24, 1024, 16, 64, 4096)
    assert len(model.hook_names("vision.blocks.*")) == 24 * 16
    for hook in model.hook_dict.values():  # every tap names a real module of the checkpoint's tree
        raw.get_submodule(hook.tap.module)
    names = ["vision.blocks.23.attn.hook_pattern", "vision.blocks.23.attn.hook_result", "vision.hook_out"]
    _, cache = model.run_with_cache(torch.empty(2, 3, 224, 224, device="meta"), names_filter=names)
    positions = 1 + registers + 16 * 16
    assert cache["vision.blocks.23.attn.hook_pattern"].shape == (2, 16, positions, positions)
    assert cache["vision.blocks.23.attn.hook_result"].shape == (2, positions, 16, 1024)
    assert cache["vision.hook_out"].shape == (2, 1024)
    layout = model.prepare_inputs(torch.empty(2, 3, 224, 224, device="meta")).layout
    assert int(layout.mask("registers" if registers else "cls", "vision.hook_embed")[0].sum()) == (registers or 1)


def test_direct_attribution_of_a_probe_on_the_pooled_cls(dino):
    """vision.hook_out is the final layernorm of the CLS token: a linear probe on it decomposes exactly."""
    from torch import nn

    from hooked_vlm.attribution import attribute, attribution_names
    from hooked_vlm.readouts import Probe

    _, model, _, _, inputs = dino
    torch.manual_seed(0)
    probe = Probe("vision.hook_out", nn.Linear(32, 1))
    with torch.no_grad():
        names = attribution_names("vision", model=model)  # DINOv2 has no hook_image_embeds
        output, cache = model.run_with_cache(inputs, names_filter=names, stop_early=False)
        a = attribute(cache, probe, output)
        value = probe(output, cache).float()
    torch.testing.assert_close(a.value, value, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.values.sum(0), a.value - a.bias, atol=1e-4, rtol=0)


def test_grid_tower_puts_registers_between_cls_and_patches():
    from hooked_vlm.layout import grid_tower

    tower = grid_tower(1, 2, 3, n_prefix=3, n_registers=2)
    assert tower.kind[0].tolist() == [Kind.CLS, Kind.REGISTER, Kind.REGISTER] + [Kind.PATCH] * 6
    assert tower.row[0, 3:].tolist() == [0, 0, 0, 1, 1, 1] and tower.col[0, 3:].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="need a CLS token"):
        grid_tower(1, 2, 2, n_prefix=1, n_registers=1)
