"""Patching, attribution, ablation, knockout and the logit lens against hand-made references.

References are independent of the batched machinery under test: single edits done by hand with
``run_with_hooks``, PyTorch pre-hooks that hand an eager copy of the unwrapped model a hand-built attention mask,
finite differences in float64, and the final norm and unembedding written out by hand.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.lens import logit_lens
from hooked_vlm.patching import (
    ablation,
    ablation_hooks,
    activation_patching,
    attention_knockout,
    attribution_patching,
    integrated_gradients,
    knockout_hooks,
    mean_activation,
)
from hooked_vlm.readouts import ClipSimilarity, LogitDiff
from hooked_vlm.testing import TINY_MODELS, sample_image

PROMPT, SWAPPED = "Answer A or B.", "Answer B or A."  # the same number of tokens
TOL = dict(atol=2e-5, rtol=0)


def noisy(image, std, seed=0):
    """``image`` with Gaussian pixel noise: a corruption small enough for the first-order estimates to hold."""
    pixels = np.asarray(image).astype(float) + np.random.default_rng(seed).normal(0, std, np.asarray(image).shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


class Case:
    """A tiny model with a readout, a clean and a corrupted input, and the hooks to sweep."""

    def __init__(self, name):
        self.name = name
        self.model = HookedVLM.from_hf(*TINY_MODELS[name]())
        if "clip" in name:
            self.readout = ClipSimilarity.from_texts(self.model, ["a sunny sky", "a dark night"], 0)
            self.clean, self.corrupted = sample_image(seed=0), sample_image(seed=3)
            self.prompt, self.family, self.positions = None, "vision.blocks.*.hook_resid_post", "patches"
        else:
            size = (16, 16) if name == "llava_onevision" else (112, 112)
            self.readout = LogitDiff("A", "B", tokenizer=self.model)
            self.clean, self.corrupted = sample_image(*size, seed=0), sample_image(*size, seed=3)
            self.prompt, self.family, self.positions = PROMPT, "lm.blocks.*.hook_resid_post", "image"

    def prepare(self, image, prompt=None):
        prompt = prompt or self.prompt
        return self.model.prepare_inputs(image, prompt=prompt) if prompt else self.model.prepare_inputs(image)

    def value(self, output) -> float:
        """The readout of a run's output (CLIP image runs return the image embeddings)."""
        cache = {"hook_image_embeds": output} if "clip" in self.name else None
        return float(self.readout(output, cache).mean().detach())

    def hand_patch(self, base, source, hook, edit) -> float:
        """The readout of ``base`` with ``edit(tensor, source_value)`` applied at ``hook``, by ``run_with_hooks``."""
        with torch.no_grad():
            _, cache = self.model.run_with_cache(source, names_filter=hook)
            output = self.model.run_with_hooks(
                base, fwd_hooks=[(hook, lambda t, hook: edit(t.clone(), cache[hook.name]))]
            )
        return self.value(output)


@pytest.fixture(scope="module", params=["clip", "open_clip", "llava_onevision", "qwen2_vl"])
def case(request):
    return Case(request.param)


@pytest.fixture(scope="module")
def llava():
    return Case("llava_onevision")


@pytest.fixture(scope="module")
def qwen():
    return Case("qwen2_vl")


@pytest.fixture(scope="module")
def clip():
    return Case("clip")


def pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------------------------
# Activation patching: exactness.


def test_patching_clean_into_clean_changes_nothing(case):
    result = activation_patching(
        case.model,
        case.clean,
        case.clean,
        case.readout,
        case.family,
        positions=case.positions,
        prompt=case.prompt,
        progress=False,
    )
    assert result.axes == ("layer", "position") and result.values.shape[1] == len(result.labels["position"]) > 3
    torch.testing.assert_close(result.effect(), torch.zeros_like(result.values), **TOL)


def test_patching_every_position_of_a_layer_restores_the_clean_readout(case):
    denoised = activation_patching(
        case.model, case.clean, case.corrupted, case.readout, case.family, prompt=case.prompt, progress=False
    )
    assert denoised.axes == ("layer",) and abs(denoised.clean_value - denoised.corrupted_value) > 1e-4
    torch.testing.assert_close(denoised.values, torch.full_like(denoised.values, denoised.clean_value), **TOL)
    torch.testing.assert_close(denoised.normalized(), torch.ones_like(denoised.values), atol=1e-3, rtol=0)
    noised = activation_patching(
        case.model,
        case.clean,
        case.corrupted,
        case.readout,
        case.family,
        direction="noise",
        prompt=case.prompt,
        progress=False,
    )
    torch.testing.assert_close(noised.values, torch.full_like(noised.values, noised.corrupted_value), **TOL)


def cell_edit(index):
    def edit(tensor, source):
        tensor[index] = source[index]
        return tensor

    return edit


def test_single_position_patches_equal_hand_edits_on_clip(clip):
    base, source = clip.prepare(clip.corrupted), clip.prepare(clip.clean)
    result = activation_patching(
        clip.model,
        clip.clean,
        clip.corrupted,
        clip.readout,
        "vision.blocks.*.hook_resid_post",
        positions=[0, 3, 7, 12, 16],
        batch_size=3,
        progress=False,
    )
    for layer in (0, 1):
        for i, label in enumerate(result.labels["position"]):
            hand = clip.hand_patch(
                base, source, f"vision.blocks.{layer}.hook_resid_post", cell_edit((0, label.position))
            )
            assert float(result.values[layer, i]) == pytest.approx(hand, abs=2e-6)
    assert [label.kind for label in result.labels["position"]] == [Kind.CLS] + [Kind.PATCH] * 4
    assert (result.labels["position"][2].row, result.labels["position"][2].col) == (1, 2)  # patch 6 of a 4×4 grid


def test_image_token_patches_on_the_llava_grid_equal_hand_edits(llava):
    base, source = llava.prepare(llava.corrupted), llava.prepare(llava.clean)
    lm = base.layout["lm"]
    # image tokens of the high-res grid (tile 1), located from the layout's fields by hand
    cells = [(1, 0, 1), (1, 1, 0), (1, 1, 1), (0, 2, 3)]
    positions = [
        int(((lm.tile[0] == t) & (lm.row[0] == r) & (lm.col[0] == c) & (lm.kind[0] == Kind.IMAGE)).nonzero())
        for t, r, c in cells
    ]
    result = activation_patching(
        llava.model,
        llava.clean,
        llava.corrupted,
        llava.readout,
        "lm.blocks.*.hook_resid_pre",
        positions=positions,
        prompt=PROMPT,
        batch_size=3,
        progress=False,
    )
    for (tile, row, col), position in zip(cells, positions, strict=True):
        hand = llava.hand_patch(base, source, "lm.blocks.0.hook_resid_pre", cell_edit((0, position)))
        assert float(result.grid(image=0, tile=tile, what="values")[0, row, col]) == pytest.approx(hand, abs=2e-6)


def test_vision_tile_heads_and_pattern_patches_equal_hand_edits(llava):
    model, base, source = llava.model, llava.prepare(llava.corrupted), llava.prepare(llava.clean)
    # LLaVA-OneVision's vision rows are tiles: (tile, patch) cells, one at a time
    result = activation_patching(
        model,
        llava.clean,
        llava.corrupted,
        llava.readout,
        "vision.blocks.1.attn.hook_z",
        positions=lambda layout: layout["vision"].row == 1,
        heads=[0, 3],
        prompt=PROMPT,
        progress=False,
    )
    labels = result.labels["position"]
    assert len(labels) == base.layout["vision"].shape[0] * 4 and {label.tile for label in labels} == {0, 1}
    for i in (0, 5):
        label = labels[i]
        for j, head in enumerate(result.labels["head"]):
            hand = llava.hand_patch(
                base, source, "vision.blocks.1.attn.hook_z", cell_edit((label.batch, label.position, head))
            )
            assert float(result.values[0, i, j]) == pytest.approx(hand, abs=2e-6)
    pattern = activation_patching(
        model,
        llava.clean,
        llava.corrupted,
        llava.readout,
        "lm.blocks.1.attn.hook_pattern",
        positions=[-1, -3],
        heads="each",
        prompt=PROMPT,
        progress=False,
    )
    n = base.layout["lm"].shape[1]
    assert [label.position for label in pattern.labels["position"]] == [n - 3, n - 1]  # in sequence order
    for head in (0, 2):
        hand = llava.hand_patch(base, source, "lm.blocks.1.attn.hook_pattern", cell_edit((0, head, n - 3)))
        assert float(pattern.values[0, 0, head]) == pytest.approx(hand, abs=2e-6)


def test_packed_qwen2_vl_vision_patches_equal_hand_edits(qwen):
    base, source = qwen.prepare(qwen.corrupted), qwen.prepare(qwen.clean)
    result = activation_patching(
        qwen.model,
        qwen.clean,
        qwen.corrupted,
        qwen.readout,
        "vision.blocks.*.attn.hook_z",
        positions=[2, 7, 13],
        heads=[1, 2],
        prompt=PROMPT,
        batch_size=5,
        progress=False,
    )
    for layer in (0, 1):
        for i, position in enumerate((2, 7, 13)):
            for j, head in enumerate((1, 2)):
                hand = qwen.hand_patch(
                    base, source, f"vision.blocks.{layer}.attn.hook_z", cell_edit((0, position, head))
                )
                assert float(result.values[layer, i, j]) == pytest.approx(hand, abs=2e-6)


def test_groups_and_prompt_only_or_both_differences(llava):
    model = llava.model
    clean = llava.prepare(llava.clean)
    for corrupted in (llava.prepare(llava.clean, SWAPPED), llava.prepare(llava.corrupted, SWAPPED)):
        groups = {"image": ("image", "newline"), "text": "text"}
        result = activation_patching(
            model, clean, corrupted, llava.readout, "lm.blocks.*.hook_resid_post", groups=groups, progress=False
        )
        assert result.axes == ("layer", "group") and result.labels["group"] == ["image", "text"]
        for g, selector in enumerate(groups.values()):
            mask = torch.zeros(clean.layout["lm"].shape, dtype=torch.bool)
            for s in (selector,) if isinstance(selector, str) else selector:
                mask |= clean.layout.mask(s, "lm")
            hand = llava.hand_patch(corrupted, clean, "lm.blocks.0.hook_resid_post", cell_edit(mask))
            assert float(result.values[0, g]) == pytest.approx(hand, abs=2e-6)
        whole = activation_patching(
            model, clean, corrupted, llava.readout, "lm.blocks.0.hook_resid_post", progress=False
        )
        assert float(whole.values[0]) == pytest.approx(whole.clean_value, abs=2e-5)


@pytest.mark.parametrize(
    "name, family, positions",
    [
        ("llava_onevision", "lm.blocks.*.hook_resid_pre", "image"),
        ("qwen2_vl", "vision.blocks.*.hook_mlp_out", "patches"),  # packed: copies follow each other along the positions
    ],
)
def test_reusing_the_base_runs_early_blocks_changes_no_value(name, family, positions, llava, qwen, monkeypatch):
    case = llava if name == "llava_onevision" else qwen
    args = (case.model, case.clean, case.corrupted, case.readout, family)
    kwargs = dict(positions=positions, prompt=PROMPT, batch_size=8, progress=False)
    block = type(case.model.raw_model.get_submodule(case.model.hook_point(family.replace("*", "0")).tap.module))
    calls = []
    original = block.forward
    monkeypatch.setattr(block, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    recomputed = activation_patching(*args, reuse_prefix=False, **kwargs)
    n_recomputed, calls[:] = len(calls), []
    reused = activation_patching(*args, **kwargs)
    assert len(calls) < n_recomputed  # block 0 is not run again for the batches that patch only block 1
    torch.testing.assert_close(reused.values, recomputed.values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl"])
def test_patches_in_the_lm_reuse_the_base_runs_image_features(name, llava, qwen, monkeypatch):
    case = llava if name == "llava_onevision" else qwen
    path, method = case.model.adapter.image_features_method
    owner = type(case.model.raw_model.get_submodule(path))
    calls = []
    original = getattr(owner, method)
    monkeypatch.setattr(owner, method, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    args = (case.model, case.clean, case.corrupted, case.readout, "lm.blocks.*.hook_resid_post")
    kwargs = dict(positions="image", prompt=PROMPT, batch_size=4, progress=False)
    recomputed = activation_patching(*args, reuse_prefix=False, **kwargs)
    n_recomputed, calls[:] = len(calls), []
    reused = activation_patching(*args, **kwargs)
    assert len(calls) == 3 < n_recomputed  # clean and corrupted sources, then one base run for every batch
    torch.testing.assert_close(reused.values, recomputed.values, atol=1e-6, rtol=0)


def test_inputs_of_different_layouts_are_refused(llava):
    with pytest.raises(ValueError, match="same token layout"):
        activation_patching(
            llava.model,
            sample_image(16, 16),
            sample_image(32, 32),
            llava.readout,
            "lm.blocks.0.hook_resid_post",
            prompt=PROMPT,
            progress=False,
        )


# ---------------------------------------------------------------------------------------------------------------
# Attribution patching.


def test_attribution_agrees_with_activation_patching(case):
    corrupted = noisy(case.clean, 5)
    kwargs = dict(positions=case.positions, prompt=case.prompt, progress=False)
    exact = activation_patching(case.model, case.clean, corrupted, case.readout, case.family, **kwargs)
    estimate = attribution_patching(case.model, case.clean, corrupted, case.readout, case.family, **kwargs)
    assert estimate.axes == exact.axes and estimate.labels["position"] == exact.labels["position"]
    assert pearson(estimate.effect(), exact.effect()) >= 0.9
    z = "vision.blocks.*.attn.hook_z" if "clip" in case.name else "lm.blocks.*.attn.hook_z"
    kwargs["heads"] = "each"
    exact = activation_patching(case.model, case.clean, corrupted, case.readout, z, **kwargs)
    estimate = attribution_patching(case.model, case.clean, corrupted, case.readout, z, **kwargs)
    assert pearson(estimate.effect(), exact.effect()) >= 0.9


@pytest.mark.parametrize(
    "name, family, positions",
    [
        ("llava_onevision", "lm.blocks.*.hook_resid_post", "image"),
        ("qwen2_vl", "lm.blocks.*.hook_resid_post", "image"),
        ("qwen2_vl", "vision.blocks.*.hook_resid_post", "patches"),  # a packed sequence: copies along the positions
    ],
)
def test_integrated_gradients_move_closer_to_activation_patching(name, family, positions, llava, qwen):
    case = llava if name == "llava_onevision" else qwen
    args = (case.model, case.clean, case.corrupted, case.readout, family)
    kwargs = dict(prompt=case.prompt, progress=False)
    whole = activation_patching(*args, **kwargs).effect()
    cells = activation_patching(*args, positions=positions, **kwargs).effect()
    errors, cell_errors = [], []
    for steps in (None, 2, 16):
        errors.append(
            float((attribution_patching(*args, ig_steps=steps, batch_size=5, **kwargs).effect() - whole).abs().max())
        )
        estimate = attribution_patching(*args, positions=positions, ig_steps=steps, batch_size=5, **kwargs).effect()
        cell_errors.append(float((estimate - cells).abs().mean()))
    # a hook's attributions sum to the exact effect of patching all of it as the steps grow (completeness)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3 * float(whole.abs().max())
    assert cell_errors[2] < cell_errors[0]


def test_integrated_gradients_are_complete_where_first_order_attribution_is_not(clip):
    # every path from the pixels to the readout goes through vision.hook_embed: patching all of it is running the
    # clean image, so a complete attribution sums to readout(clean) - readout(corrupted), read off the two runs
    model, readout = clip.model, clip.readout
    with torch.no_grad():
        difference = clip.value(model(clip.clean)) - clip.value(model(clip.corrupted))
    args = (model, clip.clean, clip.corrupted, readout, "vision.hook_embed")
    integrated = integrated_gradients(*args, steps=16, progress=False)
    per_position = integrated_gradients(*args, steps=16, positions="all", progress=False)
    first_order = attribution_patching(*args, progress=False)
    ig_error = abs(float(integrated.effect().sum()) - difference)
    assert ig_error < 2e-3 * abs(difference)
    assert abs(float(per_position.effect().sum()) - difference) < 2e-3 * abs(difference)  # the sum over positions too
    assert abs(float(first_order.effect().sum()) - difference) > 20 * ig_error
    assert integrated.method == "integrated gradients" and first_order.method == "attribution patching"
    # the old keyword is the same computation
    assert torch.equal(attribution_patching(*args, ig_steps=16, progress=False).values, integrated.values)
    with pytest.raises(ValueError, match="steps must be a positive number"):
        integrated_gradients(*args, steps=0)


@pytest.mark.parametrize("name", ["clip", "llava_onevision"])
def test_integrated_gradients_through_the_inputs_are_complete_at_the_input(name, clip, llava):
    case = clip if name == "clip" else llava
    if name == "clip":  # the images differ: the interpolated point is the patch embedding
        hook, clean, corrupted = "vision.hook_embed", case.clean, case.corrupted
    else:  # the prompts differ: the interpolated point is the LM's token embedding outside the image
        hook, clean, corrupted = "lm.hook_embed", case.prepare(case.clean), case.prepare(case.clean, SWAPPED)
    args = (case.model, clean, corrupted, case.readout, hook)
    exact = activation_patching(*args, progress=False).effect()
    errors = [
        float(
            (attribution_patching(*args, ig_steps=steps, interpolate="inputs", progress=False).effect() - exact)
            .abs()
            .max()
        )
        for steps in (1, 4, 16)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3 * float(exact.abs().max())


def double(case):
    """The case's model in float64 (inputs follow the model's dtype), for finite differences."""
    twin = copy.copy(case)
    twin.model = HookedVLM.from_hf(copy.deepcopy(case.model.raw_model).double(), case.model.processor)
    return twin


@pytest.mark.parametrize(
    "name, hook, index",
    [
        ("qwen2_vl", "vision.blocks.0.hook_resid_post", (0, 9)),  # a packed vision sequence
        ("llava_onevision", "lm.blocks.0.attn.hook_z", (0, -1, 2)),
    ],
)
def test_attribution_is_the_directional_derivative(name, hook, index, llava, qwen):
    case = double(llava if name == "llava_onevision" else qwen)
    base, source = case.prepare(case.corrupted), case.prepare(case.clean)
    position, head = index[1], index[2] if len(index) > 2 else None
    estimate = attribution_patching(
        case.model,
        source,
        base,
        case.readout,
        hook,
        positions=[position],
        heads=None if head is None else [head],
        progress=False,
    )

    def scaled(eps):
        def edit(tensor, clean):
            tensor[index] += eps * (clean[index] - tensor[index])
            return tensor

        return case.hand_patch(base, source, hook, edit)

    # central differences; the models' RMSNorms compute in float32 even in a float64 model, so eps stays large
    eps = 1e-2
    derivative = (scaled(eps) - scaled(-eps)) / (2 * eps)
    assert float(estimate.effect().flatten()[0]) == pytest.approx(derivative, rel=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Ablation.


def test_zero_and_mean_ablation_equal_hand_edits(llava, clip):
    model, prepared = llava.model, llava.prepare(llava.clean)
    groups = {"base tile": lambda lay: (lay["lm"].kind == Kind.IMAGE) & (lay["lm"].tile == 0), "newlines": "newline"}
    result = ablation(model, llava.clean, llava.readout, "lm.hook_embed", groups=groups, prompt=PROMPT, progress=False)
    for g, selector in enumerate(groups.values()):
        mask = prepared.layout.mask(selector, "lm.hook_embed")
        hand = llava.hand_patch(
            prepared, prepared, "lm.hook_embed", lambda t, _, m=mask: t.masked_fill(m[..., None], 0)
        )
        assert float(result.values[0, g]) == pytest.approx(hand, abs=2e-6)

    prepared = clip.prepare(clip.clean)
    hook = "vision.blocks.0.hook_resid_post"
    result = ablation(clip.model, clip.clean, clip.readout, hook, positions="patches", value="mean", progress=False)

    def mean_edit(position):
        def edit(tensor, clean):
            tensor[0, position] = clean[0, 1:].mean(0)  # the mean over the 16 patches (not the CLS token)
            return tensor

        return edit

    for i in (0, 9):
        hand = clip.hand_patch(prepared, prepared, hook, mean_edit(result.labels["position"][i].position))
        assert float(result.values[0, i]) == pytest.approx(hand, abs=2e-6)
    hooks = ablation_hooks(clip.model, clip.clean, hook, positions=[4], value="mean", mean_over="patches")
    with torch.no_grad():
        output = clip.model.run_with_hooks(prepared, fwd_hooks=hooks)
    assert clip.value(output) == pytest.approx(float(result.values[0, 3]), abs=2e-6)  # patch 4 is the 4th patch


def test_mean_activation_is_the_mean_over_images_and_positions(clip):
    images = [sample_image(seed=s) for s in range(3)]
    pixels = clip.model.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = clip.model.raw_model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    mean = mean_activation(clip.model, images, "vision.blocks.0.hook_resid_post", positions="patches")
    torch.testing.assert_close(mean, hidden[:, 1:].mean((0, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Attention knockout.


def eager_with_blocked_attention(case, prepared, blocked, layers):
    """The readout of an eager copy of the unwrapped model whose attention mask, in ``layers``, also masks the
    ``blocked`` [batch, query, key] pairs: the 4-D additive mask is rebuilt by hand in a pre-hook."""
    raw = copy.deepcopy(case.model.raw_model)
    raw.set_attn_implementation("eager")

    def mask_hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.where(blocked[:, None], torch.finfo(mask.dtype).min, mask)
        return args, kwargs

    handles = [
        raw.model.language_model.layers[i].self_attn.register_forward_pre_hook(mask_hook, with_kwargs=True)
        for i in layers
    ]
    with torch.no_grad():
        logits = raw(**prepared.kwargs).logits
    for handle in handles:
        handle.remove()
    return case.value(logits)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl"])
def test_knockout_equals_a_hand_built_attention_mask(name, llava, qwen):
    case = llava if name == "llava_onevision" else qwen
    prepared = case.prepare(case.clean)
    kind = prepared.layout["lm"].kind[0]
    image = (kind == Kind.IMAGE) | (kind == Kind.NEWLINE)
    source = ("image", "newline") if name == "llava_onevision" else "image"  # Qwen2-VL has no newline tokens
    for layers, target in (([1], -1), ([0, 1], "text")):
        queries = torch.zeros_like(image)
        if target == -1:
            queries[-1] = True
        else:
            queries = kind == Kind.TEXT
        blocked = (queries[:, None] & image[None, :])[None]
        hooks = knockout_hooks(case.model, prepared, source=source, target=target, layers=layers)
        with torch.no_grad():
            ours = case.value(case.model.run_with_hooks(prepared, fwd_hooks=hooks))
        assert ours == pytest.approx(eager_with_blocked_attention(case, prepared, blocked, layers), abs=2e-5)
        assert ours != pytest.approx(case.value(case.model(prepared)), abs=1e-6)  # the knockout does something

    sweep = attention_knockout(
        case.model, prepared, case.readout, source=source, window=2, batch_size=1 + (name == "qwen2_vl"), progress=False
    )
    assert sweep.windows == [[0, 1], [1]]
    for value, window in zip(sweep.values.tolist(), sweep.windows, strict=True):
        hooks = knockout_hooks(case.model, prepared, source=source, layers=window)
        with torch.no_grad():
            assert value == pytest.approx(case.value(case.model.run_with_hooks(prepared, fwd_hooks=hooks)), abs=2e-6)
    with pytest.raises(ValueError, match="blocks every key"):
        hooks = knockout_hooks(case.model, prepared, source="all", target=[0], layers=[0])
        case.model.run_with_hooks(prepared, fwd_hooks=hooks)


# ---------------------------------------------------------------------------------------------------------------
# Logit lens.


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl"])
def test_logit_lens_is_the_unembedded_final_norm_residual(name, llava, qwen):
    case = llava if name == "llava_onevision" else qwen
    model, prepared = case.model, case.prepare(case.clean)
    lens = logit_lens(model, prepared, words=["A", "B"], k=3)
    raw = model.raw_model
    norm, unembed = raw.model.language_model.norm, raw.lm_head.weight
    image = prepared.layout["lm"].kind[0] == Kind.IMAGE
    assert [label.position for label in lens.positions] == image.nonzero()[:, 0].tolist()
    with torch.no_grad():
        hidden = raw(**prepared.kwargs, output_hidden_states=True)
    a, b = (model.processor.tokenizer.convert_tokens_to_ids(w) for w in "AB")
    for i, layer in enumerate(lens.layers):
        x = hidden.hidden_states[layer + 1][0, image] if layer + 1 < len(lens.layers) else None
        if x is None:  # HF's last hidden state is already normed: take the block output from our cache instead
            _, cache = model.run_with_cache(prepared, names_filter=f"lm.blocks.{layer}.hook_resid_post")
            x = cache[f"lm.blocks.{layer}.hook_resid_post"][0, image]
            # the last block's lens is the model's own next-token distribution at those positions
            torch.testing.assert_close(lens.word_probs[i, :, 0], hidden.logits[0, image].softmax(-1)[:, a], **TOL)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        probs = (normed @ unembed.T).softmax(-1)
        top = probs.topk(3)
        torch.testing.assert_close(lens.top_probs[i], top.values, **TOL)
        assert torch.equal(lens.top_ids[i], top.indices)
        torch.testing.assert_close(lens.word_probs[i], probs[:, [a, b]], **TOL)
    grid = lens.grid("A", image=0, tile=0)
    lm = prepared.layout["lm"]
    position = int(((lm.tile[0] == 0) & (lm.row[0] == 1) & (lm.col[0] == 0) & image).nonzero())
    i = [label.position for label in lens.positions].index(position)
    assert float(grid[1, 1, 0]) == float(lens.word_probs[1, i, 0])


# ---------------------------------------------------------------------------------------------------------------
# Figures.


def test_every_figure_is_written(llava, tmp_path):
    model, readout = llava.model, llava.readout
    args = (model, llava.clean, llava.corrupted, readout)
    image = llava.clean
    figures = {
        "layer_position.png": activation_patching(
            *args, "lm.blocks.*.hook_resid_post", positions="all", prompt=PROMPT, progress=False
        ),
        "heads.png": attribution_patching(
            *args, "lm.blocks.*.attn.hook_z", heads="each", prompt=PROMPT, progress=False
        ),
        "layers.png": activation_patching(*args, "lm.blocks.*.hook_mlp_out", prompt=PROMPT, progress=False),
    }
    for file, result in figures.items():
        result.plot(tmp_path / file)
    over_image = attribution_patching(
        *args, "lm.blocks.*.hook_resid_pre", positions="image", prompt=PROMPT, progress=False
    )
    over_image.plot(tmp_path / "over_image.png", image, tile=1)
    with pytest.raises(ValueError, match="select"):
        attribution_patching(
            *args, "lm.blocks.*.attn.hook_z", positions=[-1, -2], heads="each", prompt=PROMPT, progress=False
        ).plot(tmp_path / "three_axes.png")
    attention_knockout(model, image, readout, prompt=PROMPT, progress=False).plot(tmp_path / "knockout.png")
    lens = logit_lens(model, image, prompt=PROMPT, words=["A"])
    lens.plot(tmp_path / "lens.png", image, "A", tile=1)
    lens.plot_top_tokens(tmp_path / "lens_top.png", image, layer=1, tile=1)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted([*figures, "over_image.png", "knockout.png", "lens.png", "lens_top.png"])
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)
