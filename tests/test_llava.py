"""LLaVA-1.5 and LLaVA-NeXT adapters, checked on the tiny random models against independent references.

References: the unwrapped model's logits and ``output_hidden_states``, the standalone CLIP tower's hidden states, an
eager copy's ``output_attentions``, PyTorch hooks placed straight on the HF modules, the model's own
``get_image_features`` / ``pack_image_features`` (by marking every projected feature with its index and reading
where the model puts it), the processors' token arithmetic, and real checkpoint configs on the meta device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import direct_hooks
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.taps import ResidualSumTap, module_exists
from hooked_vlm.testing import meta_model, sample_image, tiny_clip, tiny_llava_onevision
from hooked_vlm.testing.llava import tiny_llava, tiny_llava_config, tiny_llava_next
from hooked_vlm.testing.llava_onevision import qwen2_tokenizer

PROMPT = "What is in the picture?"
FAMILIES = {"llava": tiny_llava, "llava_next": tiny_llava_next}

# (width, height) → what the tiny LLaVA-NeXT does with it (16 px tiles of 4×4 patches)
SQUARE = (32, 32)  # 2×2 tiles, an 8×8 grid, no padding
WIDE = (70, 20)  # 1×3 tiles: a 4×12 patch grid, letterbox rows removed
TALL = (24, 40)  # 2×2 tiles: 8×8 patches stitched, 2 letterbox columns removed on each side → 8×4


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    hf, processor = FAMILIES[request.param]()
    return request.param, hf, processor, HookedVLM.from_hf(hf, processor)


@pytest.fixture(scope="module")
def next_model():
    return HookedVLM.from_hf(*tiny_llava_next())


def image(size, seed=0):
    return sample_image(*size, seed=seed)


def tiles_of(prepared):
    """The images / tiles the model runs through CLIP, as ``get_image_features`` takes them out of ``pixel_values``."""
    pixels = prepared.kwargs["pixel_values"]
    if pixels.dim() == 4:  # LLaVA-1.5: one row per image
        return pixels
    return torch.cat([pixels[p.image, : p.n_tiles] for p in prepared.layout.images])


@torch.no_grad()
def reference_logits(hf, prepared, **kwargs):
    return hf(**prepared.kwargs, **kwargs).logits


# ---- names -------------------------------------------------------------------------------------------------------------


def test_canonical_hook_names(tiny):
    """One namespace: CLIP's vision blocks carry HF CLIP's names, the LM blocks LLaVA-OneVision's (RoPE, SwiGLU)."""
    family, _, _, model = tiny

    def block(m, tower):
        return [n.removeprefix(f"{tower}.blocks.1.") for n in m.hook_names(f"{tower}.blocks.1.*")]

    clip, onevision = HookedVLM.from_hf(*tiny_clip()), HookedVLM.from_hf(*tiny_llava_onevision())
    assert block(model, "vision") == block(clip, "vision") and "attn.hook_rot_q" not in block(model, "vision")
    lm = block(model, "lm")
    assert lm == block(onevision, "lm") and {"attn.hook_rot_q", "attn.hook_rot_k", "mlp.hook_pre_linear"} <= set(lm)
    packed = ["projector.hook_packed"] if family == "llava_next" else []
    assert [n for n in model.hook_names() if ".blocks." not in n] == [
        "vision.hook_embed", "vision.ln_pre.hook_normalized", "vision.hook_out", "projector.hook_in",
        "projector.hook_pre", "projector.hook_post", "projector.hook_out", *packed, "lm.hook_embed",
        "lm.ln_final.hook_normalized",
    ]  # fmt: skip
    assert len(model.hook_names()) == 9 + len(packed) + 3 * 16 + 2 * 19


# ---- parity with the unwrapped model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hooks", ["none", "one hook", "patterns"])
def test_logits_equal_unwrapped_model(tiny, hooks):
    _, hf, _, model = tiny
    prepared = model.prepare_inputs([image(TALL), image(SQUARE, 1)], prompt=["Hi", PROMPT])  # a padded batch
    expected = reference_logits(hf, prepared)
    if hooks == "none":
        assert torch.equal(model(prepared), expected)
    elif hooks == "one hook":
        seen = []
        logits = model.run_with_hooks(prepared, fwd_hooks=[("vision.hook_out", lambda x, hook: seen.append(x))])
        assert seen and torch.equal(logits, expected)
    else:
        logits, cache = model.run_with_cache(prepared, names_filter="*.hook_pattern", stop_early=False)
        assert len(cache) == 3 + 2
        real = prepared.kwargs["attention_mask"].bool()
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)


def test_residual_hooks_equal_hf_hidden_states(tiny):
    _, hf, _, model = tiny
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    tower_level = ("vision.hook_embed", "vision.ln_pre.hook_normalized", "vision.hook_out", "lm.hook_embed",
                   "lm.ln_final.hook_normalized")  # fmt: skip
    _, cache = model.run_with_cache(prepared, names_filter=lambda n: "resid_p" in n or n in tower_level)
    with torch.no_grad():
        lm_states = hf(**prepared.kwargs, output_hidden_states=True).hidden_states
        vision_states = hf.model.vision_tower(tiles_of(prepared), output_hidden_states=True).hidden_states
        embeddings = hf.model.vision_tower.embeddings(tiles_of(prepared))
    torch.testing.assert_close(cache["vision.hook_embed"], embeddings)
    torch.testing.assert_close(cache["vision.ln_pre.hook_normalized"], vision_states[0])  # CLIP: after pre_layrnorm
    for i in range(3):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.hook_resid_pre"], vision_states[i])
        torch.testing.assert_close(cache[f"vision.blocks.{i}.hook_resid_post"], vision_states[i + 1])
    torch.testing.assert_close(cache["vision.hook_out"], vision_states[-2][:, 1:])  # feature layer -2, CLS dropped
    torch.testing.assert_close(cache["lm.hook_embed"], lm_states[0])
    for i in range(2):
        torch.testing.assert_close(cache[f"lm.blocks.{i}.hook_resid_pre"], lm_states[i])
    torch.testing.assert_close(cache["lm.ln_final.hook_normalized"], lm_states[-1])  # HF's last state is after the norm


#: module names inside a block of each tower: (ln1, ln2, attention out, MLP in, MLP up, MLP out)
BLOCK_MODULES = {
    "vision": ("layer_norm1", "layer_norm2", "out_proj", "fc1", None, "fc2"),
    "lm": ("input_layernorm", "post_attention_layernorm", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _block_spec(block: str, tower: str) -> dict[str, tuple[str, str]]:
    """What to record straight from one block's HF modules: key → (module path, "in" / "out")."""
    ln1, ln2, o, mlp_in, up, mlp_out = BLOCK_MODULES[tower]
    spec = {
        "hook_resid_pre": (block, "in"), "ln1.hook_normalized": (f"{block}.{ln1}", "out"),
        "attn.hook_q": (f"{block}.self_attn.q_proj", "out"), "attn.hook_k": (f"{block}.self_attn.k_proj", "out"),
        "attn.hook_v": (f"{block}.self_attn.v_proj", "out"), "attn.hook_z": (f"{block}.self_attn.{o}", "in"),
        "hook_attn_out": (f"{block}.self_attn", "out"), "hook_resid_mid": (f"{block}.{ln2}", "in"),
        "ln2.hook_normalized": (f"{block}.{ln2}", "out"), "mlp.hook_pre": (f"{block}.mlp.{mlp_in}", "out"),
        "mlp.hook_post": (f"{block}.mlp.{mlp_out}", "in"), "hook_mlp_out": (f"{block}.mlp", "out"),
        "hook_resid_post": (block, "out"),
    }  # fmt: skip
    if up:
        spec["mlp.hook_pre_linear"] = (f"{block}.mlp.{up}", "out")
    return spec


def test_every_block_hook_equals_the_hf_modules(tiny):
    """Every per-block hook of both towers (but the attention-function ones) against PyTorch hooks placed straight
    on the HF modules, in one reference forward; q/k/v/z split into heads by hand."""
    _, hf, _, model = tiny
    prepared = model.prepare_inputs(image(WIDE), prompt=PROMPT)
    spec, heads = {}, {}
    for tower in model.adapter.towers():
        for i in range(tower.n_layers):
            block = f"{model.adapter.block_list(tower.name)}.{i}"
            for suffix, where in _block_spec(block, tower.name).items():
                name = f"{tower.name}.blocks.{i}.{suffix}"
                spec[name], heads[name] = where, tower.d_head
    store, handles = direct_hooks(hf, spec)
    try:
        reference_logits(hf, prepared)
    finally:
        for handle in handles:
            handle.remove()
    _, cache = model.run_with_cache(prepared, names_filter=list(spec))
    assert set(cache) == set(spec) and len(spec) == 3 * 13 + 2 * 14
    for name, value in store.items():
        if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z")):
            value = value.unflatten(-1, (-1, heads[name]))
        torch.testing.assert_close(cache[name], value, rtol=0, atol=0, msg=name)


def test_patterns_equal_hf_eager_attentions(tiny):
    _, hf, _, model = tiny
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    prepared = model.prepare_inputs(image(WIDE), prompt=PROMPT)
    _, cache = model.run_with_cache(prepared, names_filter="*.attn.hook_pattern")
    with torch.no_grad():
        lm_attentions = eager(**prepared.kwargs, output_attentions=True).attentions
        vision_attentions = eager.model.vision_tower(tiles_of(prepared), output_attentions=True).attentions
    assert len(lm_attentions) == 2 and len(vision_attentions) == 3
    for i, expected in enumerate(lm_attentions):
        torch.testing.assert_close(cache[f"lm.blocks.{i}.attn.hook_pattern"], expected)
    for i, expected in enumerate(vision_attentions):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.attn.hook_pattern"], expected)


# ---- which features reach the projector ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, strategy, layer",
    [("llava", "default", -2), ("llava", "full", -2), ("llava", "default", [1, -1]), ("llava", "full", [0, 2]),
     ("llava_next", "default", [-3, -2])],
)  # fmt: skip
def test_vision_hook_out_is_what_the_projector_reads(family, strategy, layer):
    if family == "llava":
        hf, processor = tiny_llava(vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    else:
        hf, processor = tiny_llava_next(vision_feature_layer=layer)
    model = HookedVLM.from_hf(hf, processor)
    prepared = model.prepare_inputs(image(TALL), prompt=PROMPT)
    names = ["vision.hook_out", "projector.hook_in", "projector.hook_out"]
    _, cache = model.run_with_cache(prepared, names_filter=names, stop_early=False)
    with torch.no_grad():
        states = hf.model.vision_tower(tiles_of(prepared), output_hidden_states=True).hidden_states
    drop = 1 if strategy == "default" else 0
    expected = torch.cat([states[i][:, drop:] for i in (layer if isinstance(layer, list) else [layer])], dim=-1)
    torch.testing.assert_close(cache["vision.hook_out"], expected)
    torch.testing.assert_close(cache["projector.hook_in"], expected)
    with torch.no_grad():
        torch.testing.assert_close(cache["projector.hook_out"], hf.model.multi_modal_projector(expected))
    features = prepared.layout["features"]
    assert features.shape == tuple(expected.shape[:2])
    assert torch.equal(features.kind[:, 0] == Kind.CLS, torch.full((expected.shape[0],), strategy == "full"))
    assert prepared.layout.tower_for("vision.hook_out") is features is prepared.layout.tower_for("projector.hook_out")
    assert torch.equal(prepared.layout.image_token_mask, prepared.kwargs["input_ids"] == hf.config.image_token_id)


def test_blocks_after_the_feature_layer_do_not_reach_the_lm(tiny):
    _, hf, _, model = tiny
    prepared = model.prepare_inputs(image(SQUARE), prompt=PROMPT)
    clean = reference_logits(hf, prepared)
    noise = lambda x, hook: x + torch.randn_like(x)  # noqa: E731
    assert torch.equal(model.run_with_hooks(prepared, fwd_hooks=[("vision.blocks.2.hook_resid_post", noise)]), clean)
    assert not torch.allclose(
        model.run_with_hooks(prepared, fwd_hooks=[("vision.blocks.1.hook_resid_post", noise)]), clean
    )
    # and a request that ends at the feature layer never runs the last block (nor the LM)
    calls = []
    handle = hf.model.vision_tower.encoder.layers[2].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        logits, cache = model.run_with_cache(
            prepared, names_filter=["vision.blocks.0.hook_resid_post", "vision.hook_out"]
        )
    finally:
        handle.remove()
    assert logits is None and not calls and cache["vision.hook_out"].shape[1] == 16


def test_editing_vision_hook_out_edits_the_projector_input_only_there(tiny):
    """An edit of one feature (CLS dropped) reaches the projector at that token, as a hook on the layer would do."""
    _, hf, _, model = tiny
    prepared = model.prepare_inputs(image(SQUARE), prompt=PROMPT)

    def edit(x, hook):
        x = x.clone()
        x[:, 5] = 0.0
        return x

    clean = model.run_with_cache(prepared, names_filter="projector.hook_in")[1]["projector.hook_in"]
    with model.hooks(fwd_hooks=[("vision.hook_out", edit)]):
        edited_logits, cache = model.run_with_cache(prepared, names_filter="projector.hook_in", stop_early=False)
    changed = (cache["projector.hook_in"] != clean).any(-1)
    assert changed.any(0).nonzero()[:, 0].tolist() == [5]

    def by_hand(module, args, output):  # block 1's output is hidden_states[-2]; token 0 is CLS
        output = output.clone()
        output[:, 1 + 5] = 0.0
        return output

    # prepended, as transformers records hidden_states[-2] with a hook of its own on that block
    handle = hf.model.vision_tower.encoder.layers[1].register_forward_hook(by_hand, prepend=True)
    try:
        expected = reference_logits(hf, prepared)
    finally:
        handle.remove()
    assert torch.equal(edited_logits, expected)


# ---- layout against the model's own packing ----------------------------------------------------------------------------------


def marked_embeddings(model, prepared):
    """``lm.hook_embed`` after replacing every projected feature by its flat index ``[tiles × tokens]``: each LM image
    token then holds the index of the feature the model itself put there (image_newline elsewhere)."""

    def mark(x, hook):
        return torch.arange(x.shape[0] * x.shape[1], dtype=x.dtype).view(*x.shape[:2], 1).expand_as(x).clone()

    with model.hooks(fwd_hooks=[("projector.hook_out", mark)]):
        _, cache = model.run_with_cache(prepared, names_filter="lm.hook_embed")
    return cache["lm.hook_embed"]


LAYOUT_CASES = {
    "square": [[SQUARE]], "wide": [[WIDE]], "tall": [[TALL]], "two images, one prompt": [[SQUARE, TALL]],
    "batch of prompts": [[WIDE, SQUARE], [TALL]],
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_sources_and_newlines_are_where_the_model_puts_them(tiny, case):
    family, hf, _, model = tiny
    rows = [[image(s, seed=k) for k, s in enumerate(row)] for row in LAYOUT_CASES[case]]
    prepared = model.prepare_inputs(rows, prompt=[PROMPT] * len(rows))
    layout, embeds = prepared.layout, marked_embeddings(model, prepared)
    lm = layout["lm"]
    image_tokens = prepared.kwargs["input_ids"] == hf.config.image_token_id
    assert torch.equal(layout.image_token_mask, image_tokens)
    newline = model.raw_model.model.image_newline if family == "llava_next" else None
    for packing in layout.images:
        at = embeds[packing.batch, packing.positions]
        carried = packing.source >= 0
        assert torch.equal(at[carried, 0].long(), packing.source[carried])
        assert torch.equal(carried, packing.kind != Kind.NEWLINE)
        if newline is not None:
            torch.testing.assert_close(at[~carried], newline.expand(int((~carried).sum()), -1))
        assert torch.equal(lm.image[packing.batch, packing.positions], torch.full((packing.n_tokens,), packing.image))
    if family == "llava":
        assert all(p.n_tokens == 16 and p.n_tiles == 1 for p in layout.images)
        assert not (lm.kind == Kind.NEWLINE).any()
    else:
        assert (lm.kind == Kind.NEWLINE).sum() == sum(p.grid[0] for p in layout.images)
    n_tiles = sum(p.n_tiles for p in layout.images)
    assert layout["vision"].shape == (n_tiles, 17) and layout["features"].shape == (n_tiles, 16)
    assert (layout["vision"].kind[:, 0] == Kind.CLS).all() and (layout["features"].kind == Kind.PATCH).all()


def test_next_token_counts_equal_the_processors(next_model):
    processor = next_model.processor
    for w, h in (SQUARE, WIDE, TALL, (16, 16), (100, 30), (33, 47)):
        (packing,) = next_model.prepare_inputs(image((w, h)), prompt=PROMPT).layout.images
        expected = processor._get_number_of_features(h, w, 16, 16) - 1  # "default": the processor's CLS correction
        assert packing.n_tokens == expected, (w, h)


def test_next_rows_and_cols_point_at_the_patches_they_carry(next_model):
    prepared = next_model.prepare_inputs(image(TALL), prompt=PROMPT)
    (packing,) = prepared.layout.images
    # by hand: 24×40 px fits 2×2 tiles (32×32 px) best: 8×8 patches stitched; scaled to the height, the image is
    # int(24 × 8 / 40) = 4 patches wide, so (8 - 4) // 2 = 2 letterbox columns go on each side: columns 2..5
    assert (packing.n_tiles, packing.tile_grid, packing.unpadded_grid, packing.grid) == (5, (2, 2), (8, 4), (8, 4))
    lm = prepared.layout["lm"]
    _, position = lm.grid_index(0, tile=1)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(4), indexing="ij")
    stitched_col = cols + 2
    tile = 1 + (rows // 4) * 2 + stitched_col // 4  # grid tiles follow the base tile, row-major
    expected = (packing.first_tile + tile) * 16 + (rows % 4) * 4 + stitched_col % 4
    source = torch.full((lm.shape[1],), -1)
    source[packing.positions] = packing.source
    assert torch.equal(source[position], expected)
    _, base = lm.grid_index(0, tile=0)
    assert torch.equal(source[base], torch.arange(16).view(4, 4))
    newlines = lm.kind[0] == Kind.NEWLINE
    assert torch.equal(lm.col[0][newlines], torch.full((8,), 4)) and torch.equal(lm.row[0][newlines], torch.arange(8))


def test_llava_full_strategy_hands_the_cls_token_to_the_lm():
    model = HookedVLM.from_hf(*tiny_llava(vision_feature_select_strategy="full"))
    prepared = model.prepare_inputs([image(SQUARE), image(TALL, 1)], prompt=PROMPT)
    layout, embeds = prepared.layout, marked_embeddings(model, prepared)
    lm = layout["lm"]
    assert [p.n_tokens for p in layout.images] == [17, 17]
    assert torch.equal(layout.image_token_mask, prepared.kwargs["input_ids"] == model.raw_model.config.image_token_id)
    for packing in layout.images:
        assert packing.kind[0] == Kind.CLS and (packing.kind[1:] == Kind.IMAGE).all()
        assert torch.equal(embeds[0, packing.positions, 0].long(), packing.source)
    cls = layout.mask("cls", "lm.blocks.0.hook_resid_post")
    assert cls.sum() == 2 and torch.equal(embeds[cls][:, 0].long(), torch.tensor([0, 17]))
    assert layout.mask("image", "lm.blocks.0.hook_resid_post").sum() == 32
    assert layout["features"].shape == (2, 17) and (lm.row[cls] == -1).all()


def test_unsupported_configurations_are_refused_when_wrapped(tiny):
    hf, processor = tiny_llava_next()
    hf.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="no place for it"):
        HookedVLM.from_hf(hf, processor)
    config = tiny_llava_config(processor.tokenizer)
    config = LlavaConfig(
        text_config=config.text_config, image_token_index=config.image_token_index,
        vision_config=dict(model_type="siglip_vision_model", image_size=16, patch_size=4, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="CLIP vision towers.*SiglipVisionModel"):
        HookedVLM.from_hf(LlavaForConditionalGeneration(config))
    _, _, _, model = tiny
    with pytest.raises(TypeError, match="image sizes and expanded <image> tokens"):
        model.prepare_inputs(torch.zeros(1, 3, 16, 16), prompt=PROMPT)
    with pytest.raises(ValueError, match=r"\['vision_feature_layer'\] differ from the model config"):
        model.prepare_inputs(image(SQUARE), prompt=PROMPT, vision_feature_layer=-1)
    same = model.prepare_inputs(image(SQUARE), prompt=PROMPT, vision_feature_layer=-2)  # the config's: accepted
    assert torch.equal(model(same), model(image(SQUARE), prompt=PROMPT))


# ---- real checkpoint configs on the meta device ---------------------------------------------------------------------------


REAL = {
    "llava-hf/llava-1.5-7b-hf": dict(kv_heads=32, d_mlp=11008, lm="llama", packed=False),
    "llava-hf/llava-v1.6-mistral-7b-hf": dict(kv_heads=8, d_mlp=14336, lm="mistral", packed=True),
}


def _real_inputs(model, size):
    """Processor-style inputs of one ``size`` (h, w) image at real size, the image tokens counted by the layout."""
    config = model.raw_model.config
    if model.adapter.family == "llava":
        n_tokens, pixels, extra = 576, torch.zeros(1, 3, 336, 336), {}
    else:
        (packing,) = model.adapter.image_packing(torch.tensor([size]))
        n_tokens, extra = packing.n_tokens, {"image_sizes": torch.tensor([size])}
        pixels = torch.zeros(1, packing.n_tiles, 3, 336, 336)
    ids = torch.cat(
        [torch.tensor([[1, 3148, 1001]]), torch.full((1, n_tokens), config.image_token_id), torch.tensor([[29901]])], 1
    )
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, **extra}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_on_meta_device_bind_every_hook(name):
    facts = REAL[name]
    model = HookedVLM.from_hf(meta_model(name))
    raw = model.raw_model
    vision, lm = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head, vision.d_mlp) == (24, 1024, 16, 64, 4096)
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads, lm.d_head, lm.d_mlp) == (
        32,
        4096,
        32,
        facts["kv_heads"],
        128,
        facts["d_mlp"],
    )
    assert raw.config.text_config.model_type == facts["lm"] and raw.config.vision_feature_layer == -2
    assert len(model.hook_names()) == 9 + facts["packed"] + 24 * 16 + 32 * 19
    for hook_name in model.hook_names():  # every tap binds to a module of the real model
        tap = model.hook_point(hook_name).tap
        assert module_exists(raw, tap.module), hook_name
        assert not isinstance(tap, ResidualSumTap) or module_exists(raw, tap.block), hook_name
    prepared = model.prepare_inputs(_real_inputs(model, [336, 672]))
    tiles = 3 if facts["packed"] else 1  # 336×672: the base tile + 1×2 grid tiles
    layout = prepared.layout
    assert layout["vision"].shape == (tiles, 577) and layout["features"].shape == (tiles, 576)
    if facts["packed"]:  # 576 base + 24 rows × (48 + 1 newline)
        assert layout["packed"].shape == (1, 576 + 24 * 49) and layout.image_token_mask.sum() == 576 + 24 * 49
        return  # LLaVA-NeXT's get_image_features reads image_sizes' values, which meta tensors do not have
    # LLaVA-1.5's vision side runs on meta tensors (the LM's placeholder check reads values): real-size shapes
    names = [n for n in model.hook_names() if n.startswith(("vision.", "projector."))]
    logits, cache = model.run_with_cache(prepared, names_filter=names)
    assert logits is None and set(cache) == set(names)
    assert cache["vision.blocks.23.hook_resid_post"].shape == (1, 577, 1024)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (1, 16, 577, 577)
    assert cache["vision.hook_out"].shape == cache["projector.hook_in"].shape == (1, 576, 1024)
    assert cache["projector.hook_out"].shape == (1, 576, 4096)


def test_real_next_token_counts_equal_the_processors():
    model = HookedVLM.from_hf(meta_model("llava-hf/llava-v1.6-mistral-7b-hf"))
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size=336),
        tokenizer=qwen2_tokenizer(["<image>"]),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    sizes = torch.tensor([[560, 560], [336, 336], [480, 640], [1080, 1920], [300, 2000], [2000, 300]])
    packings = model.adapter.image_packing(sizes)
    expected = [processor._get_number_of_features(h, w, 336, 336) - 1 for h, w in sizes.tolist()]
    assert [p.n_tokens for p in packings] == expected
    assert expected[0] == 2928  # 560×560 → 576 + 48 × 49, the count vLLM-based servers configure for this model
    assert [p.tile_grid for p in packings] == [(2, 2), (1, 2), (2, 2), (2, 2), (1, 3), (3, 1)]
    assert not any(p.interpolated for p in packings)
