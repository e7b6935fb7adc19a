"""open_clip CLIP through HookedVLM, checked against hooks placed straight on open_clip's modules and hand-made edits."""

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from safetensors.torch import save_file

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.testing import meta_model, sample_image, tiny_clip, tiny_open_clip

TOL = 1e-5
TEXTS = ["a photo of a cat", "sunset over the sea", "a diagram"]
DONOR_TEXTS = ["two dogs", "a red car on a road", "noise"]

#: the canonical per-block hook set (doc/hook_reference.md), in forward order
BLOCK_HOOKS = [
    "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
    "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


@pytest.fixture(scope="module")
def tiny():
    raw, processor = tiny_open_clip()
    return HookedVLM.from_hf(raw, processor), raw, processor


@pytest.fixture(scope="module")
def inputs(tiny):
    _, _, (preprocess, tokenizer) = tiny
    images = [sample_image(seed=0), sample_image(seed=1, width=80, height=120)]
    return {"pixel_values": torch.stack([preprocess(image) for image in images]), "input_ids": tokenizer(TEXTS)}


def blocks(raw, tower):
    return (raw.visual.transformer if tower == "vision" else raw.transformer).resblocks


def run_raw(raw, inputs, tower):
    return raw.encode_image(inputs["pixel_values"]) if tower == "vision" else raw.encode_text(inputs["input_ids"])


def reference(raw, inputs, tower):
    """Every canonical hook of one tower, from PyTorch hooks on open_clip's modules and its own MHA weights."""
    store, handles = {}, []

    def keep(key, boundary, module, pick=lambda t: t):
        if boundary == "in":
            hook = module.register_forward_pre_hook(lambda m, a: store.__setitem__(key, pick(a[0]).detach()))
        else:
            hook = module.register_forward_hook(lambda m, a, o: store.__setitem__(key, pick(o).detach()))
        handles.append(hook)

    prefix = f"{tower}."
    if tower == "vision":
        keep("vision.hook_embed", "in", raw.visual.ln_pre)
        keep("vision.ln_pre.hook_normalized", "out", raw.visual.ln_pre)
        keep("vision.hook_out", "out", raw.visual.ln_post, pick=lambda t: t[:, 0])
    else:
        keep("text.hook_embed", "in", raw.transformer)
        keep("text.ln_final.hook_normalized", "out", raw.ln_final)
    for i, block in enumerate(blocks(raw, tower)):
        p = f"{prefix}blocks.{i}."
        keep(p + "hook_resid_pre", "in", block)
        keep(p + "ln1.hook_normalized", "out", block.ln_1)
        keep(p + "hook_attn_out", "out", block.ls_1)
        keep(p + "hook_resid_mid", "in", block.ln_2)
        keep(p + "ln2.hook_normalized", "out", block.ln_2)
        keep(p + "mlp.hook_pre", "out", block.mlp.c_fc)
        keep(p + "mlp.hook_post", "out", block.mlp.gelu)
        keep(p + "hook_mlp_out", "out", block.ls_2)
        keep(p + "hook_resid_post", "out", block)
    try:
        with torch.no_grad():
            embeds = run_raw(raw, inputs, tower)
    finally:
        for handle in handles:
            handle.remove()
    store["hook_image_embeds" if tower == "vision" else "hook_text_embeds"] = embeds

    mask = None if tower == "vision" else raw.attn_mask  # the causal mask encode_text passes to every block
    with torch.no_grad():
        for i, block in enumerate(blocks(raw, tower)):
            p = f"{prefix}blocks.{i}."
            a, attn = store[p + "ln1.hook_normalized"], block.attn
            d, n_heads = a.shape[-1], attn.num_heads
            q, k, v = (
                (a @ attn.in_proj_weight[j * d : (j + 1) * d].T + attn.in_proj_bias[j * d : (j + 1) * d]).unflatten(-1, (n_heads, -1))
                for j in range(3)
            )
            out, pattern = attn(a, a, a, need_weights=True, average_attn_weights=False, attn_mask=mask)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
            if mask is not None:
                scores = scores + mask
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
            # the reference z is right: MHA's own output is out_proj(z)
            torch.testing.assert_close(F.linear(z.flatten(-2), attn.out_proj.weight, attn.out_proj.bias), out, atol=TOL, rtol=0)
            store |= {p + "attn.hook_q": q, p + "attn.hook_k": k, p + "attn.hook_v": v,
                      p + "attn.hook_attn_scores": scores, p + "attn.hook_pattern": pattern, p + "attn.hook_z": z,
                      # each head's z times its columns of out_proj.weight (no bias)
                      p + "attn.hook_result": torch.einsum("bqhd,mhd->bqhm", z, attn.out_proj.weight.unflatten(1, (n_heads, -1)))}
    return store


def assert_matches(actual, expected, name):
    """Max abs diff ≤ TOL; masked (-inf) scores must be masked in both."""
    assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    masked = torch.isinf(expected)
    assert torch.equal(masked, torch.isinf(actual)) and torch.equal(actual[masked], expected[masked]), name
    diff = (actual[~masked] - expected[~masked]).abs().max().item()
    assert diff <= TOL, f"{name}: max abs diff {diff}"


def clean(raw, hook_counts, before):
    """No PyTorch hook left on open_clip's modules and no method shadowed on an instance."""
    assert hook_counts(raw) == before
    assert "encode_text" not in vars(raw)
    for tower in ("vision", "text"):
        for block in blocks(raw, tower):
            assert "attention" not in vars(block) and block.attention.__func__ is ResidualAttentionBlock.attention


def logits_of(raw, inputs):
    with torch.no_grad():
        return raw.get_logits(inputs["pixel_values"], inputs["input_ids"])[0]


# ---- names and values -------------------------------------------------------------------------------------------


def test_same_hook_names_as_hf_clip(tiny):
    model, _, _ = tiny
    hf = HookedVLM.from_hf(*tiny_clip())
    assert model.hook_names() == hf.hook_names()
    assert model.hook_names("vision.blocks.0.*") == [f"vision.blocks.0.{n}" for n in BLOCK_HOOKS]


@pytest.mark.parametrize("names", ["all", "no_pattern"])
def test_every_hook_matches_open_clip(tiny, inputs, names):
    model, raw, _ = tiny
    expected = reference(raw, inputs, "vision") | reference(raw, inputs, "text")
    if names == "no_pattern":  # q/k/v/z alone take the SDPA path
        expected = {n: t for n, t in expected.items() if not n.endswith(("hook_pattern", "hook_attn_scores"))}
    else:
        assert set(expected) == set(model.hook_names())
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs, names_filter=list(expected), stop_early=False)
    assert set(cache) == set(expected)
    for name, value in expected.items():
        assert_matches(cache[name], value, name)
    image = F.normalize(expected["hook_image_embeds"], dim=-1)
    text = F.normalize(expected["hook_text_embeds"], dim=-1)
    assert_matches(logits, raw.logit_scale.exp().detach() * image @ text.T, "logits")
    assert_matches(logits, logits_of(raw, inputs), "get_logits")


def test_sdpa_unless_scores_or_pattern_are_requested(tiny, inputs, monkeypatch):
    model, _, _ = tiny
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    counts = {}
    for name in ("hook_z", "hook_pattern", "hook_attn_scores"):
        calls.clear()
        with torch.no_grad():
            model.run_with_cache(inputs["pixel_values"], names_filter=f"vision.blocks.0.attn.{name}", stop_early=False)
        counts[name] = len(calls)
    assert counts["hook_z"] == counts["hook_pattern"] + 1 == counts["hook_attn_scores"] + 1


def test_observing_hooks_keep_outputs(tiny, inputs):
    model, raw, _ = tiny
    with torch.no_grad():
        ours, _ = model.run_with_cache(inputs, names_filter="vision.blocks.1.hook_resid_post", stop_early=False)
        assert torch.equal(ours, logits_of(raw, inputs))
        ours, _ = model.run_with_cache(inputs, names_filter="text.blocks.0.attn.hook_pattern", stop_early=False)
        assert_matches(ours, logits_of(raw, inputs), "logits")


# ---- edits ----------------------------------------------------------------------------------------------------------


def hand_run(raw, inputs, tower, layer, hook):
    """Logits of the raw model with ``hook(block)`` installed on one block by hand."""
    handle = hook(blocks(raw, tower)[layer])
    try:
        return logits_of(raw, inputs)
    finally:
        handle.remove()


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_zero_ablating_a_head_via_hook_z_matches_zeroed_out_proj_columns(tiny, inputs, tower):
    model, raw, _ = tiny
    head, d_head = 2, next(t.d_head for t in model.adapter.towers() if t.name == tower)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[(f"{tower}.blocks.1.attn.hook_z", ablate)])
        edited = copy.deepcopy(raw)
        blocks(edited, tower)[1].attn.out_proj.weight[:, head * d_head : (head + 1) * d_head] = 0
    expected = logits_of(edited, inputs)
    assert_matches(ours, expected, "logits")
    assert not torch.allclose(ours, logits_of(raw, inputs), atol=1e-3)


@pytest.mark.parametrize("tower", ["vision", "text"])
@pytest.mark.parametrize("where", ["hook_pattern", "hook_attn_scores"])
def test_uniform_attention_matches_hand_edit(tiny, inputs, tower, where):
    model, raw, _ = tiny
    n = 17 if tower == "vision" else 77
    allowed = torch.ones(n, n, dtype=torch.bool)
    if tower == "text":
        allowed = allowed.tril()

    def uniform(t, hook):  # over the keys each query may see
        if where == "hook_pattern":
            return (allowed / allowed.sum(-1, keepdim=True)).expand_as(t)
        return torch.zeros_like(t).masked_fill(~allowed, float("-inf"))

    def hand(block):  # uniform attention ⇒ each query's z is the mean of the values it may see
        def mix(module, args, output):
            a = args[0]
            d = a.shape[-1]
            v = F.linear(a, module.in_proj_weight[2 * d :], module.in_proj_bias[2 * d :])
            mean = v.cumsum(1) / torch.arange(1, n + 1)[:, None] if tower == "text" else v.mean(1, keepdim=True).expand_as(v)
            return module.out_proj(mean), None

        return block.attn.register_forward_hook(mix)

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[(f"{tower}.blocks.0.attn.{where}", uniform)])
    assert_matches(ours, hand_run(raw, inputs, tower, 0, hand), "logits")
    assert not torch.allclose(ours, logits_of(raw, inputs), atol=1e-3)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_patching_resid_mid_matches_manual_block_forward(tiny, inputs, tower):
    model, raw, (_, tokenizer) = tiny
    donor = {"pixel_values": inputs["pixel_values"].flip(0), "input_ids": tokenizer(DONOR_TEXTS)}
    positions = [0, 3, 5]
    donor_mid = {}
    handle = blocks(raw, tower)[1].ln_2.register_forward_pre_hook(lambda m, a: donor_mid.__setitem__("mid", a[0]))
    try:
        with torch.no_grad():
            run_raw(raw, donor, tower)
    finally:
        handle.remove()

    def patch(mid, hook):
        mid = mid.clone()
        mid[:, positions] = donor_mid["mid"][:, positions]
        return mid

    def hand(block):  # the edited block, computed by hand
        def forward(module, args, kwargs, output):
            x = args[0]
            mid = x + module.ls_1(module.attention(module.ln_1(x), attn_mask=kwargs.get("attn_mask")))
            mid[:, positions] = donor_mid["mid"][:, positions]
            return mid + module.ls_2(module.mlp(module.ln_2(mid)))

        return block.register_forward_hook(forward, with_kwargs=True)

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[(f"{tower}.blocks.1.hook_resid_mid", patch)])
    assert_matches(ours, hand_run(raw, inputs, tower, 1, hand), "logits")
    assert not torch.allclose(ours, logits_of(raw, inputs), atol=1e-3)


def test_replacing_text_embeds_changes_logits_as_open_clip_computes_them(tiny, inputs):
    model, raw, _ = tiny
    vector = torch.randn(16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[("hook_text_embeds", lambda t, hook: vector.expand_as(t))])
        image = F.normalize(raw.encode_image(inputs["pixel_values"]), dim=-1)
        expected = raw.logit_scale.exp() * image @ F.normalize(vector, dim=-1)[:, None].expand(16, len(TEXTS))
    assert_matches(ours, expected, "logits")


# ---- zero cost when idle, and clean-up ----------------------------------------------------------------------------


def test_no_hooks_is_the_stock_forward(tiny, inputs, hook_registrations, hook_counts):
    model, raw, _ = tiny
    before = hook_counts(raw)
    pixels, ids = inputs["pixel_values"], inputs["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(pixels), raw.encode_image(pixels))
        assert torch.equal(model({"input_ids": ids}), raw.encode_text(ids))
        assert torch.equal(model(inputs), raw.get_logits(pixels, ids)[0])
    assert hook_registrations.calls == []
    clean(raw, hook_counts, before)
    with torch.no_grad():  # the counter does see registrations
        model.run_with_cache(inputs, names_filter="vision.blocks.0.hook_resid_pre")
    assert hook_registrations.calls


def test_attention_override_lives_for_one_run_only(tiny, inputs, hook_counts):
    model, raw, _ = tiny
    before = hook_counts(raw)
    seen = {}

    def look(t, hook):
        seen["attention"] = vars(blocks(raw, "text")[1]).get("attention")
        seen["encode_text"] = vars(raw).get("encode_text")

    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=[("text.blocks.1.attn.hook_pattern", look), ("hook_text_embeds", look)])
    assert seen["attention"] is not None and seen["encode_text"] is not None
    clean(raw, hook_counts, before)


@pytest.mark.parametrize("name", ["vision.blocks.1.attn.hook_pattern", "text.blocks.0.attn.hook_q", "hook_text_embeds"])
def test_a_raising_hook_leaves_the_model_stock(tiny, inputs, hook_counts, name):
    model, raw, _ = tiny
    before = hook_counts(raw)

    def boom(t, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        model.run_with_hooks(inputs, fwd_hooks=[(name, boom), ("text.blocks.1.attn.hook_z", lambda t, hook: t)])
    clean(raw, hook_counts, before)
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(model(inputs), logits_of(raw, inputs))


def test_early_stop_runs_nothing_later(tiny, inputs):
    model, raw, _ = tiny
    called = []
    handle = raw.visual.ln_post.register_forward_pre_hook(lambda m, a: called.append(1))
    try:
        with torch.no_grad():
            out, cache = model.run_with_cache(inputs, names_filter="vision.blocks.0.attn.hook_z")
    finally:
        handle.remove()
    assert out is None and called == [] and list(cache) == ["vision.blocks.0.attn.hook_z"]


def test_raw_module_escape_hatch(tiny, inputs):
    model, raw, _ = tiny
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=["open_clip.visual.conv1.hook_out", "open_clip.ln_final.hook_in"])
        patches = raw.visual.conv1(inputs["pixel_values"])
    assert torch.equal(cache["open_clip.visual.conv1.hook_out"], patches)
    assert cache["open_clip.ln_final.hook_in"].shape == (len(TEXTS), 77, 32)


# ---- inputs and layout ------------------------------------------------------------------------------------------------


def test_image_and_text_inputs(tiny, tmp_path):
    model, _, (preprocess, tokenizer) = tiny
    images = [sample_image(seed=0), sample_image(seed=2, width=64, height=40)]
    expected = torch.stack([preprocess(image) for image in images])
    images[1].save(tmp_path / "b.png")
    forms = [images, [images[0], np.asarray(images[1])], [images[0], tmp_path / "b.png"], expected,
             {"pixel_values": expected}]
    for form in forms:
        assert torch.equal(model.prepare_inputs(form).kwargs["pixel_values"], expected)
    assert torch.equal(model.prepare_inputs(expected[0]).kwargs["pixel_values"], expected[:1])
    ids = tokenizer(TEXTS)
    for form in [{"text": TEXTS}, {"text": ids}, {"input_ids": ids}]:
        assert torch.equal(model.prepare_inputs(form).kwargs["input_ids"], ids)
    assert torch.equal(model.prepare_inputs(None, text=TEXTS[0]).kwargs["input_ids"], ids[:1])
    assert torch.equal(model.prepare_inputs(None, text=ids).kwargs["input_ids"], ids)


def test_layout_cls_grid_and_padding_after_end_of_text(tiny, inputs):
    model, _, (_, tokenizer) = tiny
    layout = model.prepare_inputs(inputs).layout
    vision = layout["vision"]
    assert vision.shape == (2, 17) and (vision.kind[:, 0] == Kind.CLS).all() and vision.grids == [(4, 4)] * 2
    assert vision.row[0, 1 + 2 * 4 + 3] == 2 and vision.col[0, 1 + 2 * 4 + 3] == 3
    text = layout["text"]
    end = (inputs["input_ids"] == tokenizer.eot_token_id).int().argmax(-1)
    assert torch.equal(text.kind == Kind.TEXT, torch.arange(77) <= end[:, None])


def test_bad_inputs_fail_early(tiny, inputs):
    model, raw, _ = tiny
    with pytest.raises(TypeError, match="no prompt"):
        model(inputs, prompt="What is this?")
    with pytest.raises(ValueError, match=r"\[batch, 77\]"):
        model({"input_ids": inputs["input_ids"][:, :10]})
    with pytest.raises(TypeError, match="attention_mask"):
        model({"input_ids": inputs["input_ids"], "attention_mask": torch.ones(3, 77)})
    with pytest.raises(ValueError, match="twice"):
        model({"input_ids": inputs["input_ids"]}, text=TEXTS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(np.full((32, 32, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="without a processor"):
        HookedVLM.from_hf(raw)(sample_image())


def test_unsupported_variants_are_refused():
    raw, _ = tiny_open_clip()
    raw.visual.pool_type = "avg"
    with pytest.raises(ValueError, match="vision.hook_out"):
        HookedVLM.from_hf(raw)


# ---- loading ----------------------------------------------------------------------------------------------------------


def test_bad_names_say_what_was_tried():
    with pytest.raises(ValueError, match=r"'ViT-L-15' is not in open_clip.list_models\(\)\. Closest: .*ViT-L-14"):
        HookedVLM.from_pretrained("open_clip:ViT-L-15/openai", device="cpu")
    with pytest.raises(ValueError, match="neither a pretrained tag of ViT-L-14 .*'openai'"):
        HookedVLM.from_pretrained("open_clip:ViT-L-14/opneai", device="cpu")
    with pytest.raises(ValueError, match="attn_implementation"):
        HookedVLM.from_pretrained("open_clip:ViT-L-14/openai", device="cpu", attn_implementation="sdpa")


@pytest.mark.parametrize(("tag", "quick_gelu"), [("openai", True), ("laion2b_s32b_b82k", False)])
def test_openai_tags_load_with_quick_gelu(monkeypatch, tag, quick_gelu):
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(OSError, match="tried open_clip.create_model_and_transforms\\('ViT-L-14', pretrained='.*no network"):
        HookedVLM.from_pretrained(f"open_clip:ViT-L-14/{tag}", device="cpu")
    assert calls == [(("ViT-L-14",), {"pretrained": tag, "device": "cpu", "force_quick_gelu": quick_gelu})]


def test_from_pretrained_loads_a_local_open_clip_folder(tiny, inputs, tmp_path):
    _, raw, _ = tiny
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    model = HookedVLM.from_pretrained(f"open_clip:local-dir:{tmp_path}", device="cpu", dtype=torch.float64)
    assert next(model.raw_model.parameters()).dtype == torch.float64
    with torch.no_grad():
        ours = model(sample_image(), text=TEXTS)
        theirs = copy.deepcopy(raw).double().get_logits(inputs["pixel_values"][:1].double(), inputs["input_ids"])[0]
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


# ---- real size on the meta device --------------------------------------------------------------------------------------


def test_real_size_vit_l_14_on_meta(tiny):
    raw = meta_model("open_clip:ViT-L-14")
    model = HookedVLM.from_hf(raw)
    assert model.hook_names() == [
        "vision.hook_embed", "vision.ln_pre.hook_normalized",
        *(f"vision.blocks.{i}.{n}" for i in range(24) for n in BLOCK_HOOKS),
        "vision.hook_out", "hook_image_embeds", "text.hook_embed",
        *(f"text.blocks.{i}.{n}" for i in range(12) for n in BLOCK_HOOKS),
        "text.ln_final.hook_normalized", "hook_text_embeds",
    ]
    _, _, (_, tokenizer) = tiny
    logits, cache = model.run_with_cache(
        {"pixel_values": torch.zeros(2, 3, 224, 224), "input_ids": tokenizer(TEXTS)}, stop_early=False
    )
    assert logits.shape == (2, 3)
    shapes = {
        "vision.hook_embed": (2, 257, 1024), "vision.blocks.23.attn.hook_q": (2, 257, 16, 64),
        "vision.blocks.23.attn.hook_pattern": (2, 16, 257, 257), "vision.blocks.23.attn.hook_z": (2, 257, 16, 64),
        "vision.blocks.23.mlp.hook_post": (2, 257, 4096), "vision.blocks.23.hook_resid_mid": (2, 257, 1024),
        "vision.hook_out": (2, 1024), "hook_image_embeds": (2, 768),
        "text.hook_embed": (3, 77, 768), "text.blocks.11.attn.hook_attn_scores": (3, 12, 77, 77),
        "text.blocks.11.attn.hook_v": (3, 77, 12, 64), "text.blocks.11.mlp.hook_pre": (3, 77, 3072),
        "text.ln_final.hook_normalized": (3, 77, 768), "hook_text_embeds": (3, 768),
    }
    for name, shape in shapes.items():
        assert cache[name].shape == shape, name
    assert model.adapter.describe()["vision tokens"].endswith("= 257")


def test_example_inputs_give_real_sizes_from_a_meta_config(capsys):
    from hooked_vlm.cli import main

    model = HookedVLM.from_hf(meta_model("open_clip:ViT-L-14"))
    inputs = model.adapter.example_inputs()
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in inputs.items()} == {
        "pixel_values": ((1, 3, 224, 224), torch.float32, "cpu"), "input_ids": ((1, 77), torch.long, "cpu"),
    }
    assert main(["hooks", "config:open_clip:ViT-L-14", "--markdown"]) == 0
    out, err = capsys.readouterr()
    assert "no example inputs" not in err and "no shapes" not in err
    shapes = {}
    for line in out.splitlines():
        if line.startswith("| `"):
            name, shape, *_ = (cell.strip() for cell in line.strip().strip("|").split("|"))
            shapes[name.strip("`")] = shape
    assert "?" not in shapes.values()
    assert shapes["vision.hook_embed"] == "[1, 257, 1024]"
    assert shapes["vision.blocks.23.attn.hook_z"] == "[1, 257, 16, 64]"
    assert shapes["vision.blocks.0.attn.hook_pattern"] == "[1, 16, 257, 257]"
    assert shapes["vision.blocks.23.mlp.hook_post"] == "[1, 257, 4096]"
    assert shapes["vision.hook_out"] == "[1, 1024]"
    assert shapes["hook_image_embeds"] == "[1, 768]"
    assert shapes["text.blocks.11.attn.hook_attn_scores"] == "[1, 12, 77, 77]"
    assert shapes["hook_text_embeds"] == "[1, 768]"
