"""The suite every model family passes, run for each tiny model of ``hooked_vlm.testing.TINY_MODELS``.

A new family gets it by registering its adapter and its tiny model (doc/adding_a_family.md). References are
independent of the taps: PyTorch forward hooks on the blocks ``adapter.block_list`` names (what HF
``output_hidden_states`` records), the wrapped model run on its own, and ``pattern @ v`` computed by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.adapter import ADAPTERS, Adapter, AdapterConflictError, HFAdapter, register_adapter
from hooked_vlm.report import default_text
from hooked_vlm.testing import TINY_MODELS, sample_image

FAMILIES = sorted(TINY_MODELS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = HookedVLM.from_pretrained(f"tiny:{request.param}", device="cpu")
    prepared = model.prepare_inputs([sample_image(seed=1)], **default_text(model))
    return request.param, model, prepared


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _block_io(model: HookedVLM, tower: str, prepared) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's input and output of ``tower``, from plain forward hooks on the raw blocks."""
    blocks = model.raw_model.get_submodule(model.adapter.block_list(tower))
    inputs, outputs = [], []
    handles = [
        block.register_forward_hook(
            lambda m, args, kwargs, out: (
                (
                    inputs.append((args[0] if args else next(iter(kwargs.values()))).detach()),
                    outputs.append(_first(out).detach()),
                )
                and None
            ),
            with_kwargs=True,
        )
        for block in blocks
    ]
    try:
        with torch.no_grad():
            model.adapter.forward(prepared)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def test_every_registered_family_has_a_tiny_model():
    wrapped = {type(HookedVLM.from_pretrained(f"tiny:{name}", device="cpu").adapter) for name in TINY_MODELS}
    assert {a.family for a in ADAPTERS} == {a.family for a in wrapped}


def test_block_hooks_equal_the_blocks_inputs_and_outputs(family):
    name, model, prepared = family
    for tower in model.adapter.towers():
        inputs, outputs = _block_io(model, tower.name, prepared)
        assert len(outputs) == tower.n_layers, f"{name}: {tower.name} blocks ran {len(outputs)}× for {tower.n_layers}"
        names = [f"{tower.name}.blocks.{i}.hook_resid_{k}" for i in range(tower.n_layers) for k in ("pre", "post")]
        with torch.no_grad():  # as the reference: grad mode picks nn.MultiheadAttention's fast path or not
            _, cache = model.run_with_cache(prepared, names_filter=names, stop_early=False)
        for i in range(tower.n_layers):
            for kind, reference in (("pre", inputs[i]), ("post", outputs[i])):
                cached = cache[f"{tower.name}.blocks.{i}.hook_resid_{kind}"]
                assert cached.numel() == reference.numel(), (name, tower.name, i, kind)
                # packed towers (Qwen2-VL vision) add a leading axis of 1 at the hook point
                torch.testing.assert_close(cached, reference.reshape(cached.shape), rtol=0, atol=0)


def test_pattern_times_values_is_z(family):
    """hook_z = pattern @ v per head (kv heads repeated under GQA), in every tower, block 0."""
    name, model, prepared = family
    for tower in model.adapter.towers():
        p = f"{tower.name}.blocks.0.attn."
        if p + "hook_pattern" not in model.hook_dict:
            continue
        _, cache = model.run_with_cache(prepared, names_filter=[p + "hook_pattern", p + "hook_v", p + "hook_z"])
        pattern, v, z = cache[p + "hook_pattern"], cache[p + "hook_v"], cache[p + "hook_z"]
        rows = pattern.sum(-1)
        assert torch.allclose(rows[rows > 0.5], torch.ones(()), atol=1e-5), name  # a softmax over keys
        v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)  # [batch, pos, head, d_head]
        expected = torch.einsum("bhqk,bkhd->bqhd", pattern.double(), v.double())
        torch.testing.assert_close(z.double(), expected, rtol=1e-4, atol=1e-5, msg=f"{name} {tower.name}")


def test_patterns_agree_with_eager_attention_weights(family):
    name, model, prepared = family
    if not isinstance(model.adapter, HFAdapter):
        pytest.skip("open_clip's nn.MultiheadAttention returns no weights through the model (test_open_clip.py)")
    raw = model.raw_model
    raw.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = raw(**prepared.kwargs, output_attentions=True)
    finally:
        raw.set_attn_implementation("sdpa")
    # VLMs return the LM's; their vision towers' weights are compared in the family's own file (Qwen-VL's vision
    # attention runs per image / window); a vision tower alone (DINOv2) returns its own
    attentions = {"lm" if model.adapter.has_language_model else "vision": getattr(out, "attentions", None)}
    if hasattr(out, "vision_model_output"):  # CLIPModel
        attentions = {"vision": out.vision_model_output.attentions, "text": out.text_model_output.attentions}
    checked = 0
    for tower, weights in attentions.items():
        if not weights:
            continue
        names = [f"{tower}.blocks.{i}.attn.hook_pattern" for i in range(len(weights))]
        _, cache = model.run_with_cache(prepared, names_filter=names)
        for i, w in enumerate(weights):
            torch.testing.assert_close(cache[names[i]], w, rtol=1e-4, atol=1e-5, msg=f"{name} {tower} block {i}")
            checked += 1
    assert checked


def test_no_hooks_and_identity_hooks_change_nothing(family):
    name, model, prepared = family

    def observe(x, hook):
        return None

    with torch.no_grad():
        raw = model.adapter.forward(prepared)  # the wrapped model alone, no hook point installed
        plain = model(prepared)
        # hook points on module boundaries only pass values through: bit-identical
        outside = model.run_with_hooks(prepared, fwd_hooks=[(lambda n: ".attn." not in n, observe)])
        # attention internals are computed in eager form while observed (not sdpa): equal up to rounding
        everything = model.run_with_hooks(prepared, fwd_hooks=[(lambda n: True, observe)])
    assert torch.equal(plain, raw) and torch.equal(outside, raw), name
    torch.testing.assert_close(everything, raw, rtol=1e-4, atol=1e-5, msg=name)


def test_early_stop_returns_the_same_values(family):
    name, model, prepared = family
    hook = "vision.blocks.0.hook_resid_post"
    output, early = model.run_with_cache(prepared, names_filter=hook)
    full_output, full = model.run_with_cache(prepared, names_filter=hook, stop_early=False)
    assert output is None and full_output is not None, name
    assert torch.equal(early[hook], full[hook]), name


def test_an_edit_at_one_image_position_changes_only_what_follows(family):
    """Adding to one vision patch changes block 0's input at that patch only (wherever the layout puts it: Qwen2.5-VL
    reorders patches into windows after the embedding); in a VLM, adding to the LM embedding of one image token
    changes block 0's input there only, and its output at that token and later ones only (causal)."""
    name, model, prepared = family
    layout = prepared.layout
    patches = layout.mask("patches", "vision.hook_embed")
    points = [("vision.hook_embed", "vision.blocks.0.hook_resid_pre", None, patches)]
    if model.adapter.has_language_model:
        points.append(("lm.hook_embed", "lm.blocks.0.hook_resid_pre", "lm.blocks.0.hook_resid_post",
                       layout.image_token_mask))  # fmt: skip
    for edited, after, later, candidates in points:
        b, p = (int(i) for i in candidates.nonzero()[len(candidates.nonzero()) // 2])
        source, target = layout.tower_for(edited), layout.tower_for(after)
        expected = torch.ones(target.shape, dtype=torch.bool)
        for field in ("kind", "image", "tile", "row", "col"):
            expected &= getattr(target, field) == getattr(source, field)[b, p]
        names = [after] + ([later] if later else [])
        _, clean = model.run_with_cache(prepared, names_filter=names)

        def bump(x, hook, b=b, p=p):
            x = x.clone()
            x[b, p] += 1.0
            return x

        with model.hooks(fwd_hooks=[(edited, bump)]):
            _, patched = model.run_with_cache(prepared, names_filter=names)
        # packed towers (Qwen2-VL vision) add a leading axis of 1 at the hook point
        changed = (patched[after] != clean[after]).any(-1).reshape(target.shape)
        assert expected.sum() == 1 and torch.equal(changed, expected), (name, edited)
        if later:
            later_changed = (patched[later] != clean[later]).any(-1)[b]
            # causal: the token itself and no earlier one, except within the same image for a model whose image
            # tokens attend to each other both ways (later ones change unless a sliding window ends first: Gemma 3's
            # own tests check its masks exactly)
            lm = layout.tower_for(later)
            same_image = layout.image_token_mask[b] & (lm.image[b] == lm.image[b, p])
            assert later_changed[p] and not (later_changed[:p] & ~same_image[:p]).any(), name


def test_layout_selectors_match_the_inputs(family):
    name, model, prepared = family
    layout = prepared.layout
    vision_hook = "vision.blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(prepared, names_filter=vision_hook)
    tower = layout.tower_for(vision_hook)
    assert tuple(tower.shape) == tuple(cache[vision_hook].shape[:2]), name
    patches = layout.mask("patches", vision_hook)
    assert torch.equal(patches, tower.kind == Kind.PATCH) and patches.any(), name
    kwargs = prepared.kwargs
    if model.adapter.has_language_model:
        lm = "lm.blocks.0.hook_resid_post"
        image_token = model.raw_model.config.image_token_id
        from_ids = kwargs["input_ids"] == image_token  # the processor's own image placeholders
        assert torch.equal(layout.image_token_mask, from_ids), name
        newline = layout.tower_for(lm).kind == Kind.NEWLINE  # LLaVA-OneVision's row ends; none elsewhere
        assert torch.equal(layout.mask("image", lm) | newline, from_ids), name
        text = layout.mask("text", lm)
        assert torch.equal(text, ~from_ids & kwargs["attention_mask"].bool()), name
    if model.adapter.has_text_tower:
        text = layout.mask("text", "text.blocks.0.hook_resid_post")
        assert text.any() and text.sum() <= kwargs["input_ids"].numel(), name


def test_generation_equals_the_wrapped_models(family):
    name, model, prepared = family
    if not model.adapter.has_language_model:
        with pytest.raises(NotImplementedError, match="do not generate"):
            model.adapter.generate(prepared, max_new_tokens=2)
        return
    generation = model.generate(prepared, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = model.raw_model.generate(**prepared.kwargs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generation.sequences, reference), name
    assert generation.new_tokens.shape == (
        reference.shape[0],
        reference.shape[1] - prepared.kwargs["input_ids"].shape[1],
    )


def test_one_name_for_stores_sae_configs_and_steering(family):
    from hooked_vlm.sae.store import checkpoint_name
    from hooked_vlm.steering import model_name

    name, model, _ = family
    assert model.name == checkpoint_name(model) == model_name(model) == model.adapter.name
    assert model.name == (
        getattr(getattr(model.raw_model, "config", None), "name_or_path", "")
        or f"{model.adapter.family}:{type(model.raw_model).__name__}"
    )


# ---- the contract itself ------------------------------------------------------------------------------------------


def test_an_adapter_must_provide_the_contract():
    class Half(Adapter):
        family = "half"

        def towers(self):
            return []

    with pytest.raises(TypeError, match="abstract"):
        Half(nn.Linear(1, 1))


def test_two_adapters_cannot_claim_one_model_class():
    clip = next(a for a in ADAPTERS if a.family == "clip")

    class AnotherCLIP(clip):
        family = "another_clip"

    before = list(ADAPTERS)
    with pytest.raises(AdapterConflictError, match=r"claims the model class transformers\.models\.clip.*CLIPModel"):
        register_adapter(AnotherCLIP)

    class SameFamily(clip):
        family = "clip"
        model_classes = (nn.Linear,)

    with pytest.raises(AdapterConflictError, match="claims the family 'clip'"):
        register_adapter(SameFamily)
    assert ADAPTERS == before


def test_hub_options_reach_model_and_processor(monkeypatch):
    """HFAdapter.load passes revision / token / cache_dir / trust_remote_code to both from_pretrained calls."""
    import transformers

    clip = next(a for a in ADAPTERS if a.family == "clip")
    calls = {}
    tiny, processor = TINY_MODELS["clip"]()

    def model_from_pretrained(name, **kwargs):
        calls["model"] = kwargs
        return tiny

    def processor_from_pretrained(name, **kwargs):
        calls["processor"] = kwargs
        return processor

    monkeypatch.setattr(clip.model_class, "from_pretrained", staticmethod(model_from_pretrained))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(processor_from_pretrained))
    hub = {"revision": "abc", "token": "t", "cache_dir": "/c", "trust_remote_code": False, "local_files_only": True}
    clip.load("org/repo", device="cpu", torch_dtype=torch.float32, low_cpu_mem_usage=True, **hub)
    assert calls["processor"] == hub
    assert calls["model"] == hub | {"dtype": torch.float32, "low_cpu_mem_usage": True}
