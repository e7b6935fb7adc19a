"""Splicing sae_lens SAEs into a HookedVLM, checked against hand-made edits.

References: the clean model's outputs and cache; the same splice done by hand with a plain hook that replaces
the activation by ``sae.decode(sae.encode(x))`` (plus ``x - recon`` for the error term); sae_lens's own
``encode``; PyTorch hook registrations (to prove an idle model runs the stock forward again).
"""

from __future__ import annotations

import threading

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_vlm import HookedVLM, UnknownHookError
from hooked_vlm.sae import SAEShapeError
from hooked_vlm.taps import ConcurrentRunError
from hooked_vlm.testing import sample_image, tiny_clip, tiny_llava_onevision

HOOK = "vision.blocks.0.hook_resid_post"
LM_HOOK = "lm.blocks.0.hook_resid_post"
PROMPT = "Describe the image."


def random_sae(d_in, hook, d_sae=64, k=None, seed=0, **config):
    """A random SAE whose reconstruction is clearly not the identity (so splicing without the error term shows)."""
    metadata = SAEMetadata(hook_name=hook)
    if k is None:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata, **config))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return sae


@pytest.fixture(scope="module")
def clip():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def llava():
    return HookedVLM.from_hf(*tiny_llava_onevision())


@pytest.fixture(scope="module")
def images():
    return [sample_image(seed=i) for i in range(3)]


def replace_with(sae, error_term=False, steer=None):
    """A hand-made splice: a plain hook that puts the SAE's reconstruction in place of the activation."""

    def hook(x, hook):
        features = sae.encode(x)
        recon = sae.decode(features)
        if steer is not None:
            recon = sae.decode(steer(features.clone()))
        return recon + (x - sae.decode(features) if error_term else 0)

    return hook


@torch.no_grad()
def test_error_term_keeps_outputs_and_the_cache_holds_the_features(clip, llava, images):
    for model, hook, kwargs in ((clip, HOOK, {}), (llava, LM_HOOK, {"prompt": PROMPT})):
        sae = random_sae(32, hook, k=8)
        clean, clean_cache = model.run_with_cache(images, names_filter=[hook], stop_early=False, **kwargs)
        model.add_sae(sae, use_error_term=True)
        try:
            names = [f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_error", hook]
            spliced, cache = model.run_with_cache(images, names_filter=names, stop_early=False, **kwargs)
        finally:
            model.reset_saes()
        assert (spliced - clean).abs().max() <= 1e-5
        assert torch.allclose(cache[f"{hook}.hook_sae_acts_post"], sae.encode(clean_cache[hook]), atol=1e-6)
        assert (cache[f"{hook}.hook_sae_error"]).abs().max() > 0.1  # the SAE is far from exact: the error term works
        assert torch.allclose(cache[hook], clean_cache[hook], atol=1e-5)  # the hook point shows what goes on


@torch.no_grad()
def test_without_error_term_the_output_changes_as_the_reconstruction_implies(clip, llava, images):
    for model, hook, kwargs in ((clip, HOOK, {}), (llava, LM_HOOK, {"prompt": PROMPT})):
        sae = random_sae(32, hook)
        clean = model(images, **kwargs)
        by_hand = model.run_with_hooks(images, fwd_hooks=[(hook, replace_with(sae))], **kwargs)
        spliced = model.run_with_saes(images, saes=[sae], **kwargs)
        assert (spliced - by_hand).abs().max() <= 1e-5
        assert (spliced - clean).abs().max() > 1e-2
        assert model.acts_to_saes == {}  # run_with_saes removed it again
        assert torch.equal(model(images, **kwargs), clean)


@torch.no_grad()
def test_steering_through_the_sae_hook_points(clip, images):
    sae = random_sae(32, HOOK, k=8)
    feature = 5

    def boost(features):
        features[..., feature] += 4.0
        return features

    by_hand = clip.run_with_hooks(images, fwd_hooks=[(HOOK, replace_with(sae, error_term=True, steer=boost))])
    steered = clip.run_with_hooks_with_saes(
        images,
        saes=[sae],
        use_error_term=True,
        fwd_hooks=[(clip.get_sae_hook_name(sae), lambda acts, hook: boost(acts))],
    )
    assert (steered - by_hand).abs().max() <= 1e-5
    assert (steered - clip(images)).abs().max() > 1e-2


@torch.no_grad()
def test_sae_positions_leave_other_positions_alone(clip, llava, images):
    sae = random_sae(32, HOOK)
    _, clean = clip.run_with_cache(images, names_filter=[HOOK])
    _, cache = clip.run_with_cache_with_saes(images, saes=[sae], sae_positions="patches", names_filter=[HOOK])
    assert torch.equal(cache[HOOK][:, 0], clean[HOOK][:, 0])  # CLS untouched
    assert torch.allclose(cache[HOOK][:, 1:], sae.decode(sae.encode(clean[HOOK][:, 1:])), atol=1e-6)
    lm_sae = random_sae(32, LM_HOOK)
    prepared = llava.prepare_inputs(images[:2], prompt=PROMPT)
    _, clean = llava.run_with_cache(prepared, names_filter=[LM_HOOK])
    _, cache = llava.run_with_cache_with_saes(prepared, saes=[lm_sae], sae_positions="image", names_filter=[LM_HOOK])
    image = prepared.layout.mask("image", LM_HOOK)
    assert torch.equal(cache[LM_HOOK][~image], clean[LM_HOOK][~image])
    assert torch.allclose(cache[LM_HOOK][image], lm_sae.decode(lm_sae.encode(clean[LM_HOOK][image])), atol=1e-6)
    # during generation the new tokens are text: an image-position SAE leaves them alone, an "all" SAE does not
    names = [LM_HOOK, f"{LM_HOOK}.hook_sae_input"]  # the value after the splice, and the SAE's input
    for positions, untouched in (("image", True), ("all", False)):
        with llava.saes([lm_sae], sae_positions=positions):
            steps = llava.generate(images[:1], prompt=PROMPT, max_new_tokens=2, do_sample=False, cache_names=names)
        after, before = (steps.step_cache[name][1] for name in names)  # step 1: the first generated token
        assert after.shape[1] == 1 and torch.equal(after, before) == untouched


@torch.no_grad()
def test_head_hooks_flatten_or_use_sae_lens_hook_z_reshaping(clip, images):
    for hook, reshape in (("vision.blocks.1.attn.hook_z", "hook_z"), ("vision.blocks.1.attn.hook_v", "none")):
        sae = random_sae(32, hook, reshape_activations=reshape)
        _, clean = clip.run_with_cache(images, names_filter=[hook])
        x = clean[hook]
        _, cache = clip.run_with_cache_with_saes(images, saes=[sae], names_filter=[hook, f"{hook}.hook_sae_acts_post"])
        sae_in = x if reshape == "hook_z" else x.flatten(-2)  # sae_lens flattens heads itself for hook_z SAEs
        assert torch.allclose(cache[f"{hook}.hook_sae_acts_post"], sae.encode(sae_in))
        assert torch.allclose(cache[hook], sae.decode(sae.encode(sae_in)).reshape(x.shape), atol=1e-6)
        with_error = clip.run_with_saes(images, saes=[sae], use_error_term=True)
        assert (with_error - clip(images)).abs().max() <= 1e-5


@torch.no_grad()
def test_a_float32_sae_in_a_bf16_model(images):
    model, processor = tiny_clip()
    bf16 = HookedVLM.from_hf(model.to(torch.bfloat16), processor)
    sae = random_sae(32, HOOK, k=8)
    clean = bf16(images)
    with_error = bf16.run_with_saes(images, saes=[sae], use_error_term=True)
    assert with_error.dtype == torch.bfloat16 and (with_error.float() - clean.float()).abs().max() <= 1e-2
    spliced = bf16.run_with_saes(images, saes=[sae])
    assert spliced.dtype == torch.bfloat16 and (spliced.float() - clean.float()).abs().max() > 1e-2


def test_misfits_raise_clear_errors(clip, llava, images):
    with pytest.raises(SAEShapeError, match="d_in=16.*width 32"):
        clip.add_sae(random_sae(16, HOOK))
    with pytest.raises(SAEShapeError, match="width 37"):  # the MLP hidden width of the tiny CLIP
        clip.add_sae(random_sae(32, "vision.blocks.0.mlp.hook_post"))
    with pytest.raises(UnknownHookError, match="Did you mean"):
        clip.add_sae(random_sae(32, "vision.blocks.0.hook_resid_pots"))
    with pytest.raises(ValueError, match="no cfg.metadata.hook_name"):
        clip.add_sae(random_sae(32, None))
    with pytest.raises(ValueError, match="attention scores and patterns"):
        clip.add_sae(random_sae(17, "vision.blocks.0.attn.hook_pattern"))
    assert clip.acts_to_saes == {}
    # hooks outside the blocks are checked up front too (the projector's output has the LM's width)
    with pytest.raises(SAEShapeError, match="'projector.hook_out': the SAE has d_in=16, but .* width 32"):
        llava.add_sae(random_sae(16, "projector.hook_out"))
    assert llava.acts_to_saes == {}


def test_splicing_waits_for_no_other_threads_run(clip, images):
    inside, release = threading.Event(), threading.Event()

    def blocking(x, hook):
        inside.set()
        assert release.wait(30)

    worker = threading.Thread(target=lambda: clip.run_with_hooks(images, fwd_hooks=[(HOOK, blocking)]))
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(ConcurrentRunError, match="another thread"):  # it would change the run in progress
            clip.add_sae(random_sae(32, HOOK))
        with pytest.raises(ConcurrentRunError, match="another thread"):
            clip.reset_saes()
    finally:
        release.set()
        worker.join()
    assert clip.acts_to_saes == {}


@torch.no_grad()
def test_reset_restores_the_stock_forward(clip, images, hook_registrations, hook_counts):
    clean = clip(images)
    first, second = random_sae(32, HOOK, seed=1), random_sae(32, HOOK, seed=2)
    clip.add_sae(first)
    assert clip.acts_to_saes == {HOOK: first}
    assert (
        f"{HOOK}.hook_sae_acts_post" in clip.hook_names()
        and clip.hook_point(f"{HOOK}.hook_sae_input") is first.hook_sae_input
    )
    with clip.saes([second]):
        assert clip.acts_to_saes == {HOOK: second}
    assert clip.acts_to_saes == {HOOK: first}  # what was spliced before comes back
    hook_registrations.calls.clear()
    clip(images)
    assert len(hook_registrations.calls) == 1  # the spliced hook point's tap, with no user hooks
    clip.reset_saes()
    assert clip.hook_names("*hook_sae*") == [] and first.hook_sae_acts_post.name == "hook_sae_acts_post"
    hook_registrations.calls.clear()
    assert torch.equal(clip(images), clean)
    assert hook_registrations.calls == []  # idle again: the stock forward
    assert sum(hook_counts(clip.raw_model).values()) == 0
    with pytest.raises(KeyError, match="no SAE is spliced"):
        clip.reset_saes(HOOK)


@torch.no_grad()
def test_early_stop_waits_for_sae_hooks_but_not_for_idle_splices(llava, images):
    calls = []
    handle = llava.raw_model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    vision_sae, lm_sae = random_sae(32, HOOK), random_sae(32, LM_HOOK)
    try:
        with llava.saes([vision_sae, lm_sae]):
            out, cache = llava.run_with_cache(images[:1], names_filter=[f"{HOOK}.hook_sae_acts_post"])
            assert out is None and cache[f"{HOOK}.hook_sae_acts_post"].shape[-1] == 64
            assert calls == []  # the LM's splice has no hooks: nothing waited for it
            llava.run_with_cache(images[:1], prompt=PROMPT, names_filter=[f"{LM_HOOK}.hook_sae_acts_post"])
            assert calls == [1]
    finally:
        handle.remove()


def test_a_saved_sae_loads_and_splices(clip, images, tmp_path):
    sae = random_sae(32, HOOK, k=8)
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        assert torch.equal(clip.run_with_saes(images, saes=[loaded]), clip.run_with_saes(images, saes=[sae]))


@torch.no_grad()
def test_splicing_at_a_module_path_hook_point(clip, images):
    name = "hf.vision_model.encoder.layers.0.hook_out"  # the escape hatch: the same boundary as HOOK
    sae = random_sae(32, name)
    by_hand = clip.run_with_hooks(images, fwd_hooks=[(HOOK, replace_with(sae))])
    clip.add_sae(sae)
    try:
        assert f"{name}.hook_sae_acts_post" in clip.hook_names("hf.*")
        assert (clip(images) - by_hand).abs().max() <= 1e-5
    finally:
        clip.reset_saes()
    assert clip.hook_names("hf.*") == [name]  # setup keeps module-path hook points made so far
