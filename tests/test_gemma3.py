"""Gemma 3 through HookedVLM, checked on the tiny random model against independent references.

References: the unwrapped model's logits and ``output_hidden_states`` (LM and vision tower), an eager copy's
``output_attentions``, attention masks written out by hand from Gemma 3's rules (causal text, a sliding window of
``sliding_window`` tokens in local layers, bidirectional attention within each image's soft tokens), the model's
own ``get_image_features`` and norms, PyTorch hooks placed straight on the HF modules, and HF ``generate``.
"""

from __future__ import annotations

import pytest
import torch
from reference import direct_hooks, eager_copy
from transformers import Gemma3ForConditionalGeneration
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.testing import half_and_half_image, meta_model, real_size_inputs, sample_image
from hooked_vlm.testing.gemma3 import TINY_GEMMA3_TOKENS, TINY_GEMMA3_WINDOW, tiny_gemma3

PROMPT = "What is in the picture?"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_gemma3(seed=0)


@pytest.fixture(scope="module")
def model(tiny):
    return HookedVLM.from_hf(*tiny)


@pytest.fixture(scope="module")
def hf(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def eager(hf):
    return eager_copy(hf)


@pytest.fixture(scope="module")
def batch(model):
    """Two left-padded prompts: two images in the first, one in the second."""
    return model.prepare_inputs(
        [[sample_image(seed=1), half_and_half_image(40, 24)], [sample_image(50, 30, seed=2)]], prompt=[PROMPT, "Hi"]
    )


@torch.no_grad()
def reference_logits(hf, prepared):
    return hf(**prepared.kwargs).logits


def allowed_keys(kwargs, window: int | None) -> torch.Tensor:
    """``[batch, q, k]``: which keys each query may attend to, from Gemma 3's rules written out by hand."""
    is_image = kwargs["token_type_ids"].bool()
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    group = torch.where(is_image, starts.cumsum(1), -1)  # one id per run of soft tokens (one image)
    n = is_image.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    same_image = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)
    allowed = (k <= q) | same_image
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed & kwargs["attention_mask"].bool()[:, None, :]


# ---- names and structure -------------------------------------------------------------------------------------------


def test_canonical_hook_names(model):
    names = model.hook_names()
    vision_block = [n.removeprefix("vision.blocks.1.") for n in model.hook_names("vision.blocks.1.*")]
    lm_block = [n.removeprefix("lm.blocks.1.") for n in model.hook_names("lm.blocks.1.*")]
    assert vision_block == [
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out",
        "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
    ]  # fmt: skip
    assert lm_block == [
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.q_norm.hook_normalized",
        "attn.k_norm.hook_normalized", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern",
        "attn.hook_z", "attn.hook_result", "ln1_post.hook_in", "hook_attn_out", "hook_resid_mid",
        "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "ln2_post.hook_in",
        "hook_mlp_out", "hook_resid_post",
    ]  # fmt: skip
    towers = [n for n in names if ".blocks." not in n]
    assert towers == [
        "vision.hook_embed", "vision.hook_out", "projector.hook_in", "projector.hook_pooled",
        "projector.ln.hook_normalized", "projector.hook_out", "lm.hook_embed", "lm.ln_final.hook_normalized",
    ]  # fmt: skip
    assert len(names) == 8 + 2 * 16 + 2 * 23
    assert names.index("vision.blocks.1.hook_resid_post") < names.index("projector.hook_in")
    assert names.index("projector.hook_out") < names.index("lm.hook_embed") < names.index("lm.blocks.0.hook_resid_pre")


def test_hook_shapes_follow_heads_kv_heads_and_pooling(model, batch):
    _, cache = model.run_with_cache(
        batch, names_filter=lambda n: n.startswith(("vision.blocks.0.", "projector.", "lm.blocks.0."))
    )
    seq = batch.kwargs["input_ids"].shape[1]
    assert cache["vision.blocks.0.attn.hook_q"].shape == (3, 64, 4, 8)  # 3 images × 8×8 patches
    assert cache["projector.hook_in"].shape == (3, 64, 32)
    assert cache["projector.hook_pooled"].shape == cache["projector.ln.hook_normalized"].shape == (3, 16, 32)
    assert cache["projector.hook_out"].shape == (3, 16, 32)
    lm = "lm.blocks.0.attn."
    assert cache[lm + "hook_q"].shape == cache[lm + "q_norm.hook_normalized"].shape == (2, seq, 4, 8)
    assert cache[lm + "k_norm.hook_normalized"].shape == cache[lm + "hook_rot_k"].shape == (2, seq, 2, 8)
    assert cache["lm.blocks.0.attn.hook_pattern"].shape == (2, 4, seq, seq)
    assert cache["lm.blocks.0.mlp.hook_pre_linear"].shape == (2, seq, 37)


# ---- parity with the unwrapped model -------------------------------------------------------------------------------


@pytest.mark.parametrize("hooks", ["none", "one hook", "patterns"])
def test_logits_equal_unwrapped_model(model, hf, batch, hooks):
    expected = reference_logits(hf, batch)
    real = batch.kwargs["attention_mask"].bool()
    if hooks == "none":
        assert torch.equal(model(batch), expected)
    elif hooks == "one hook":
        seen = []
        logits = model.run_with_hooks(batch, fwd_hooks=[("lm.blocks.0.hook_resid_mid", lambda x, hook: seen.append(x))])
        assert seen and torch.equal(logits, expected)
    else:
        logits, cache = model.run_with_cache(batch, names_filter="*.hook_pattern", stop_early=False)
        assert len(cache) == 4
        torch.testing.assert_close(logits[real], expected[real], **TOL)


def test_every_residual_equals_hf_hidden_states(model, hf, batch):
    """resid_pre/mid/post of every block in both towers against HF's hidden states and the modules' own inputs."""
    kwargs = batch.kwargs
    lm_layers = hf.model.language_model.layers
    spec = {}
    for i in range(len(lm_layers)):
        layer = f"model.language_model.layers.{i}"
        spec |= {
            (i, "mid"): (f"{layer}.pre_feedforward_layernorm", "in"),  # the residual stream between the two halves
            (i, "attn_out"): (f"{layer}.post_attention_layernorm", "out"),
            (i, "mlp_out"): (f"{layer}.post_feedforward_layernorm", "out"),
            (i, "o_proj"): (f"{layer}.self_attn.o_proj", "out"),
            (i, "down_proj"): (f"{layer}.mlp.down_proj", "out"),
        }
    store, handles = direct_hooks(hf, spec)
    try:
        with torch.no_grad():
            lm_states = hf(**kwargs, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        vision_out = hf.model.vision_tower(kwargs["pixel_values"], output_hidden_states=True)
    _, cache = model.run_with_cache(
        batch, names_filter=lambda n: ".attn." not in n and ".mlp." not in n and "normalized" not in n
    )
    n_lm = len(lm_layers)
    torch.testing.assert_close(cache["lm.hook_embed"], lm_states[0], rtol=0, atol=0)
    for i in range(n_lm):
        block = f"lm.blocks.{i}."
        torch.testing.assert_close(cache[block + "hook_resid_pre"], lm_states[i], rtol=0, atol=0)
        if i < n_lm - 1:  # HF's last LM hidden state is after the final norm
            torch.testing.assert_close(cache[block + "hook_resid_post"], lm_states[i + 1], rtol=0, atol=0)
        torch.testing.assert_close(cache[block + "hook_resid_mid"], store[(i, "mid")], rtol=0, atol=0)
        torch.testing.assert_close(cache[block + "hook_attn_out"], store[(i, "attn_out")], rtol=0, atol=0)
        torch.testing.assert_close(cache[block + "hook_mlp_out"], store[(i, "mlp_out")], rtol=0, atol=0)
        torch.testing.assert_close(cache[block + "ln1_post.hook_in"], store[(i, "o_proj")], rtol=0, atol=0)
        torch.testing.assert_close(cache[block + "ln2_post.hook_in"], store[(i, "down_proj")], rtol=0, atol=0)
        # the residual stream adds exactly what the attention and MLP hooks carry (after the sandwich norms)
        mid = cache[block + "hook_resid_pre"] + cache[block + "hook_attn_out"]
        torch.testing.assert_close(cache[block + "hook_resid_mid"], mid, rtol=0, atol=0)
        post = cache[block + "hook_resid_mid"] + cache[block + "hook_mlp_out"]
        torch.testing.assert_close(cache[block + "hook_resid_post"], post, rtol=0, atol=0)
        assert not torch.allclose(cache[block + "hook_attn_out"], cache[block + "ln1_post.hook_in"])
    final = cache[f"lm.blocks.{n_lm - 1}.hook_resid_post"]
    with torch.no_grad():
        torch.testing.assert_close(hf.model.language_model.norm(final), lm_states[-1], rtol=0, atol=0)
    vision_states = vision_out.hidden_states
    torch.testing.assert_close(cache["vision.hook_embed"], vision_states[0], rtol=0, atol=0)
    for i in range(len(vision_states) - 1):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.hook_resid_pre"], vision_states[i], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"vision.blocks.{i}.hook_resid_post"], vision_states[i + 1], rtol=0, atol=0)
    # the projector reads the tower's last_hidden_state: after SigLIP's post_layernorm
    torch.testing.assert_close(cache["vision.hook_out"], vision_out.last_hidden_state, rtol=0, atol=0)


def test_qk_norm_rope_and_scores_by_hand(model, hf, batch):
    prefix = "lm.blocks.1.attn."
    names = [prefix + k for k in ("hook_q", "hook_k", "q_norm.hook_normalized", "k_norm.hook_normalized", "hook_rot_q", "hook_rot_k",
                                  "hook_attn_scores")]  # fmt: skip
    _, cache = model.run_with_cache(batch, names_filter=names)
    attn = hf.model.language_model.layers[1].self_attn
    with torch.no_grad():
        q_normed = attn.q_norm(cache[prefix + "hook_q"])  # the norm runs over d_head, per head and position
        k_normed = attn.k_norm(cache[prefix + "hook_k"])
        seq = batch.kwargs["input_ids"].shape[1]
        cos, sin = hf.model.language_model.rotary_emb(q_normed, torch.arange(seq)[None], "full_attention")
        rot_q, rot_k = apply_rotary_pos_emb(q_normed, k_normed, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(cache[prefix + "q_norm.hook_normalized"], q_normed)
    torch.testing.assert_close(cache[prefix + "k_norm.hook_normalized"], k_normed)
    # left padding shifts positions in the padded row; the first (longest) prompt has none
    torch.testing.assert_close(cache[prefix + "hook_rot_q"][0], rot_q[0], **TOL)
    torch.testing.assert_close(cache[prefix + "hook_rot_k"][0], rot_k[0], **TOL)
    k = cache[prefix + "hook_rot_k"].repeat_interleave(2, dim=2)
    scores = (
        torch.einsum("bqhd,bkhd->bhqk", cache[prefix + "hook_rot_q"], k)
        * hf.config.text_config.query_pre_attn_scalar**-0.5
    )
    allowed = allowed_keys(batch.kwargs, window=None)[:, None].expand_as(scores)
    torch.testing.assert_close(cache[prefix + "hook_attn_scores"][allowed], scores[allowed], **TOL)


def test_patterns_equal_eager_attentions_with_gemma_masks(model, eager, batch):
    """Sliding window in block 0, global attention in block 1, bidirectional within each image, in both."""
    kwargs = batch.kwargs
    types = eager.config.text_config.layer_types
    assert types == ["sliding_attention", "full_attention"]
    _, cache = model.run_with_cache(batch, names_filter="*.attn.hook_pattern")
    with torch.no_grad():
        lm_attentions = eager(**kwargs, output_attentions=True).attentions
        vision_attentions = eager.model.vision_tower(kwargs["pixel_values"], output_attentions=True).attentions
    real = kwargs["attention_mask"].bool()
    for i, expected in enumerate(lm_attentions):
        pattern = cache[f"lm.blocks.{i}.attn.hook_pattern"]
        torch.testing.assert_close(pattern, expected, **TOL)
        window = TINY_GEMMA3_WINDOW if types[i] == "sliding_attention" else None
        allowed = allowed_keys(kwargs, window)
        attended = (pattern > 0).all(1)  # every head attends where the mask allows, nowhere else
        assert torch.equal(attended[real], allowed[real]), f"block {i}"
    for i, expected in enumerate(vision_attentions):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.attn.hook_pattern"], expected, **TOL)
    # the masks matter in this input: a window shorter than the prompt, image tokens seeing later ones
    assert kwargs["input_ids"].shape[1] > TINY_GEMMA3_WINDOW + TINY_GEMMA3_TOKENS
    global_allowed, local_allowed = allowed_keys(kwargs, None), allowed_keys(kwargs, TINY_GEMMA3_WINDOW)
    assert (global_allowed & ~local_allowed).any()
    assert (global_allowed & ~torch.ones_like(global_allowed[0]).tril()).any()


def test_without_token_type_ids_image_tokens_attend_causally(model, batch):
    kwargs = {k: v for k, v in batch.kwargs.items() if k != "token_type_ids"}
    with pytest.warns(UserWarning, match="no token_type_ids"):
        prepared = model.prepare_inputs(kwargs)
    _, cache = model.run_with_cache(prepared, names_filter="lm.blocks.1.attn.hook_pattern")
    real_queries = prepared.kwargs["attention_mask"].bool()[:, None, :, None]
    pattern = cache["lm.blocks.1.attn.hook_pattern"].masked_fill(~real_queries, 0)
    future = torch.ones(pattern.shape[-2:], dtype=torch.bool).triu(1)
    assert not (pattern[..., future] > 0).any()


def test_projector_stages_and_the_merged_embeddings(model, hf, batch):
    names = ["projector.hook_in", "projector.hook_pooled", "projector.ln.hook_normalized", "projector.hook_out",
             "lm.hook_embed"]  # fmt: skip
    _, cache = model.run_with_cache(batch, names_filter=names)
    kwargs = batch.kwargs
    projector = hf.model.multi_modal_projector
    with torch.no_grad():
        grid = cache["projector.hook_in"].transpose(1, 2).reshape(3, 32, 8, 8)
        pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # 2×2 patches per soft token
        normed = projector.mm_soft_emb_norm(pooled)
        features = hf.model.get_image_features(kwargs["pixel_values"]).pooler_output
        embeddings = hf.model.language_model.embed_tokens.weight[kwargs["input_ids"]]
    torch.testing.assert_close(cache["projector.hook_pooled"], pooled, **TOL)
    torch.testing.assert_close(cache["projector.ln.hook_normalized"], normed, **TOL)
    torch.testing.assert_close(cache["projector.hook_out"], normed @ projector.mm_input_projection_weight, **TOL)
    torch.testing.assert_close(cache["projector.hook_out"], features, rtol=0, atol=0)
    image_tokens = batch.layout.image_token_mask
    embed = cache["lm.hook_embed"]
    torch.testing.assert_close(embed[image_tokens], features.flatten(0, 1), rtol=0, atol=0)
    # text tokens: the embedding rows times √d_model (soft tokens are not scaled)
    torch.testing.assert_close(embed[~image_tokens], embeddings[~image_tokens] * 32**0.5, **TOL)


# ---- layout ----------------------------------------------------------------------------------------------------------


def test_layout_spans_rows_and_cols(model, batch):
    layout = batch.layout
    ids = batch.kwargs["input_ids"]
    image_tokens = ids == model.raw_model.config.image_token_id
    assert torch.equal(layout.image_token_mask, image_tokens)
    assert torch.equal(batch.kwargs["token_type_ids"].bool(), image_tokens)
    assert [b for b, _ in layout.image_spans] == [0, 0, 1]
    boi, eoi = model.raw_model.config.boi_token_id, model.raw_model.config.eoi_token_id
    for b, positions in layout.image_spans:
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + TINY_GEMMA3_TOKENS))
        assert ids[b, positions[0] - 1] == boi and ids[b, positions[-1] + 1] == eoi
    lm = layout["lm"]
    assert set(lm.kind[image_tokens].tolist()) == {int(Kind.IMAGE)}
    assert lm.kind[(ids == boi) | (ids == eoi)].eq(int(Kind.TEXT)).all()
    assert layout["vision"].shape == (3, 64) and layout["pooled"].shape == (3, 16)
    assert layout.tower_for("projector.hook_in") is layout["vision"]
    assert layout.tower_for("projector.hook_pooled") is layout["pooled"]
    _, cache = model.run_with_cache(batch, names_filter=["projector.hook_out", "lm.hook_embed", "vision.hook_out"])
    for image in range(3):  # the LM's view of an image is its pooled grid, in the same order
        grid = layout.image_grid("lm.hook_embed", cache["lm.hook_embed"], image=image)
        torch.testing.assert_close(grid, cache["projector.hook_out"][image].view(4, 4, -1), rtol=0, atol=0)
        pooled = layout.image_grid("projector.hook_out", cache["projector.hook_out"], image=image)
        torch.testing.assert_close(pooled, grid, rtol=0, atol=0)
        patches = layout.image_grid("vision.hook_out", cache["vision.hook_out"], image=image)
        assert torch.equal(patches, cache["vision.hook_out"][image].view(8, 8, -1))
    b, positions = layout.image_positions(1)
    assert b == 0 and torch.equal(positions, layout.image_spans[1][1])


# ---- edits change only what they should --------------------------------------------------------------------------------


def test_an_edit_at_one_image_token_reaches_only_the_positions_that_attend_to_it(model, batch):
    kwargs = batch.kwargs
    b, positions = batch.layout.image_spans[0]
    p = int(positions[12])  # late in the span: earlier soft tokens of its image see it (bidirectional)
    names = ["lm.blocks.0.hook_resid_pre", "lm.blocks.0.hook_resid_post", "lm.blocks.1.hook_resid_post"]
    _, clean = model.run_with_cache(batch, names_filter=names)

    def bump(x, hook):
        x = x.clone()
        x[b, p] += 1.0
        return x

    with model.hooks(fwd_hooks=[("lm.hook_embed", bump)]):
        _, edited = model.run_with_cache(batch, names_filter=names)
    changed = {name: (edited[name] != clean[name]).any(-1) for name in names}
    assert changed["lm.blocks.0.hook_resid_pre"].nonzero().tolist() == [[b, p]]
    local = allowed_keys(kwargs, TINY_GEMMA3_WINDOW)  # block 0 is a sliding-window layer
    expected = local[:, :, p].clone()
    expected[1 - b] = False
    assert torch.equal(changed["lm.blocks.0.hook_resid_post"], expected)
    start = int(positions[0])
    assert expected[b, start:p].all()  # every earlier soft token of the image sees it, however far back ...
    assert expected[b, p : p + TINY_GEMMA3_WINDOW].all() and not expected[b, p + TINY_GEMMA3_WINDOW :].any()
    # ... later tokens only within the window (the window bounds the past, bidirectionality the future)
    # block 1 is global: every position that attends to any changed one, and nothing in the other prompt
    seen = (allowed_keys(kwargs, None)[b][:, expected[b]]).any(-1)
    assert torch.equal(changed["lm.blocks.1.hook_resid_post"][b], seen)
    assert not changed["lm.blocks.1.hook_resid_post"][1 - b].any()
    assert not seen[: int(positions[0])].any()  # nothing before the image moves


def test_an_edit_at_one_pooled_token_changes_one_soft_token(model, batch):
    names = ["projector.hook_out", "lm.hook_embed"]
    _, clean = model.run_with_cache(batch, names_filter=names)

    def bump(x, hook):
        x = x.clone()
        x[2, 5] += 1.0
        return x

    with model.hooks(fwd_hooks=[("projector.hook_pooled", bump)]):
        _, edited = model.run_with_cache(batch, names_filter=names)
    assert (edited["projector.hook_out"] != clean["projector.hook_out"]).any(-1).nonzero().tolist() == [[2, 5]]
    b, positions = batch.layout.image_spans[2]
    changed = (edited["lm.hook_embed"] != clean["lm.hook_embed"]).any(-1)
    assert changed.nonzero().tolist() == [[b, int(positions[5])]]


def test_editing_normed_queries_matches_a_manual_edit(model, hf, batch):
    def scale(x, hook):
        return x * 2.0

    logits = model.run_with_hooks(batch, fwd_hooks=[("lm.blocks.0.attn.q_norm.hook_normalized", scale)])
    handle = hf.model.language_model.layers[0].self_attn.q_norm.register_forward_hook(lambda m, a, out: out * 2.0)
    try:
        expected = reference_logits(hf, batch)
    finally:
        handle.remove()
    assert torch.equal(logits, expected)
    assert not torch.allclose(logits, reference_logits(hf, batch))


@pytest.mark.parametrize(
    "name", ["lm.blocks.0.attn.hook_pattern", "lm.blocks.1.attn.hook_attn_scores", "lm.blocks.0.hook_attn_out"]
)
def test_edits_change_the_output(model, hf, batch, name):
    clean = reference_logits(hf, batch)
    real = batch.kwargs["attention_mask"].bool()  # padding rows attend nowhere: eager and sdpa fill them differently
    same = model.run_with_hooks(batch, fwd_hooks=[(name, lambda x, hook: x.clone())])
    torch.testing.assert_close(same[real], clean[real], **TOL)

    def edit(x, hook):
        if name.endswith("hook_pattern"):  # a sharper pattern: a scaled one would be normed away after o_proj
            return x**2 / (x**2).sum(-1, keepdim=True)
        return x * 3.0

    edited = model.run_with_hooks(batch, fwd_hooks=[(name, edit)])
    assert (edited[real] - clean[real]).abs().max() > 1e-3


def test_resid_mid_edit_reaches_the_mlp_input(model, hf, batch):
    """An edit of resid_mid is the residual stream the MLP half reads (pre_feedforward_layernorm's input)."""
    store, handles = direct_hooks(hf, {"mid": ("model.language_model.layers.0.pre_feedforward_layernorm", "in")})
    try:
        model.run_with_hooks(batch, fwd_hooks=[("lm.blocks.0.hook_resid_mid", lambda x, hook: x * 0.5)])
    finally:
        for handle in handles:
            handle.remove()
    _, clean = model.run_with_cache(batch, names_filter="lm.blocks.0.hook_resid_mid")
    torch.testing.assert_close(store["mid"], clean["lm.blocks.0.hook_resid_mid"] * 0.5, **TOL)


# ---- inputs and generation -------------------------------------------------------------------------------------------


def test_input_forms(model, hf, tiny):
    processor = tiny[1]
    picture = sample_image(seed=3)
    from_images = model.prepare_inputs(picture, prompt=PROMPT)
    ids = from_images.kwargs["input_ids"][0]
    assert int((ids == processor.tokenizer.bos_token_id).sum()) == 1 and ids[0] == processor.tokenizer.bos_token_id
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ready = dict(processor(text=[text], images=[[picture]], return_tensors="pt", add_special_tokens=False))
    assert torch.equal(model(ready), model(from_images))
    assert torch.equal(model(picture, text=text), model(from_images))
    text_only = model.prepare_inputs(prompt="Hello")
    assert (text_only.layout["lm"].kind == Kind.TEXT).all() and "vision" not in text_only.layout.towers
    assert torch.equal(model(text_only), reference_logits(hf, text_only))
    # ready pixel values: one prompt per image, the same inputs as the processor makes from the images
    pixels = model.prepare_inputs([picture, sample_image(40, 20)], prompt=[PROMPT, "Hi"])
    again = model.prepare_inputs(pixels.kwargs["pixel_values"], prompt=[PROMPT, "Hi"])
    assert pixels.kwargs.keys() == again.kwargs.keys()
    assert all(torch.equal(pixels.kwargs[k], again.kwargs[k]) for k in pixels.kwargs)
    with pytest.raises(ValueError, match="one prompt per image"):
        model.prepare_inputs(pixels.kwargs["pixel_values"], prompt=["a", "b", "c"])
    broken = dict(ready, input_ids=ready["input_ids"].clone())
    broken["input_ids"][0, (broken["input_ids"][0] == hf.config.image_token_id).nonzero()[0, 0]] = 0
    with pytest.raises(ValueError, match="placeholders do not match"):
        _ = model.prepare_inputs(broken).layout
    split = dict(ready, input_ids=ready["input_ids"].clone())
    positions = (split["input_ids"][0] == hf.config.image_token_id).nonzero()[:, 0]
    first, after = int(positions[0]), int(positions[-1]) + 2  # the soft token moves past <end_of_image>
    ids = split["input_ids"][0]
    ids[first], ids[after] = ids[after].clone(), ids[first].clone()
    with pytest.raises(ValueError, match="not contiguous"):
        _ = model.prepare_inputs(split).layout


def test_generate_equals_hf_generate(model, hf, batch):
    """With pattern capture in both kinds of block: a sliding block's cache keeps the last ``sliding_window`` keys."""
    names = ["lm.blocks.0.attn.hook_pattern", "lm.blocks.1.attn.hook_pattern"]
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out = model.generate(batch, cache_names=names, **options)
    with torch.no_grad():
        expected = hf.generate(**batch.kwargs, **options)
    assert torch.equal(out.sequences, expected)
    seq = batch.kwargs["input_ids"].shape[1]
    sliding, full = (out.step_cache[name] for name in names)
    assert sliding[0].shape == full[0].shape == (2, 4, seq, seq)  # the prompt
    assert [tuple(p.shape) for p in sliding[1:]] == [(2, 4, 1, TINY_GEMMA3_WINDOW)] * 3
    assert [tuple(p.shape) for p in full[1:]] == [(2, 4, 1, seq + k) for k in (1, 2, 3)]


# ---- real checkpoint configs on the meta device ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, d_lm, n_lm, heads, kv_heads, d_head, scalar",
    [("google/gemma-3-4b-it", 2560, 34, 8, 4, 256, 256), ("google/gemma-3-12b-it", 3840, 48, 16, 8, 256, 256),
     ("google/gemma-3-27b-it", 5376, 62, 32, 16, 128, 168)],
)  # fmt: skip
def test_real_configs_on_meta_device(name, d_lm, n_lm, heads, kv_heads, d_head, scalar):
    raw = meta_model(name)
    assert isinstance(raw, Gemma3ForConditionalGeneration)
    model = HookedVLM.from_hf(raw)
    vision, lm = model.adapter.towers()
    assert (vision.n_layers, vision.d_model, vision.n_heads, vision.d_head, vision.d_mlp) == (27, 1152, 16, 72, 4304)
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.n_kv_heads, lm.d_head) == (n_lm, d_lm, heads, kv_heads, d_head)
    assert len(model.hook_names()) == 8 + 27 * 16 + n_lm * 23
    for hook in model.hook_dict.values():  # every tap names a real module of the checkpoint's tree
        raw.get_submodule(hook.tap.module)
    text = raw.config.text_config
    assert text.query_pre_attn_scalar == scalar and text.sliding_window == 1024 and text.vocab_size == 262208
    assert [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"] == list(range(5, n_lm, 6))
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert raw.model.multi_modal_projector.mm_input_projection_weight.shape == (1152, d_lm)
    layout = model.prepare_inputs(real_size_inputs(model)).layout
    assert layout["vision"].shape == (1, 4096) and layout["pooled"].shape == (1, 256)
    assert int(layout.image_token_mask.sum()) == 256


def test_every_hook_fires_with_real_shapes_on_the_meta_device():
    """Gemma-3-4B at real size on the meta device: the vision side on one 896 px image, the LM on a text prompt
    (HF's forward checks image-token counts by value, which meta tensors do not have)."""
    model = HookedVLM.from_hf(meta_model("google/gemma-3-4b-it"))
    inputs = real_size_inputs(model)
    _, vision = model.run_with_cache(inputs, names_filter=lambda n: not n.startswith("lm."))
    assert set(vision) == {n for n in model.hook_names() if not n.startswith("lm.")}
    assert vision["vision.blocks.26.attn.hook_pattern"].shape == (1, 16, 4096, 4096)
    assert vision["projector.hook_pooled"].shape == (1, 256, 1152)
    assert vision["projector.hook_out"].shape == (1, 256, 2560)
    seq = inputs["input_ids"].shape[1]
    _, lm = model.run_with_cache({"input_ids": inputs["input_ids"]}, names_filter=lambda n: n.startswith("lm."))
    assert set(lm) == {n for n in model.hook_names() if n.startswith("lm.")}
    assert lm["lm.blocks.33.attn.q_norm.hook_normalized"].shape == (1, seq, 8, 256)
    assert lm["lm.blocks.5.attn.hook_pattern"].shape == (1, 8, seq, seq)
    assert lm["lm.blocks.0.attn.hook_result"].shape == (1, seq, 8, 2560)
    assert lm["lm.blocks.33.mlp.hook_post"].shape == (1, seq, 10240)


# ---- decompositions ------------------------------------------------------------------------------------------------


def test_decompositions_with_sandwich_norms(model, batch):
    """Per-layer components add up to the residual stream and go through Gemma's final RMSNorm (``1 + weight``)
    exactly; per-head results, which sit before the post-attention norm, are refused rather than misattributed."""
    _, cache = model.run_with_cache(
        batch, names_filter=lambda n: n.startswith("lm.") and ("hook_" in n and ".attn." not in n or "hook_z" in n)
    )
    stack, labels = cache.decompose_resid(return_labels=True, tower="lm")
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    final = cache["lm.blocks.1.hook_resid_post"]
    torch.testing.assert_close(stack.sum(0), final, **TOL)
    normed = cache.apply_ln_to_stack(stack, tower="lm").sum(0)
    torch.testing.assert_close(normed, cache["lm.ln_final.hook_normalized"], **TOL)
    with pytest.raises(NotImplementedError, match="norms the attention output again"):
        cache.stack_head_results(tower="lm")
    # SigLIP's blocks have no post-attention norm: their heads add up to hook_attn_out as usual
    _, vision = model.run_with_cache(
        batch, names_filter=["vision.blocks.0.attn.hook_z", "vision.blocks.0.hook_attn_out"]
    )
    heads = vision.stack_head_results(layer=1, tower="vision")
    bias = model.raw_model.model.vision_tower.encoder.layers[0].self_attn.out_proj.bias
    torch.testing.assert_close(heads.sum(0) + bias, vision["vision.blocks.0.hook_attn_out"], **TOL)


def test_pan_and_scan_crops_are_images_of_their_own(model, hf, tiny):
    """The image processor's pan-and-scan crops, with the prompt text Gemma3Processor writes for them: each crop is
    a row of pixel_values and a span of soft tokens, and the layout counts it as an image."""
    processor = tiny[1]
    pixels = processor.image_processor(images=[sample_image(120, 30)], do_pan_and_scan=True, return_tensors="pt")
    n_crops = int(pixels["num_crops"][0])
    assert n_crops > 1
    image_text = processor.replace_image_token({"num_crops": [n_crops]}, 0)
    text = f"<bos><start_of_turn>user\n{image_text}Hi<end_of_turn>\n<start_of_turn>model\n"
    tokens = processor.tokenizer([text], add_special_tokens=False, return_tensors="pt")
    inputs = dict(tokens, pixel_values=pixels["pixel_values"])
    inputs["token_type_ids"] = (inputs["input_ids"] == hf.config.image_token_id).long()
    prepared = model.prepare_inputs(inputs)
    assert len(prepared.layout.image_spans) == 1 + n_crops == prepared.layout["vision"].shape[0]
    _, cache = model.run_with_cache(prepared, names_filter=["projector.hook_out", "lm.hook_embed"])
    for k in range(1 + n_crops):
        grid = prepared.layout.image_grid("lm.hook_embed", cache["lm.hook_embed"], image=k)
        torch.testing.assert_close(grid, cache["projector.hook_out"][k].view(4, 4, -1), rtol=0, atol=0)
    assert torch.equal(model(prepared), reference_logits(hf, prepared))
