"""SigLIP and SigLIP2 through HookedVLM, against HF's own outputs, torch's nn.MultiheadAttention and edits on the raw
model: every block hook of both towers, the attention-pooling head, NaFlex's padded grids, real-size configs."""

import copy

import pytest
import torch
from reference import block_references, expected_block_hooks, forward_with_direct_hooks

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.testing import meta_model, sample_image
from hooked_vlm.testing.siglip import tiny_siglip, tiny_siglip2

TEXTS = ["a photo of a cat", "sunset"]
TOL = 1e-5
FACTORIES = {"siglip": tiny_siglip, "siglip2": tiny_siglip2}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def siglip(request):
    """``(family, model, raw, eager copy, processor outputs)`` of the two-tower model; the two images have different
    aspect ratios, so SigLIP2 gives them different grids, and one of them padding."""
    raw, processor = FACTORIES[request.param]()
    eager = copy.deepcopy(raw)
    eager.set_attn_implementation("eager")
    images = [sample_image(seed=0), sample_image(seed=1, width=40, height=100)]
    inputs = dict(processor.image_processor(images=images, return_tensors="pt"))
    inputs |= dict(processor.tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt"))
    return request.param, HookedVLM.from_hf(raw, processor), raw, eager, inputs


def _vision_inputs(inputs):
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_every_block_hook_matches_hf(siglip, tower):
    family, model, raw, eager, inputs = siglip
    info = next(t for t in model.adapter.towers() if t.name == tower)
    store, hidden = block_references(raw, tower, f"{tower}_model.", info.n_layers, info.d_head, inputs)
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
        logits, cache = model.run_with_cache(
            inputs, names_filter=lambda n: n.startswith(f"{tower}.blocks"), stop_early=False
        )
    attentions = (out.vision_model_output if tower == "vision" else out.text_model_output).attentions
    heads = lambda t: t.unflatten(-1, (info.n_heads, info.d_head))  # noqa: E731
    for i in range(info.n_layers):
        p = f"{tower}.blocks.{i}."
        expected = expected_block_hooks(store, hidden, attentions, i, heads)
        for name, reference in expected.items():
            torch.testing.assert_close(cache[p + name], reference, atol=TOL, rtol=0, msg=f"{family} {p}{name}")
        torch.testing.assert_close(cache[p + "attn.hook_attn_scores"].softmax(-1), attentions[i], atol=TOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits, raw(**inputs).logits_per_image, atol=TOL, rtol=0)


def test_padding_is_masked_in_every_pattern(siglip):
    """SigLIP2: no query attends to a padding position, in the encoder nor in the pooling head; SigLIP has none."""
    family, model, _, _, inputs = siglip
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    padding = model.prepare_inputs(inputs).layout["vision"].kind == Kind.PAD  # [batch, pos]
    assert padding.any() == (family == "siglip2")
    for name in model.hook_names("vision.*hook_pattern"):
        pattern = cache[name]  # [batch, head, q, k]
        assert not pattern[padding[:, None, None, :].expand_as(pattern)].any(), name
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5, rtol=0)


def test_pooling_head_hooks_match_torch_and_hf(siglip):
    family, model, raw, _, inputs = siglip
    head = raw.vision_model.head
    spec = {
        "attn_out": ("vision_model.head.attention", "out"),
        "ln": ("vision_model.head.layernorm", "out"),
        "pre": ("vision_model.head.mlp.fc1", "out"),
        "post": ("vision_model.head.mlp.fc2", "in"),
        "mlp_out": ("vision_model.head.mlp", "out"),
    }  # fmt: skip
    store, out = forward_with_direct_hooks(raw, spec, **inputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: "blocks" not in n and not n.startswith("hf."),
                                        stop_early=False)  # fmt: skip
        normed = out.vision_model_output.last_hidden_state
        padding = None if family == "siglip" else ~inputs["pixel_attention_mask"].bool()
        probe = head.probe.repeat(len(normed), 1, 1)
        _, weights = head.attention(probe, normed, normed, key_padding_mask=padding, average_attn_weights=False)
    torch.testing.assert_close(cache["vision.ln_final.hook_normalized"], normed, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["vision.head.hook_probe"], probe, atol=0, rtol=0)
    torch.testing.assert_close(cache["vision.head.attn.hook_pattern"], weights, atol=TOL, rtol=0)
    n_heads, d_head = head.attention.num_heads, head.attention.head_dim
    w_q, w_k, w_v = head.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = head.attention.in_proj_bias.chunk(3)
    by_hand = {"q": probe @ w_q.T + b_q, "k": normed @ w_k.T + b_k, "v": normed @ w_v.T + b_v}
    for kind, value in by_hand.items():
        torch.testing.assert_close(
            cache[f"vision.head.attn.hook_{kind}"], value.unflatten(-1, (n_heads, d_head)), atol=TOL, rtol=0
        )
    z = torch.einsum("bhqk,bkhd->bqhd", weights, cache["vision.head.attn.hook_v"])
    torch.testing.assert_close(cache["vision.head.attn.hook_z"], z, atol=TOL, rtol=0)
    result = cache["vision.head.attn.hook_result"]  # [batch, 1, head, d]
    torch.testing.assert_close(result.sum(-2) + head.attention.out_proj.bias, store["attn_out"], atol=TOL, rtol=0)
    for name, key in (("hook_attn_out", "attn_out"), ("ln.hook_normalized", "ln"), ("mlp.hook_pre", "pre"),
                      ("mlp.hook_post", "post"), ("hook_mlp_out", "mlp_out")):  # fmt: skip
        torch.testing.assert_close(cache[f"vision.head.{name}"], store[key], atol=TOL, rtol=0, msg=name)
    pooled = out.vision_model_output.pooler_output
    torch.testing.assert_close(cache["vision.hook_out"], pooled, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["hook_image_embeds"], pooled, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["vision.hook_out"], (store["attn_out"] + store["mlp_out"])[:, 0], atol=TOL, rtol=0)
    torch.testing.assert_close(cache["hook_text_embeds"], out.text_model_output.pooler_output, atol=TOL, rtol=0)


def test_outputs_with_no_hook_one_hook_and_pattern_capture_equal_the_raw_models(siglip):
    _, model, raw, _, inputs = siglip
    with torch.no_grad():
        reference = raw(**inputs).logits_per_image
        plain = model(inputs)
        one = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.hook_resid_mid", lambda x, hook: None)])
        _, patterns = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"), stop_early=False)
        with_patterns = model.run_with_hooks(
            inputs, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)]
        )
    assert torch.equal(plain, reference) and torch.equal(one, reference)
    torch.testing.assert_close(with_patterns, reference, atol=TOL, rtol=0)
    assert len(patterns.cache_dict) == 2 + 2 + 1  # both towers' blocks and the pooling head


def test_an_edit_at_one_patch_changes_only_what_follows_from_it(siglip):
    family, model, _, _, inputs = siglip
    layout = model.prepare_inputs(inputs).layout
    patch = int(layout["vision"].patch_positions(0)[1, 2])
    names = ["vision.blocks.0.hook_attn_out", "vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_attn_out",
             "vision.hook_out", "text.blocks.1.hook_resid_post"]  # fmt: skip

    def edit_query(q, hook):
        q = q.clone()
        q[0, patch] += 1.0
        return q

    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter=names, stop_early=False)
        with model.hooks([("vision.blocks.0.attn.hook_q", edit_query)]):
            _, edited = model.run_with_cache(inputs, names_filter=names, stop_early=False)
    changed = (edited["vision.blocks.0.hook_attn_out"] - base["vision.blocks.0.hook_attn_out"]).abs().amax(-1) > 1e-6
    only = torch.zeros_like(changed)
    only[0, patch] = True
    assert torch.equal(changed, only), "a query edit reaches other positions within its own attention"
    moved = (edited["vision.blocks.1.hook_attn_out"] - base["vision.blocks.1.hook_attn_out"]).abs().amax(-1) > 1e-6
    assert moved[0].sum() > 1 and not moved[1].any()  # spreads through block 1 within image 0 only
    assert not torch.equal(edited["vision.hook_out"][0], base["vision.hook_out"][0])
    assert torch.equal(edited["vision.hook_out"][1], base["vision.hook_out"][1])
    assert torch.equal(edited["text.blocks.1.hook_resid_post"], base["text.blocks.1.hook_resid_post"])
    if family == "siglip2":  # padding is masked as keys everywhere: an edit there reaches no patch and no pooling
        pad = int((layout["vision"].kind[0] == Kind.PAD).nonzero()[0])

        def edit_padding(x, hook):
            x = x.clone()
            x[0, pad] += 10.0
            return x

        with torch.no_grad(), model.hooks([("vision.blocks.0.hook_resid_post", edit_padding)]):
            _, padded = model.run_with_cache(inputs, names_filter=names, stop_early=False)
        assert torch.equal(padded["vision.hook_out"], base["vision.hook_out"])


def test_layout_selectors(siglip):
    family, model, _, _, inputs = siglip
    layout = model.prepare_inputs(inputs).layout
    vision = layout["vision"]
    if family == "siglip":
        grid = model.raw_model.config.vision_config.image_size // model.raw_model.config.vision_config.patch_size
        assert vision.grids == [(grid, grid)] * 2 and (vision.kind == Kind.PATCH).all()
        with pytest.raises(ValueError, match="matches no position"):
            layout.mask("cls", "vision.blocks.0.hook_resid_post")  # SigLIP has no CLS token
    else:
        shapes = [tuple(s) for s in inputs["spatial_shapes"].tolist()]
        assert vision.grids == shapes and shapes[0] != shapes[1]
        assert torch.equal(
            layout.mask("patches", "vision.blocks.0.hook_resid_post"), inputs["pixel_attention_mask"].bool()
        )
        assert torch.equal(layout.mask("all", "vision.blocks.0.hook_resid_post"), inputs["pixel_attention_mask"].bool())
        for b, (rows, cols) in enumerate(shapes):
            k = torch.arange(rows * cols)
            assert torch.equal(vision.row[b, : rows * cols], k // cols) and torch.equal(
                vision.col[b, : rows * cols], k % cols
            )
        with pytest.raises(ValueError, match="different patch grids"):
            layout.to_patch_grid("vision.blocks.0.hook_resid_post", torch.zeros(*vision.shape, 3))
    # the head's query sequence: one probe position per image, selected as "cls"; its keys run over the patches
    assert layout.mask("cls", "vision.head.attn.hook_q").shape == (2, 1)
    assert layout.mask("cls", "vision.head.hook_attn_out").all()
    assert layout.tower_for("vision.head.attn.hook_k") is vision
    # (row, col) follows the processor's arithmetic: SigLIP's conv patch (r, c) is pixels [r·p:(r+1)·p, c·p:(c+1)·p]
    if family == "siglip":
        embeddings = model.raw_model.vision_model.embeddings
        p = embeddings.patch_size
        r, c = 1, 2
        position = int(vision.patch_positions(0)[r, c])
        pixels = inputs["pixel_values"][:1, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
        with torch.no_grad():
            patch = embeddings.patch_embedding(pixels).flatten(1)
            _, cache = model.run_with_cache(inputs, names_filter="vision.hook_embed")
            position_embedding = embeddings.position_embedding.weight[position]
        torch.testing.assert_close(
            cache["vision.hook_embed"][0, position], patch[0] + position_embedding, atol=TOL, rtol=0
        )


def test_decomposition_sums_to_the_final_residual_in_both_towers(siglip):
    _, model, _, _, inputs = siglip
    from hooked_vlm.decomposition import needed_hooks

    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs, names_filter=[*needed_hooks(), "*ln_final.hook_normalized"], stop_early=False
        )
    for tower in ("vision", "text"):
        final = cache[f"{tower}.blocks.1.hook_resid_post"]
        stack = cache.get_full_resid_decomposition(tower=tower)
        torch.testing.assert_close(stack.sum(0), final, atol=1e-4, rtol=0)
        normed = cache.apply_ln_to_stack(stack, tower=tower).sum(0)
        ln = model.raw_model.get_submodule(
            f"{tower}_model.{'post_layernorm' if tower == 'vision' else 'final_layer_norm'}"
        )
        torch.testing.assert_close(normed + ln.bias, cache[f"{tower}.ln_final.hook_normalized"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_vision_only_models(family):
    kind = {"siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}[family]
    raw, processor = FACTORIES[family](kind)
    model = HookedVLM.from_hf(raw, processor)
    assert [t.name for t in model.adapter.towers()] == ["vision"]
    assert not model.hook_names("text.*") and "hook_image_embeds" not in model.hook_dict
    for hook in model.hook_dict.values():
        raw.get_submodule(hook.tap.module)
    image = sample_image(seed=2, width=64, height=40)
    with torch.no_grad():
        pooled, cache = model.run_with_cache(image, names_filter=["vision.hook_out", "vision.head.attn.hook_pattern"],
                                             stop_early=False)  # fmt: skip
        reference = raw(**model.prepare_inputs(image).kwargs).pooler_output
    torch.testing.assert_close(pooled, reference, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["vision.hook_out"], reference, atol=TOL, rtol=0)
    with pytest.raises(TypeError, match="no text tower"):
        model(image, text=["a cat"])


def test_bad_inputs():
    raw, processor = tiny_siglip2()
    model = HookedVLM.from_hf(raw, processor)
    with pytest.raises(TypeError, match="spatial_shapes"):
        model(torch.zeros(1, 3, 32, 32))
    inputs = dict(processor.image_processor(images=[sample_image()], return_tensors="pt"))
    shifted = {**inputs, "pixel_attention_mask": inputs["pixel_attention_mask"].roll(1, -1)}
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        _ = model.prepare_inputs(shifted).layout
    with pytest.raises(TypeError, match="no prompt"):
        model(sample_image(), prompt="what is this?")


@pytest.mark.parametrize(
    ("name", "family", "layers", "width", "heads", "grid"),
    [("google/siglip-so400m-patch14-384", "siglip", 27, 1152, 16, 27),
     ("google/siglip2-base-patch16-naflex", "siglip2", 12, 768, 12, 16)],
)  # fmt: skip
def test_real_size_configs_on_meta(name, family, layers, width, heads, grid):
    raw = meta_model(name)
    model = HookedVLM.from_hf(raw)
    assert model.adapter.family == family
    vision, text = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head) == (layers, width, heads, width // heads)
    assert (text.n_layers, text.d_model) == (layers, width)
    assert (
        len(model.hook_names("vision.blocks.*")) == layers * 16
        and len(model.hook_names("text.blocks.*")) == layers * 16
    )
    assert len(model.hook_names("vision.head.*")) == 13
    for hook in model.hook_dict.values():  # every tap names a real module of the checkpoint's tree
        raw.get_submodule(hook.tap.module)
    if family == "siglip":  # NaFlex reads spatial_shapes' values, which meta tensors do not have
        _, cache = model.run_with_cache(model.adapter.example_inputs(), stop_early=False,
                                        names_filter=["vision.blocks.26.attn.hook_pattern", "vision.head.attn.hook_pattern",
                                                      "vision.hook_out", "hook_text_embeds"])  # fmt: skip
        assert cache["vision.blocks.26.attn.hook_pattern"].shape == (1, heads, grid * grid, grid * grid)
        assert cache["vision.head.attn.hook_pattern"].shape == (1, heads, 1, grid * grid)
        assert cache["vision.hook_out"].shape == cache["hook_text_embeds"].shape == (1, width)
    else:
        assert raw.config.vision_config.num_patches == grid * grid


def test_direct_attribution_through_the_pooling_head_is_refused(siglip):
    """The pooled feature is attention + MLP over the patches, not a norm of one position: no linear attribution."""
    from torch import nn

    from hooked_vlm.attribution import attribute, attribution_names
    from hooked_vlm.readouts import ClipSimilarity, Probe

    _, model, _, _, inputs = siglip
    with torch.no_grad():
        output, cache = model.run_with_cache(inputs, names_filter=attribution_names("vision"), stop_early=False)
    probe = Probe("vision.hook_out", nn.Linear(cache["vision.hook_out"].shape[-1], 1))
    with pytest.raises(NotImplementedError, match="not a norm of one residual position"):
        attribute(cache, probe, output)
    with pytest.raises(ValueError, match="no image projection"):
        attribute(cache, ClipSimilarity.from_texts(model, TEXTS, target=0), output)


def test_padded_grids_tower():
    from hooked_vlm.layout import padded_grids_tower

    tower = padded_grids_tower([(2, 3), (1, 2)], 6)
    assert tower.kind.tolist() == [[Kind.PATCH] * 6, [Kind.PATCH] * 2 + [Kind.PAD] * 4]
    assert tower.col[1].tolist() == [0, 1, -1, -1, -1, -1] and tower.image[1].tolist() == [1, 1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="does not fit"):
        padded_grids_tower([(3, 3)], 8)
