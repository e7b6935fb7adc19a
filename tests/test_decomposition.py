"""Per-head results, residual decompositions (TransformerLens cache methods) and direct attribution, on every
family's tiny model in float32, against the model's own hooks, HF outputs and hand computations from HF modules."""

from functools import partial

import pytest
import torch
from reference import direct_hooks

from hooked_vlm import HookedVLM
from hooked_vlm.decomposition import Tower
from hooked_vlm.testing import TINY_MODELS, sample_image
from hooked_vlm.utils import act_name

ATOL = 1e-4
#: every family, and open_clip with LayerScale (random scales) after every attention and MLP
FACTORIES = {**TINY_MODELS, "open_clip_ls": partial(TINY_MODELS["open_clip"], ls_init_value=0.5)}
FAMILIES = ["clip", "open_clip", "open_clip_ls", "siglip", "dinov2", "llava_onevision", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TWO_TOWERS = ("clip", "open_clip", "open_clip_ls", "siglip")
PROMPT = "What is in the picture?"


VISION_ONLY = ("dinov2",)
LAYER_SCALED = ("open_clip_ls", "dinov2")


def _inputs(family):
    if family in VISION_ONLY:
        return [sample_image(seed=0), sample_image(seed=1, width=80, height=120)], {}
    if family in TWO_TOWERS:
        return [sample_image(seed=0), sample_image(seed=1, width=80, height=120)], {"text": ["a photo of a cat", "sunset"]}
    return sample_image(32, 32), {"prompt": PROMPT}


def _needed(name):
    return "blocks" in name or "normalized" in name or name.endswith("hook_out")


_MODELS: dict = {}


def get(family):
    """``(model, output, cache)`` of one full run per family (built once: tests only read them)."""
    if family not in _MODELS:
        raw, processor = FACTORIES[family]()
        model = HookedVLM.from_hf(raw, processor)
        inputs, kwargs = _inputs(family)
        with torch.no_grad():
            output, cache = model.run_with_cache(inputs, names_filter=_needed, stop_early=False, **kwargs)
        _MODELS[family] = model, output, cache
    return _MODELS[family]


def towers(family):
    return [t.name for t in get(family)[0].adapter.towers()]


CASES = [
    (f, t)
    for f in FAMILIES
    for t in (["vision"] if f in VISION_ONLY else ["vision", "text"] if f in TWO_TOWERS else ["vision", "lm"])
]


def _run(model, family, **kwargs):
    inputs, extra = _inputs(family)
    with torch.no_grad():
        return model(inputs, **extra, **kwargs)


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


# ---- step 1: attn.hook_result --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,tower", CASES)
def test_head_results_plus_bias_equal_attn_out(family, tower):
    model, _, cache = get(family)
    t = Tower(model, tower)
    for layer in range(t.n_layers):
        result = cache[f"{tower}.blocks.{layer}.attn.hook_result"]
        assert result.shape[-2:] == (t.n_heads, t.info.d_model)
        # what each head adds to the residual stream: its result, times the block's layer scale if it has one
        written = t.head_results(cache, layer)
        scale = t.layer_scale(layer)
        assert (scale is not None) == (family in LAYER_SCALED)
        torch.testing.assert_close(written, result if scale is None else result * scale, atol=1e-6, rtol=0)
        bias = t.out_proj(layer)[1]
        total = written.sum(-2) + (0 if bias is None else bias)
        torch.testing.assert_close(total, cache[f"{tower}.blocks.{layer}.hook_attn_out"], atol=ATOL, rtol=0)
    stack = cache.stack_head_results(tower=tower)
    assert stack.shape[0] == t.n_layers * t.n_heads


def test_head_results_by_hand_from_hf_modules():
    """HF CLIP: each head's result is its slice of out_proj's input times its columns of out_proj.weight."""
    model, _, cache = get("clip")
    raw = model.raw_model
    layer = raw.vision_model.encoder.layers[1].self_attn
    store, handles = direct_hooks(raw, {"z": ("vision_model.encoder.layers.1.self_attn.out_proj", "in")})
    try:
        inputs, kwargs = _inputs("clip")
        with torch.no_grad():
            raw(**model.prepare_inputs(inputs, **kwargs).kwargs)
    finally:
        for h in handles:
            h.remove()
    d_head = layer.head_dim
    ours = cache["vision.blocks.1.attn.hook_result"]
    for head in range(layer.num_heads):
        cols = slice(head * d_head, (head + 1) * d_head)
        by_hand = store["z"][..., cols] @ layer.out_proj.weight[:, cols].T
        torch.testing.assert_close(ours[:, :, head], by_hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_editing_a_head_result_equals_the_same_edit_of_z(family):
    model, _, _ = get(family)
    tower = towers(family)[-1]  # text / lm: the tower closest to the output
    vision = "vision"
    for t in (tower, vision):
        n_heads = Tower(model, t).n_heads

        def zero_result(x, hook):
            x = x.clone()
            x[..., 1, :] = 0
            x[..., 0, :] *= 2
            return x

        result_hook = (f"{t}.blocks.0.attn.hook_result", zero_result)
        z_hook = (f"{t}.blocks.0.attn.hook_z", zero_result)
        assert n_heads > 1
        with model.hooks([result_hook]):
            by_result = _first(_run(model, family))
        with model.hooks([z_hook]):
            by_z = _first(_run(model, family))
        plain = _first(_run(model, family))
        assert not torch.allclose(by_z, plain, atol=1e-4), f"the edit of {t} head 1 changed nothing"
        torch.testing.assert_close(by_result, by_z, atol=ATOL, rtol=0)


def test_head_results_cost_nothing_when_idle(hook_registrations):
    model, _, _ = get("clip")
    _run(model, "clip")
    assert hook_registrations.calls == []
    with torch.no_grad():
        _, cache = model.run_with_cache(_inputs("clip")[0], names_filter="vision.blocks.0.hook_attn_out")
    assert not [c for c in hook_registrations.calls if c[1] == "Linear"], "hook_result was installed unasked"


# ---- step 2: the TransformerLens cache methods -------------------------------------------------------------------


def _final(cache, tower):
    t = Tower(cache.model, tower)
    return cache[f"{tower}.blocks.{t.n_layers - 1}.hook_resid_post"]


@pytest.mark.parametrize("family,tower", CASES)
def test_full_decomposition_sums_to_the_final_residual(family, tower):
    _, _, cache = get(family)
    stack, labels = cache.get_full_resid_decomposition(tower=tower, return_labels=True)
    t = Tower(cache.model, tower)
    writes = [label for label in labels if label.endswith("_deepstack")]  # Qwen3-VL's injections into the LM
    assert bool(writes) == ((family, tower) == ("qwen3_vl", "lm"))
    assert len(labels) == stack.shape[0] == t.n_layers * t.n_heads + t.n_layers + len(writes) + 2
    assert labels[0] == "L0H0" and labels[-2:] == ["embed", "bias"] and f"{t.n_layers - 1}_mlp_out" in labels
    torch.testing.assert_close(stack.sum(0), _final(cache, tower), atol=ATOL, rtol=0)
    # and at an intermediate layer: the residual entering block 1 (resid_mid with mlp_input)
    torch.testing.assert_close(
        cache.get_full_resid_decomposition(1, tower=tower).sum(0), cache[f"{tower}.blocks.1.hook_resid_pre"], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        cache.get_full_resid_decomposition(1, mlp_input=True, tower=tower).sum(0),
        cache[f"{tower}.blocks.1.hook_resid_mid"], atol=ATOL, rtol=0,
    )
    torch.testing.assert_close(cache.decompose_resid(tower=tower).sum(0), _final(cache, tower), atol=ATOL, rtol=0)


#: the hook holding the output of each tower's final norm, and how its positions line up with the residual stream
NORMED = {
    ("clip", "vision"): ("vision.hook_out", 0),
    ("clip", "text"): ("text.ln_final.hook_normalized", None),
    ("open_clip", "vision"): ("vision.hook_out", 0),
    ("open_clip", "text"): ("text.ln_final.hook_normalized", None),
    ("open_clip_ls", "vision"): ("vision.hook_out", 0),
    ("siglip", "vision"): ("vision.ln_final.hook_normalized", None),
    ("siglip", "text"): ("text.ln_final.hook_normalized", None),
    ("dinov2", "vision"): ("vision.ln_final.hook_normalized", None),
    ("open_clip_ls", "text"): ("text.ln_final.hook_normalized", None),
    ("llava_onevision", "lm"): ("lm.ln_final.hook_normalized", None),
    ("llava", "lm"): ("lm.ln_final.hook_normalized", None),
    ("llava_next", "lm"): ("lm.ln_final.hook_normalized", None),
    ("qwen2_vl", "vision"): ("projector.ln.hook_normalized", None),
    ("qwen2_vl", "lm"): ("lm.ln_final.hook_normalized", None),
    ("qwen2_5_vl", "vision"): ("projector.ln.hook_normalized", None),
    ("qwen2_5_vl", "lm"): ("lm.ln_final.hook_normalized", None),
    ("qwen3_vl", "vision"): ("projector.ln.hook_normalized", None),
    ("qwen3_vl", "lm"): ("lm.ln_final.hook_normalized", None),
}


@pytest.mark.parametrize("family,tower", list(NORMED))
def test_apply_ln_to_stack_of_the_whole_sum_is_the_models_normed_output(family, tower):
    _, _, cache = get(family)
    hook, position = NORMED[(family, tower)]
    stack = cache.get_full_resid_decomposition(tower=tower, pos_slice=position)
    normed = cache.apply_ln_to_stack(stack, pos_slice=position, tower=tower)
    norm = Tower(cache.model, tower).final_norm()
    total = normed.sum(0) + (0 if norm.bias is None else norm.bias)
    torch.testing.assert_close(total, cache[hook], atol=ATOL, rtol=0)
    # apply_ln=True is the same map
    torch.testing.assert_close(
        cache.get_full_resid_decomposition(tower=tower, pos_slice=position, apply_ln=True), normed, atol=1e-6, rtol=0
    )


def test_a_tower_without_final_norm_says_so():
    _, _, cache = get("llava_onevision")
    stack = cache.decompose_resid(tower="vision")
    with pytest.raises(ValueError, match="no final norm"):
        cache.apply_ln_to_stack(stack, tower="vision")
    # block norms still apply (the scale read from the cached resid_pre)
    normed = cache.apply_ln_to_stack(cache.decompose_resid(1, tower="vision"), 1, tower="vision")
    ln1 = Tower(cache.model, "vision").block_norm(1, False).module
    torch.testing.assert_close(normed.sum(0) + ln1.bias, cache["vision.blocks.1.ln1.hook_normalized"], atol=ATOL, rtol=0)


def test_main_tower_is_the_default():
    assert Tower(get("clip")[0]).name == "vision"
    assert Tower(get("llava_onevision")[0]).name == "lm"
    _, _, cache = get("llava_onevision")
    torch.testing.assert_close(cache.decompose_resid(), cache.decompose_resid(tower="lm"))
    with pytest.raises(ValueError, match="tower='audio'"):
        cache.decompose_resid(tower="audio")


def test_act_name():
    assert act_name("resid_post", 3, tower="vision") == "vision.blocks.3.hook_resid_post"
    assert act_name("z5", tower="lm") == "lm.blocks.5.attn.hook_z"
    assert act_name("result", 0, tower="text") == "text.blocks.0.attn.hook_result"
    assert act_name("normalized", 1, "ln2", tower="lm") == "lm.blocks.1.ln2.hook_normalized"
    assert act_name("embed", tower="vision") == "vision.hook_embed"
    assert act_name("vision.blocks.0.hook_resid_pre") == "vision.blocks.0.hook_resid_pre"
    model, _, cache = get("clip")
    for name in (act_name("resid_post", 1, tower="vision"), act_name("attn", 0, tower="text"), act_name("result", 1, tower="vision")):
        assert name in model.hook_dict
    with pytest.raises(ValueError, match="tower="):
        act_name("resid_pre", 0)


# ---- TransformerLens's own cache tests (tests/unit/test_activation_cache.py), ported to a VLM's LM -------------


@pytest.fixture(scope="module")
def lm():
    model, _, cache = get("llava_onevision")
    return model, cache


def test_accumulated_resid_on_last_layer_variants(lm):
    model, cache = lm
    n = Tower(model).n_layers
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    assert torch.equal(accumulated, cache.accumulated_resid(layer=n, incl_mid=True, pos_slice=-1))
    assert torch.equal(accumulated, cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=-1))


def test_accumulated_resid_without_mid(lm):
    _, cache = lm
    accumulated, labels = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=-1, return_labels=True)
    assert len(labels) == accumulated.size(0)
    assert all("mid" not in label for label in labels)


def test_accumulated_resid_labels_and_values(lm):
    model, cache = lm
    n = Tower(model).n_layers
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    expected = [x for i in range(n) for x in (f"{i}_pre", f"{i}_mid")] + ["final_post"]
    assert labels == expected
    torch.testing.assert_close(stack[1], cache["lm.blocks.0.hook_resid_mid"])
    torch.testing.assert_close(stack[-1], cache[f"lm.blocks.{n - 1}.hook_resid_post"])
    # layer=1: resid_pre of layers 0 and 1 (the input to layer 1 is included); mlp_input adds layer 1's resid_mid
    assert cache.accumulated_resid(1, return_labels=True)[1] == ["0_pre", "1_pre"]
    assert cache.accumulated_resid(1, mlp_input=True, return_labels=True)[1] == ["0_pre", "1_pre", "1_mid"]


def test_accumulated_resid_with_apply_ln(lm):
    """As TransformerLens 3.9: at the final layer each state goes through ln_final with its own statistics."""
    model, cache = lm
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    scaled, labels = cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=-1, apply_ln=True, return_labels=True)
    norm = model.raw_model.get_submodule(model.hook_dict["lm.ln_final.hook_normalized"].tap.module)
    torch.testing.assert_close(scaled, norm(accumulated), atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled[-1], cache["lm.ln_final.hook_normalized"][:, -1], atol=ATOL, rtol=0)
    # at an intermediate layer, the cached scale of that block's ln1
    mid = cache.accumulated_resid(layer=1, pos_slice=-1)
    torch.testing.assert_close(
        cache.accumulated_resid(layer=1, pos_slice=-1, apply_ln=True), cache.apply_ln_to_stack(mid, 1, pos_slice=-1)
    )


def test_decompose_resid_with_apply_ln(lm):
    _, cache = lm
    per_layer = cache.decompose_resid(layer=-1, pos_slice=-1)
    reference = cache.apply_ln_to_stack(per_layer, layer=-1, pos_slice=-1)
    from transformer_lens.utils import Slice

    torch.testing.assert_close(cache.decompose_resid(layer=None, pos_slice=Slice(-1), apply_ln=True), reference)


def test_decompose_resid_including_attention(lm):
    model, cache = lm
    n = Tower(model).n_layers
    reference = torch.stack([cache[f"lm.blocks.{i}.hook_attn_out"][:, -1] for i in range(2)])
    stack = cache.decompose_resid(layer=1, pos_slice=-1, mlp_input=True, incl_embeds=False, mode="attn")
    assert n >= 2
    torch.testing.assert_close(stack, reference)


def test_stack_head_results_with_apply_ln(lm):
    _, cache = lm
    per_head = cache.stack_head_results(layer=-1, pos_slice=-1)
    reference = cache.apply_ln_to_stack(per_head, layer=None, pos_slice=-1)
    torch.testing.assert_close(cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True), reference)


def test_stack_head_results_including_remainder(lm):
    model, cache = lm
    n_heads = Tower(model).n_heads
    resid_post = cache["lm.blocks.0.hook_resid_post"][:, -1]
    per_head, labels = cache.stack_head_results(layer=1, pos_slice=-1, incl_remainder=True, return_labels=True)
    torch.testing.assert_close(resid_post - per_head[:-1].sum(0), per_head[-1])
    assert labels[:-1] == [f"L0H{i}" for i in range(n_heads)] and labels[-1] == "remainder"
    final = cache[f"lm.blocks.{Tower(model).n_layers - 1}.hook_resid_post"][:, -1]
    per_head, labels = cache.stack_head_results(layer=0, pos_slice=-1, incl_remainder=True, return_labels=True)
    torch.testing.assert_close(per_head, final[None])
    assert labels == ["remainder"]
    per_head, labels = cache.stack_head_results(layer=0, pos_slice=-1, incl_remainder=False, return_labels=True)
    assert per_head.shape[0] == 0 and labels == []


def test_logit_attrs_works_for_all_input_shapes(lm):
    model, cache = lm
    w_u = model.raw_model.get_output_embeddings().weight
    answers = torch.tensor([[5, 7]])
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    scaled = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1)
    direction = w_u[answers[:, 0]] - w_u[answers[:, 1]]
    reference = (scaled * direction).sum(-1)
    torch.testing.assert_close(cache.logit_attrs(accumulated, answers[:, 0], answers[:, 1], pos_slice=-1), reference)
    torch.testing.assert_close(
        cache.logit_attrs(accumulated, 5, 7, pos_slice=-1, batch_slice=-1), reference[:, -1]
    )
    torch.testing.assert_close(
        cache.logit_attrs(accumulated[:, -1], 5, 7, pos_slice=-1, batch_slice=-1, has_batch_dim=False), reference[:, -1]
    )
    with pytest.raises(ValueError):
        cache.logit_attrs(accumulated, answers[:, 0], answers[0], pos_slice=-1)


def test_logit_attrs_of_the_full_decomposition_sum_to_the_logit_difference(lm):
    model, cache = lm
    _, output, _ = get("llava_onevision")
    stack = cache.get_full_resid_decomposition(pos_slice=-1)
    attrs = cache.logit_attrs(stack, 5, 7, pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), output[:, -1, 5] - output[:, -1, 7], atol=ATOL, rtol=0)


def test_remove_batch_dim():
    model, _, _ = get("qwen2_vl")
    with torch.no_grad():
        _, cache = model.run_with_cache(sample_image(32, 32), prompt=PROMPT, names_filter=_needed, stop_early=False)
    assert cache.has_batch_dim
    before = {k: v.shape for k, v in cache.cache_dict.items()}
    cache.remove_batch_dim()
    assert not cache.has_batch_dim
    assert all(before[k][1:] == cache.cache_dict[k].shape for k in before)
    cache.remove_batch_dim()  # a second time changes nothing
    assert all(before[k][1:] == cache.cache_dict[k].shape for k in before)


def test_remove_batch_dim_fails_if_batch_gt_1():
    _, _, cache = get("clip")
    with pytest.raises(AssertionError):
        cache.remove_batch_dim()
    assert cache.has_batch_dim


def test_apply_slice_to_batch_dim():
    _, _, cache = get("clip")
    name = "vision.blocks.0.hook_resid_pre"
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and torch.equal(one[name], cache[name][1])
    kept = cache.apply_slice_to_batch_dim([1])
    assert kept.has_batch_dim and torch.equal(kept[name], cache[name][1:])
    # a sliced cache still decomposes
    torch.testing.assert_close(
        kept.get_full_resid_decomposition().sum(0), kept["vision.blocks.1.hook_resid_post"], atol=ATOL, rtol=0
    )
    with pytest.raises(AssertionError):
        one.apply_slice_to_batch_dim(0)


def test_a_batch_slice_keeps_the_layout_of_the_kept_rows():
    _, _, cache = get("clip")  # two images, two captions
    kept = cache.apply_slice_to_batch_dim([1])
    for tower in ("vision", "text"):
        for field in ("kind", "image", "row", "col"):
            assert torch.equal(getattr(kept.layout[tower], field), getattr(cache.layout[tower], field)[1:])
    name = "vision.blocks.1.hook_resid_post"
    torch.testing.assert_close(kept.to_patch_grid(name), cache.to_patch_grid(name)[1:])
    torch.testing.assert_close(kept.select(name, "cls"), cache[name][1:, 0])


def test_a_batch_slice_takes_the_tiles_of_the_kept_images():
    """LLaVA-OneVision runs the vision tower over tiles: a slice of the prompts keeps their images' tiles."""
    raw, processor = TINY_MODELS["llava_onevision"]()
    model = HookedVLM.from_hf(raw, processor)
    images = [sample_image(32, 32, seed=0), sample_image(48, 24, seed=1)]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, prompt=[PROMPT, "Describe it."], names_filter=_needed, stop_early=False)
    vision = cache.layout["vision"]
    second = vision.image[:, 0] == 1
    assert 1 < int(second.sum()) < vision.shape[0]  # several tiles, not all of them
    kept = cache.apply_slice_to_batch_dim([1])
    name = "vision.blocks.0.hook_resid_post"
    assert torch.equal(kept[name], cache[name][second])
    assert torch.equal(kept.layout["vision"].tile, vision.tile[second])
    assert torch.equal(kept["lm.blocks.0.hook_resid_post"], cache["lm.blocks.0.hook_resid_post"][1:])
    assert torch.equal(kept.layout["lm"].kind, cache.layout["lm"].kind[1:])
    with torch.no_grad():  # the same as running the second prompt alone
        _, alone = model.run_with_cache(images[1], prompt="Describe it.", names_filter=_needed, stop_early=False)
    torch.testing.assert_close(kept[name], alone[name], atol=ATOL, rtol=0)


def test_a_batch_slice_of_a_packed_sequence_keeps_the_kept_images_positions():
    """Qwen2-VL packs every image of a run into one vision sequence (attention stays within each image): a slice of
    the prompts keeps their images' positions, as if they had run alone."""
    model, _, _ = get("qwen2_vl")
    images = [sample_image(32, 32, seed=0), sample_image(32, 32, seed=1)]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, prompt=[PROMPT, PROMPT], names_filter=_needed, stop_early=False)
        _, alone = model.run_with_cache(images[1], prompt=PROMPT, names_filter=_needed, stop_early=False)
    kept = cache.apply_slice_to_batch_dim([1])
    for name in ("vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post", "projector.hook_out"):
        assert kept[name].shape == alone[name].shape
        torch.testing.assert_close(kept[name], alone[name], atol=ATOL, rtol=0)
    assert torch.equal(kept.layout["vision"].row, alone.layout["vision"].row)
    whole = cache.apply_slice_to_batch_dim(slice(None))
    assert all(torch.equal(whole[k], cache[k]) for k in cache)


def test_moving_a_cache_keeps_its_model_and_layout():
    model, _, cache = get("clip")
    moved = cache.to("cpu", torch.float64)
    assert moved.model is model and moved.layout is cache.layout
    assert moved["vision.blocks.0.hook_resid_pre"].dtype == torch.float64
    torch.testing.assert_close(
        moved.get_full_resid_decomposition().sum(0).float(), cache["vision.blocks.1.hook_resid_post"], atol=ATOL, rtol=0
    )


# ---- step 3: direct attribution onto readouts -----------------------------------------------------------------------

from torch import nn  # noqa: E402

from hooked_vlm.attribution import attribute, attribution_names, direct_attribution  # noqa: E402
from hooked_vlm.readouts import ClipSimilarity, LogitDiff, Probe  # noqa: E402

_ATTRIBUTION_RUNS: dict = {}


def attribution_run(family):
    if family not in _ATTRIBUTION_RUNS:
        model = get(family)[0]
        inputs, kwargs = _inputs(family)
        kwargs.pop("text", None)
        tower = "vision" if family in ("clip", "open_clip") else "lm"
        with torch.no_grad():
            output, cache = model.run_with_cache(inputs, names_filter=attribution_names(tower), stop_early=False, **kwargs)
        _ATTRIBUTION_RUNS[family] = model, output, cache
    return _ATTRIBUTION_RUNS[family]


def laion_probe(tmp_path, d_embed):
    """A random LAION improved-aesthetic-predictor state dict, in the released format, loaded as it ships."""
    torch.manual_seed(0)
    sizes = [d_embed, 16, 8, 8, 4, 1]
    state = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:], strict=False), strict=True):
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = torch.randn(o, i) / i**0.5, torch.randn(o)
    path = tmp_path / "aesthetic.pth"
    torch.save(state, path)
    return Probe.from_laion_aesthetic(path)


@pytest.mark.parametrize("family", ["clip", "open_clip"])
def test_clip_attributions_sum_to_the_readout_minus_its_bias(family, tmp_path):
    model, output, cache = attribution_run(family)
    texts = ClipSimilarity.from_texts(model, ["a photo of a cat", "sunset"], target=1)
    probe = laion_probe(tmp_path, cache["hook_image_embeds"].shape[-1])
    for readout, bias in ((texts, torch.zeros(2)), (probe, probe.bias.expand(2))):
        a = attribute(cache, readout, output)
        torch.testing.assert_close(a.value, readout(output, cache).float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(a.bias, bias.float())
        torch.testing.assert_close(a.values.sum(0), a.value - a.bias, atol=ATOL, rtol=0)
        assert a.labels[-3:] == ["embed", "bias", "ln_bias"] and a.heads().shape == (2, 2, 4)
        # each head's share by source position sums to the head's share
        torch.testing.assert_close(a.by_source.sum(-1), a.heads(), atol=1e-6, rtol=0)
        assert a.patch_map(batch=1).shape == (4, 4)
        assert not a.values.requires_grad


def test_clip_head_attribution_by_hand_from_hf_modules():
    """CLS of head (1, 2) through post_layernorm and visual_projection onto a text direction, from HF modules."""
    model, output, cache = attribution_run("clip")
    raw = model.raw_model
    text = torch.nn.functional.normalize(torch.randn(cache["hook_image_embeds"].shape[-1], generator=torch.Generator().manual_seed(1)), dim=0)
    readout = ClipSimilarity(text[None])
    a = attribute(cache, readout, output)
    layer, head = 1, 2
    attn = raw.vision_model.encoder.layers[layer].self_attn
    store, handles = direct_hooks(raw, {
        "z": (f"vision_model.encoder.layers.{layer}.self_attn.out_proj", "in"),
        "final": ("vision_model.post_layernorm", "in"),
    })
    try:
        with torch.no_grad():
            inputs, _ = _inputs("clip")
            image_embeds = raw.get_image_features(**model.prepare_inputs(inputs).kwargs).pooler_output
    finally:
        for h in handles:
            h.remove()
    cols = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
    with torch.no_grad():
        r = store["z"][:, 0, cols] @ attn.out_proj.weight[:, cols].T  # the head's write at CLS
        ln = raw.vision_model.post_layernorm
        final = store["final"] if store["final"].dim() == 2 else store["final"][:, 0]
        scale = (final.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        normed = (r - r.mean(-1, keepdim=True)) / scale * ln.weight
        by_hand = raw.visual_projection(normed) @ text / image_embeds.norm(dim=-1)
    torch.testing.assert_close(a.heads()[:, layer, head], by_hand, atol=1e-5, rtol=0)


def test_non_linear_probe_attributes_its_first_linear_layer_and_says_so():
    _, output, cache = attribution_run("clip")
    d = cache["hook_image_embeds"].shape[-1]
    torch.manual_seed(0)
    probe = Probe("hook_image_embeds", nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 1)))
    with pytest.raises(ValueError, match="unit="):
        attribute(cache, probe, output)
    a = attribute(cache, probe, output, unit=3)
    assert "first linear layer" in a.note and "not the probe's output" in a.note
    first = probe.module[0]
    with torch.no_grad():
        unit = first(cache["hook_image_embeds"])[:, 3]
    torch.testing.assert_close(a.value, unit, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.values.sum(0), a.value - first.bias[3].detach(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_logit_difference_attribution_to_lm_heads_and_image_tokens(family):
    model, output, cache = attribution_run(family)
    for readout in (LogitDiff(5, 7), LogitDiff(5, [7, 9, 11]), LogitDiff(5, [7, 9], reduce="mean")):
        a = attribute(cache, readout, output)
        if readout.incorrect.shape[1] == 1 or readout.reduce == "mean":
            torch.testing.assert_close(a.value, readout(output).float(), atol=ATOL, rtol=0)
        torch.testing.assert_close(a.values.sum(0), a.value - a.bias, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.by_source.sum(-1), a.heads(), atol=1e-5, rtol=0)
    heat = a.patch_map()  # the image tokens of the LM sequence, as the image's grid
    assert heat.dim() == 2 and heat.numel() > 1
    # a raw direction: the logit of token 5 alone
    w_u = model.raw_model.get_output_embeddings().weight
    raw = direct_attribution(cache, w_u[5], tower="lm", position=-1)
    torch.testing.assert_close(raw.values.sum(0), output[:, -1, 5].float(), atol=ATOL, rtol=0)


def test_attribution_plots(tmp_path):
    _, output, cache = attribution_run("clip")
    a = attribute(cache, ClipSimilarity(torch.randn(1, cache["hook_image_embeds"].shape[-1])), output)
    fig = a.plot_heads(tmp_path / "heads.png")
    image = fig.axes[0].images[0]
    assert image.cmap.name == "RdBu_r" and image.norm.vmin == -image.norm.vmax
    fig = a.plot_patches(sample_image(seed=0), tmp_path / "patches.png", head=(1, 0))
    assert len(fig.axes[0].images) == 1 and len(fig.axes[1].images) == 1  # heatmap beside the image, not over it
    heat = fig.axes[0].images[0]  # an attribution is signed: centred on 0 whatever signs this map holds
    assert heat.cmap.name == "RdBu_r" and heat.norm.vmin == -heat.norm.vmax
    assert (tmp_path / "heads.png").stat().st_size > 0 and (tmp_path / "patches.png").stat().st_size > 0
