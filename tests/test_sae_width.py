"""Hook widths (``Adapter.hook_widths`` / ``HookedVLM.hook_width``) and the ``add_sae`` checks built on them.

Reference: the width each hook actually carries in a run of every tiny family (heads flattened), and, for the
real-size configs on the meta device, a run there (two-tower models) or the LM's own width, which every vision
feature handed to the LM must have. A new family is checked by registering its tiny model.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_vlm import HookedVLM
from hooked_vlm.cache import HEAD_HOOKS, PATTERN_HOOKS, leaf
from hooked_vlm.report import default_text, meta_shapes, record_shapes
from hooked_vlm.sae import SAEShapeError
from hooked_vlm.testing import TINY_MODELS, config_names, sample_image


def sae_at(hook: str | None, d_in: int, seed: int = 0) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=8, metadata=SAEMetadata(hook_name=hook)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return sae


def seen_width(name: str, shape: torch.Size) -> int | None:
    kind = leaf(name)  # QK-norm outputs are per-head queries and keys
    if kind in PATTERN_HOOKS:
        return None
    return shape[-2] * shape[-1] if kind in HEAD_HOOKS else shape[-1]


def mismatches(model: HookedVLM, cache) -> list[tuple[str, int | None, int | None]]:
    declared = model.adapter.hook_widths()
    rows = []
    for name in model.hook_names():
        assert name in cache, f"{name} did not fire, so its width is not checked"
        if name.rsplit(".", 1)[-1] != "hook_result":  # added by HookedVLM, not by the adapter
            assert name in declared, f"the adapter states no width for {name}"
        width = model.hook_width(name)
        if width != seen_width(name, cache[name].shape):
            rows.append((name, width, seen_width(name, cache[name].shape)))
    return rows


@pytest.fixture(scope="module")
def models():
    return {family: HookedVLM.from_hf(*make()) for family, make in TINY_MODELS.items()}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_every_declared_width_is_the_width_seen_in_a_run(models, family):
    model = models[family]
    cache = record_shapes(model, model.prepare_inputs(sample_image(), **default_text(model)))
    assert mismatches(model, cache) == []


@pytest.mark.parametrize("config", config_names())
def test_real_size_widths(config):
    model = HookedVLM.from_pretrained(f"config:{config}")
    widths = {name: model.hook_width(name) for name in model.hook_names()}
    assert all((width is None) == (name.rsplit(".", 1)[-1] in PATTERN_HOOKS) for name, width in widths.items()), (
        "every hook but scores and patterns has a width"
    )
    cache = meta_shapes(model) if model.adapter.example_inputs() is not None else None
    if cache is not None:
        assert mismatches(model, cache) == []
    if model.adapter.has_language_model:  # what the vision side hands on must have the LM's width
        lm = next(t for t in model.adapter.towers() if t.name == "lm")
        handed_on = [n for n in ("projector.hook_out", "projector.hook_packed", "lm.hook_embed") if n in widths]
        assert handed_on and {widths[n] for n in handed_on} == {lm.d_model}


def test_module_path_hooks_take_the_width_their_module_states(models):
    clip = models["clip"]
    config = clip.raw_model.config.vision_config
    assert clip.hook_width("hf.vision_model.encoder.layers.0.mlp.fc1.hook_out") == config.intermediate_size
    assert clip.hook_width("hf.vision_model.encoder.layers.0.mlp.fc2.hook_in") == config.intermediate_size
    # a module that states no width (an activation, a container) is checked on the first forward, naming the hook
    for unstated in ("hf.vision_model.encoder.layers.0.mlp.activation_fn.hook_out", "hf.vision_model.encoder.hook_out"):
        assert clip.hook_width(unstated) is None
    clip.add_sae(sae_at("hf.vision_model.encoder.layers.0.mlp.activation_fn.hook_out", 5))
    try:
        with pytest.raises(SAEShapeError, match="activation_fn.hook_out' has d_in=5, but the activations there"):
            clip(sample_image())
    finally:
        clip.reset_saes()
    assert clip.hook_width("vision.blocks.0.attn.hook_result") == config.num_attention_heads * config.hidden_size


@pytest.mark.parametrize(
    ("family", "hook"),
    [
        ("clip", "hook_image_embeds"),
        ("clip", "hook_text_embeds"),
        ("clip", "vision.hook_embed"),
        ("open_clip", "hook_image_embeds"),
        ("open_clip", "hook_text_embeds"),
        ("llava_onevision", "projector.hook_pre"),
        ("llava_onevision", "projector.hook_packed"),
        ("llava_onevision", "lm.hook_embed"),
        ("qwen2_vl", "projector.hook_merged"),
        ("qwen2_5_vl", "projector.hook_out"),
        ("clip", "hf.vision_model.encoder.layers.0.mlp.fc1.hook_out"),
    ],
)
def test_a_misfit_at_any_hook_is_refused_before_anything_changes(models, family, hook):
    model = models[family]
    width = model.hook_width(hook)
    kept = sae_at("vision.blocks.0.hook_resid_post", model.hook_width("vision.blocks.0.hook_resid_post"))
    model.add_sae(kept)
    try:
        before = dict(model.acts_to_saes)
        names = list(model.hook_dict)
        with pytest.raises(SAEShapeError) as error:
            model.add_sae(sae_at(hook, d_in=width + 32))
        assert str(error.value).count("\n") == 0
        assert f"{hook!r}" in str(error.value) and f"d_in={width + 32}" in str(error.value)
        assert f"width {width} " in str(error.value)
        assert model.acts_to_saes == before and list(model.hook_dict) == names
        fitting = sae_at(hook, d_in=width)  # the same hook takes an SAE of its width
        model.add_sae(fitting)
        assert model.acts_to_saes[hook] is fitting
    finally:
        model.reset_saes()


def test_a_misfit_does_not_replace_the_sae_already_there(models):
    clip = models["clip"]
    fitting = sae_at("hook_image_embeds", clip.hook_width("hook_image_embeds"))
    clip.add_sae(fitting)
    try:
        with pytest.raises(SAEShapeError, match="d_in=48, but 'hook_image_embeds' carries vectors of width 16"):
            clip.add_sae(sae_at("hook_image_embeds", 48))
        assert clip.acts_to_saes == {"hook_image_embeds": fitting}
    finally:
        clip.reset_saes()


def test_splicing_away_from_the_saes_own_hook_warns(models):
    clip = models["clip"]
    hook = "vision.blocks.0.hook_resid_post"
    d = clip.hook_width(hook)
    try:
        with pytest.warns(
            UserWarning, match="at 'vision.blocks.0.hook_resid_post', but its metadata says .*'vision.blocks.1"
        ):
            clip.add_sae(sae_at("vision.blocks.1.hook_resid_post", d), hook_name=hook)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same hook, by its canonical or its TransformerLens name: no warning
            clip.reset_saes()
            clip.add_sae(sae_at(hook, d), hook_name=hook)
            clip.reset_saes()
            clip.add_sae(sae_at("blocks.0.hook_resid_post", d), hook_name=hook)
    finally:
        clip.reset_saes()


def test_importing_hooked_vlm_and_wrapping_a_model_imports_no_sae_lens():
    code = (
        "import sys; from hooked_vlm import HookedVLM; from hooked_vlm.testing import tiny_clip; "
        "HookedVLM.from_hf(*tiny_clip()); print('sae_lens' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_qk_norm_outputs_are_per_head_queries_and_keys(models, family):
    """``attn.q_norm/k_norm.hook_normalized`` are ``[batch, pos, head, d_head]`` like hook_q / hook_k: ``heads=``
    slices the query heads, and an SAE there reads every head at once (heads flattened), as at hook_q."""
    model = models[family]
    lm = next(t for t in model.adapter.towers() if t.name == "lm")
    q, k = "lm.blocks.0.attn.q_norm.hook_normalized", "lm.blocks.0.attn.k_norm.hook_normalized"
    prepared = model.prepare_inputs(sample_image(), **default_text(model))
    _, whole = model.run_with_cache(prepared, names_filter=[q, k])
    _, one = model.run_with_cache(prepared, names_filter=[q, k], heads=[1])
    assert torch.equal(one[q], whole[q][:, :, 1:2])
    assert torch.equal(one[k], whole[k])  # key heads are kv heads: heads= counts query heads, as at hook_k
    assert model.hook_width(q) == lm.n_heads * lm.d_head and model.hook_width(k) == (lm.n_kv_heads or lm.n_heads) * lm.d_head
    with pytest.raises(SAEShapeError, match=f"d_in={lm.d_head}, but .* width {lm.n_heads * lm.d_head}"):
        model.add_sae(sae_at(q, lm.d_head))
    model.add_sae(sae_at(q, lm.n_heads * lm.d_head), use_error_term=True)
    try:
        _, spliced = model.run_with_cache(prepared, names_filter=q)
        torch.testing.assert_close(spliced[q], whole[q], atol=1e-5, rtol=1e-5)  # the error term restores the value
    finally:
        model.reset_saes()
