"""Hugging Face CLIP through HookedVLM, checked against HF's own outputs and hand-made edits on the raw model."""

import copy

import pytest
import torch
from reference import block_references, expected_block_hooks
from transformers import CLIPModel

from hooked_vlm import HookedVLM, HookShapeError, UnknownHookError
from hooked_vlm.taps import submodule
from hooked_vlm.testing import meta_model, sample_image, tiny_clip

TEXTS = ["a photo of a cat", "sunset"]
TOL = 1e-5


@pytest.fixture(scope="module")
def clip():
    raw, processor = tiny_clip()
    return HookedVLM.from_hf(raw, processor), raw, processor


@pytest.fixture(scope="module")
def eager_clip(clip):
    _, raw, _ = clip
    eager = copy.deepcopy(raw)
    eager.set_attn_implementation("eager")
    return eager


@pytest.fixture(scope="module")
def inputs(clip):
    _, _, processor = clip
    images = [sample_image(seed=0), sample_image(seed=1, width=80, height=120)]
    return dict(processor(images=images, text=TEXTS, return_tensors="pt", padding=True))


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_every_block_hook_matches_hf(clip, eager_clip, inputs, tower):
    model, raw, _ = clip
    info = next(t for t in model.adapter.towers() if t.name == tower)
    root = "vision_model." if tower == "vision" else "text_model."
    store, hidden = block_references(raw, tower, root, info.n_layers, info.d_head, inputs)
    with torch.no_grad():
        attentions = eager_clip(**inputs, output_attentions=True)
    attentions = (attentions.vision_model_output if tower == "vision" else attentions.text_model_output).attentions
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith(f"{tower}."), stop_early=False)
    heads = lambda t: t.unflatten(-1, (info.n_heads, info.d_head))  # noqa: E731
    for i in range(info.n_layers):
        p = f"{tower}.blocks.{i}."
        expected = expected_block_hooks(store, hidden, attentions, i, heads)
        for name, reference in expected.items():
            torch.testing.assert_close(cache[p + name], reference, atol=TOL, rtol=0, msg=p + name)
        # Scores: pre-softmax, masked; their softmax is HF's eager pattern, and unmasked entries are q·k / sqrt(d).
        scores = cache[p + "attn.hook_attn_scores"]
        torch.testing.assert_close(scores.softmax(-1), attentions[i], atol=TOL, rtol=0)
        qk = torch.einsum("bqhd,bkhd->bhqk", heads(store[f"{i}.q"]), heads(store[f"{i}.k"])) * info.d_head**-0.5
        allowed = attentions[i] > 0
        torch.testing.assert_close(scores[allowed], qk[allowed], atol=TOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits, raw(**inputs).logits_per_image, atol=TOL, rtol=0)


def test_tower_level_hooks_match_hf(clip, inputs):
    model, raw, _ = clip
    with torch.no_grad():
        out = raw(**inputs, output_hidden_states=True)
        _, cache = model.run_with_cache(
            inputs, names_filter=["vision.hook_embed", "vision.ln_pre.hook_normalized", "vision.hook_out",
                                  "hook_image_embeds", "text.hook_embed", "text.ln_final.hook_normalized",
                                  "hook_text_embeds", "hf.vision_model.embeddings.patch_embedding.hook_out"],
            stop_early=False,
        )
        embeddings = raw.vision_model.embeddings(inputs["pixel_values"])
        patches = raw.vision_model.embeddings.patch_embedding(inputs["pixel_values"])
    vision, text = out.vision_model_output, out.text_model_output
    torch.testing.assert_close(cache["vision.hook_embed"], embeddings, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["vision.ln_pre.hook_normalized"], vision.hidden_states[0], atol=TOL, rtol=0)
    pooled = raw.vision_model(inputs["pixel_values"]).pooler_output  # CLIPModel's own output holds it projected
    torch.testing.assert_close(cache["vision.hook_out"], pooled, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["hook_image_embeds"], raw.get_image_features(inputs["pixel_values"]).pooler_output, atol=TOL, rtol=0)
    torch.testing.assert_close(cache["text.hook_embed"], text.hidden_states[0], atol=TOL, rtol=0)
    torch.testing.assert_close(cache["text.ln_final.hook_normalized"], text.last_hidden_state, atol=TOL, rtol=0)
    torch.testing.assert_close(
        cache["hook_text_embeds"], raw.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
        atol=TOL, rtol=0,
    )
    torch.testing.assert_close(cache["hf.vision_model.embeddings.patch_embedding.hook_out"], patches, atol=0, rtol=0)


def test_no_hooks_is_the_stock_forward(clip, inputs, hook_registrations, hook_counts):
    model, raw, _ = clip
    before = hook_counts(raw)
    with torch.no_grad():
        ours = model(inputs)
        theirs = raw(**inputs).logits_per_image
    assert torch.equal(ours, theirs)
    assert hook_registrations.calls == []
    assert hook_counts(raw) == before
    assert all(not getattr(m, "config", None) or type(m.config).__name__ != "AttentionConfigView" for m in raw.modules())


def test_image_only_returns_image_embeddings(clip):
    model, raw, processor = clip
    image = sample_image()
    with torch.no_grad():
        expected = raw.get_image_features(processor(images=image, return_tensors="pt")["pixel_values"]).pooler_output
        assert torch.equal(model(image), expected)
        assert torch.equal(model(text="a cat"), raw.get_text_features(**processor(text=["a cat"], return_tensors="pt")).pooler_output)


def test_one_hook_and_pattern_capture_keep_outputs(clip, inputs):
    model, raw, _ = clip
    with torch.no_grad():
        reference = raw(**inputs).logits_per_image
        out, _ = model.run_with_cache(inputs, names_filter=["vision.blocks.1.hook_resid_post"], stop_early=False)
        assert torch.equal(out, reference)
        out, _ = model.run_with_cache(inputs, names_filter=["vision.blocks.0.attn.hook_pattern"], stop_early=False)
        torch.testing.assert_close(out, reference, atol=TOL, rtol=0)
    # the capture function ran only for that run: configs are restored
    assert raw.vision_model.encoder.layers[0].self_attn.config is raw.vision_model.config


def by_hand(raw, inputs, edit_layer, hook):
    with torch.no_grad():
        handle = hook(raw.vision_model.encoder.layers[edit_layer])
        try:
            return raw(**inputs).logits_per_image
        finally:
            handle.remove()


def test_zero_ablating_a_head_via_hook_z_matches_hand_edit(clip, inputs):
    model, raw, _ = clip
    d_head = model.adapter.towers()[0].d_head

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def hand(layer):
        def pre(module, args):
            x = args[0].clone()
            x[..., 2 * d_head : 3 * d_head] = 0
            return (x,)

        return layer.self_attn.out_proj.register_forward_pre_hook(pre)

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.attn.hook_z", ablate)])
    expected = by_hand(raw, inputs, 1, hand)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    assert not torch.allclose(ours, raw(**inputs).logits_per_image, atol=1e-3)


def test_uniform_pattern_matches_hand_edit(clip, inputs):
    model, raw, _ = clip

    def uniform(pattern, hook):
        return torch.full_like(pattern, 1.0 / pattern.shape[-1])

    def hand(layer):  # uniform attention ⇒ every query's z is the mean of the values
        store = {}
        h1 = layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: store.__setitem__("v", o))
        h2 = layer.self_attn.out_proj.register_forward_pre_hook(
            lambda m, a: (store["v"].mean(1, keepdim=True).expand_as(a[0]),)
        )

        class Both:
            def remove(self):
                h1.remove()
                h2.remove()

        return Both()

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.0.attn.hook_pattern", uniform)])
    torch.testing.assert_close(ours, by_hand(raw, inputs, 0, hand), atol=TOL, rtol=0)


def test_patching_resid_mid_matches_hand_edit(clip, inputs):
    model, raw, _ = clip
    with torch.no_grad():
        _, donor = model.run_with_cache(inputs["pixel_values"].flip(0), names_filter="vision.blocks.0.hook_resid_mid")
    new_mid = donor["vision.blocks.0.hook_resid_mid"]

    def hand(layer):  # the block output a model that had computed new_mid would produce
        return layer.register_forward_hook(lambda m, a, o: new_mid + m.mlp(m.layer_norm2(new_mid)))

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.0.hook_resid_mid", lambda t, hook: new_mid)])
    torch.testing.assert_close(ours, by_hand(raw, inputs, 0, hand), atol=TOL, rtol=0)


def test_early_stop_runs_nothing_later(clip, inputs):
    model, raw, _ = clip
    called = []
    handle = raw.vision_model.encoder.layers[1].register_forward_pre_hook(lambda m, a: called.append(1))
    try:
        with torch.no_grad():
            out, cache = model.run_with_cache(inputs, names_filter="vision.blocks.0.hook_resid_post")
    finally:
        handle.remove()
    assert out is None and called == [] and list(cache) == ["vision.blocks.0.hook_resid_post"]


def test_names_filters_and_cache_options(clip, inputs):
    model, _, _ = clip
    with torch.no_grad():
        _, by_glob = model.run_with_cache(inputs, names_filter="vision.blocks.*.hook_resid_post", dtype=torch.bfloat16)
        _, by_callable = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_post"), stop_early=False)
    assert list(by_glob) == ["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"]
    assert all(t.dtype == torch.bfloat16 for t in by_glob.values())
    assert set(by_callable) == {f"{t}.blocks.{i}.hook_resid_post" for t in ("vision", "text") for i in (0, 1)}
    stacked, labels = by_callable.stack("vision.blocks.*.hook_resid_post", return_labels=True)
    assert stacked.shape[0] == 2 and labels[0].startswith("vision.blocks.0")
    grid = by_callable.to_patch_grid("vision.blocks.1.hook_resid_post")
    resid = by_callable["vision.blocks.1.hook_resid_post"]
    assert grid.shape == (2, 4, 4, 32) and torch.equal(grid[1, 3, 2], resid[1, 1 + 3 * 4 + 2])
    assert torch.equal(by_callable.select("vision.blocks.1.hook_resid_post", "cls"), resid[:, 0])
    assert model.hook_names("vision.blocks.1.attn.hook_*")[0] == "vision.blocks.1.attn.hook_q"


def test_pattern_matches_follow_new_hook_points_and_taps_find_their_modules(clip):
    model, raw, _ = clip
    model = HookedVLM.from_hf(raw)  # its own index: module-path hook points made here stay here
    assert model.hook_names("hf.*") == []
    expected = [f"vision.blocks.{i}.hook_resid_post" for i in range(raw.config.vision_config.num_hidden_layers)]
    assert model.hook_names("vision.blocks.*.hook_resid_post") == expected
    assert model.hook_names("vision.blocks.*.hook_resid_post") == expected  # again, from the memo
    model.hook_point("hf.vision_model.post_layernorm.hook_out")
    assert model.hook_names("hf.*") == ["hf.vision_model.post_layernorm.hook_out"]  # the memo saw the new point
    model.hook_names("vision.*").clear()  # callers get a copy, not the memo
    assert model.hook_names("vision.*")
    for name in ("vision_model.encoder.layers.1.self_attn", "text_model.final_layer_norm"):
        assert submodule(raw, name) is raw.get_submodule(name)
    with pytest.raises(AttributeError, match="no attribute `nope`"):
        submodule(raw, "vision_model.nope.fc1")


def test_cache_records_values_after_the_hooks_at_the_same_point(clip, inputs):
    model, _, _ = clip
    name = "vision.blocks.0.hook_resid_post"
    with torch.no_grad():
        _, plain = model.run_with_cache(inputs, names_filter=name)
        with model.hooks(fwd_hooks=[(name, lambda t, hook: 2 * t)]):
            _, doubled = model.run_with_cache(inputs, names_filter=name)
            _, kept = model.run_with_cache(inputs, names_filter=name, reset_hooks_end=False)
            assert len(model.hook_dict[name].fwd_hooks) == 2  # TransformerLens semantics: the caching hook stays
            model.reset_hooks()
    assert torch.equal(doubled[name], 2 * plain[name]) and torch.equal(kept[name], 2 * plain[name])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_cached_positions_and_heads(clip, inputs):
    model, _, _ = clip
    names = ["vision.blocks.0.hook_resid_post", "vision.blocks.0.attn.hook_pattern", "vision.blocks.0.attn.hook_z"]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    with torch.no_grad():
        _, full = model.run_with_cache(inputs, names_filter=names)
        _, part = model.run_with_cache(inputs, names_filter=names, positions=mask, heads=[3])
    picked = [1 + 0 * 4 + 1, 1 + 2 * 4 + 3]
    assert torch.equal(part[names[0]], full[names[0]][:, picked])
    assert torch.equal(part[names[1]], full[names[1]][:, [3]][:, :, picked])
    assert torch.equal(part[names[2]], full[names[2]][:, picked][:, :, [3]])


def test_backward_hooks_and_context_manager(clip, inputs):
    model, raw, _ = clip
    grads = {}
    with model.hooks(bwd_hooks=[("vision.blocks.0.hook_resid_post", lambda g, hook: grads.__setitem__(hook.name, g))]):
        model(inputs).sum().backward()
    assert grads["vision.blocks.0.hook_resid_post"].shape == (2, 17, 32)
    raw.zero_grad()
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_unknown_hook_name_suggests_and_leaves_nothing(clip, inputs, hook_counts):
    model, raw, _ = clip
    before = hook_counts(raw)
    with pytest.raises(UnknownHookError, match="vision.blocks.0.hook_resid_post"):
        model.run_with_cache(inputs, names_filter=["vision.blocks.1.hook_resid_pre", "vision.blocks.0.hook_resid_pots"])
    with pytest.raises(UnknownHookError):
        model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.0.hook_resid_pre", lambda t, hook: t), ("hf.nope.hook_out", print)])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    assert hook_counts(raw) == before


def test_wrong_shape_from_a_hook_names_it_and_cleans_up(clip, inputs, hook_counts):
    model, raw, _ = clip
    before = hook_counts(raw)
    for name in ("vision.blocks.1.hook_resid_post", "vision.blocks.0.attn.hook_pattern"):
        with pytest.raises(HookShapeError, match=name.replace(".", r"\.")):
            model.run_with_hooks(inputs, fwd_hooks=[(name, lambda t, hook: t[:, :-1])])
    assert hook_counts(raw) == before
    assert raw.vision_model.encoder.layers[0].self_attn.config is raw.vision_model.config
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(model(inputs), raw(**inputs).logits_per_image)


def test_bad_inputs_and_devices(clip, monkeypatch):
    model, _, _ = clip
    with pytest.raises(TypeError, match="PIL image"):
        model(42)
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        model(torch.zeros(2, 4, 32, 32))
    with pytest.raises(FileNotFoundError):
        model("/no/such/image.png")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='cpu'"):
        HookedVLM.from_pretrained("openai/clip-vit-large-patch14")
    with pytest.raises(RuntimeError, match="device='cuda' was asked for"):
        HookedVLM.from_pretrained("openai/clip-vit-large-patch14", device="cuda")
    with pytest.raises(OSError, match="what was tried|tried transformers.AutoConfig"):
        HookedVLM.from_pretrained("/definitely/not/a/model", device="cpu")


def test_from_pretrained_loads_a_saved_checkpoint_with_its_processor(clip, tmp_path):
    _, raw, processor = clip
    raw.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(str(tmp_path), device="cpu")
    image = sample_image()
    with torch.no_grad():
        expected = raw.get_image_features(**processor(images=image, return_tensors="pt")).pooler_output
        torch.testing.assert_close(loaded(image), expected, atol=TOL, rtol=0)
    vision_only = HookedVLM.from_pretrained(str(tmp_path), device="cpu", model_class="CLIPVisionModel")
    assert "hook_image_embeds" not in vision_only.hook_dict and "vision.hook_out" in vision_only.hook_dict


@pytest.mark.parametrize(
    ("name", "tokens"), [("openai/clip-vit-large-patch14", 257), ("openai/clip-vit-large-patch14-336", 577)]
)
def test_real_size_configs_on_meta(name, tokens):
    raw = meta_model(name)
    assert isinstance(raw, CLIPModel)
    model = HookedVLM.from_hf(raw)
    per_block = 16  # with attn.hook_result
    assert len(model.hook_names("vision.blocks.*")) == 24 * per_block
    assert len(model.hook_names("text.blocks.*")) == 12 * per_block
    size = 224 if tokens == 257 else 336
    names = ["vision.blocks.23.attn.hook_z", "vision.blocks.23.attn.hook_pattern", "vision.blocks.23.mlp.hook_post",
             "vision.hook_out", "hook_image_embeds"]
    _, cache = model.run_with_cache(torch.empty(2, 3, size, size, device="meta"), names_filter=names)
    assert cache["vision.blocks.23.attn.hook_z"].shape == (2, tokens, 16, 64)
    assert cache["vision.blocks.23.attn.hook_pattern"].shape == (2, 16, tokens, tokens)
    assert cache["vision.blocks.23.mlp.hook_post"].shape == (2, tokens, 4096)
    assert cache["vision.hook_out"].shape == (2, 1024)
    assert cache["hook_image_embeds"].shape == (2, 768)


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_vision_only_classes(kind):
    raw, processor = tiny_clip(kind)
    model = HookedVLM.from_hf(raw, processor)
    image = sample_image()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = raw(pixel_values=pixels, output_hidden_states=True)
        ours, cache = model.run_with_cache(image, names_filter="vision.blocks.*.hook_resid_post", stop_early=False)
    expected = out.pooler_output if kind == "CLIPVisionModel" else out.image_embeds
    assert torch.equal(ours, expected)
    torch.testing.assert_close(cache["vision.blocks.1.hook_resid_post"], out.hidden_states[2], atol=0, rtol=0)
    with pytest.raises(TypeError, match="no text tower"):
        model(image, text="a cat")


def test_in_place_edits_count_as_edits_and_layer_index(clip, inputs):
    model, _, _ = clip
    with torch.no_grad():
        returned = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.hook_resid_mid", lambda t, hook: torch.zeros_like(t))])
        in_place = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.hook_resid_mid", lambda t, hook: t.zero_())])
        z_in_place = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.attn.hook_z", lambda t, hook: t.zero_())])
        z_returned = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.1.attn.hook_z", lambda t, hook: torch.zeros_like(t))])
    assert torch.equal(returned, in_place) and torch.equal(z_in_place, z_returned)
    assert not torch.allclose(returned, model(inputs))
    assert model.hook_dict["vision.blocks.1.attn.hook_z"].layer() == 1
    assert model.hook_dict["text.blocks.0.hook_resid_post"].layer() == 0


def test_unknown_keywords_raise_and_silent_hooks_warn(clip, inputs):
    model, _, _ = clip
    image = sample_image()
    with pytest.raises(TypeError, match="pos_slice: pass positions="):
        model.run_with_cache(image, names_filter="vision.blocks.0.hook_resid_post", pos_slice=0)
    with pytest.raises(TypeError, match="typo"):
        model(image, typo=1)
    with pytest.warns(UserWarning, match="text.blocks.0.hook_resid_post"):
        model.run_with_cache(image, names_filter=["vision.blocks.0.hook_resid_post", "text.blocks.0.hook_resid_post"])
    model.run_with_cache(image, names_filter="hf.vision_model.pre_layrnorm.hook_out")
    assert not any(name.startswith("hf.") for name in model.hook_names())
