"""No silent wrong values in the core (issue 13): hook order on shared boundaries, image inputs, two threads on one
model, the dtype of what a hook returns, and arguments checked before the forward."""

from __future__ import annotations

import functools
import threading
from collections import defaultdict

import pytest
import torch

from hooked_vlm import HookedVLM, attention
from hooked_vlm.report import default_text
from hooked_vlm.taps import (
    ConcurrentRunError,
    HookDtypeError,
    HookShapeError,
    InputTap,
    OutputTap,
    ResidualSumTap,
    Run,
    install_taps,
    remove_all,
)
from hooked_vlm.testing import TINY_MODELS, config_names, meta_model, sample_image


@functools.cache
def tiny(family: str) -> HookedVLM:
    return HookedVLM.from_hf(*TINY_MODELS[family]())


def run_kwargs(family: str) -> dict:
    image = sample_image(64, 64, seed=3)
    # two-tower models get a caption too, so that the text tower's boundaries run; vision towers alone get none
    return {"inputs": image, **default_text(tiny(family), prompt="Describe it.", caption="a photo")}


def shared_boundaries(model: HookedVLM) -> dict[tuple[str, str], list[str]]:
    """Every group of hook names whose taps sit on one module boundary (a module's input or its output), each
    group in the model's forward order."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, hp in model.hook_dict.items():
        tap = hp.tap
        if isinstance(tap, (OutputTap, ResidualSumTap)):
            groups[(tap.module, "output")].append(name)
        elif isinstance(tap, InputTap):
            groups[(tap.module, "input")].append(name)
    return {key: names for key, names in groups.items() if len(names) > 1}


def firing_order(model: HookedVLM, module: str, boundary: str, names: list[str]) -> list[str]:
    """The order in which PyTorch will call the taps of ``names`` on ``module``: the order of its hook dict,
    each hook mapped back to the hook point its closure fires."""
    hps = [model.hook_dict[n] for n in names]
    handles = install_taps(model.raw_model, hps, Run(hps, stop_early=False))
    try:
        target = model.raw_model.get_submodule(module)
        hooks = target._forward_hooks if boundary == "output" else target._forward_pre_hooks
        order = []
        for hook in hooks.values():
            cells = dict(zip(hook.__code__.co_freevars, hook.__closure__ or (), strict=True))
            if "hp" in cells and cells["hp"].cell_contents in hps:
                order.append(cells["hp"].cell_contents.name)
        return order
    finally:
        remove_all(handles)


# ---- 1. hook order -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_every_shared_boundary_fires_in_forward_order_and_later_names_see_earlier_edits(family):
    model = tiny(family)
    groups = shared_boundaries(model)
    assert groups, "every family has hook names sharing a module boundary (hook_attn_out / hook_resid_mid)"
    kwargs = run_kwargs(family)
    for (module, boundary), names in groups.items():
        assert firing_order(model, module, boundary, names) == names, (module, boundary)
        for i, first in enumerate(names[:-1]):
            later = names[i + 1 :]
            _, clean = model.run_with_cache(**kwargs, names_filter=later)
            zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
            with model.hooks([(first, zero)]):
                _, edited = model.run_with_cache(**kwargs, names_filter=[first, *later])
            assert edited[first].abs().max() == 0  # the cache holds what the model used
            for name in later:
                tap = model.hook_dict[name].tap
                if tap == model.hook_dict[first].tap:  # one value under two names: the later carries the edit
                    assert edited[name].abs().max() == 0, (first, name)
                elif isinstance(tap, ResidualSumTap):  # resid_mid adds the (edited) branch output
                    assert not torch.equal(edited[name], clean[name]), (first, name)
                # else: another slice of one fused output (q and k of a qkv projection), independent of the edit


@pytest.mark.parametrize("name", config_names())
def test_shared_boundaries_of_real_size_configs_fire_in_forward_order(name):
    model = HookedVLM.from_hf(meta_model(name))
    groups = shared_boundaries(model)
    assert groups
    for (module, boundary), names in groups.items():
        assert firing_order(model, module, boundary, names) == names, (name, module, boundary)


def test_vision_out_sees_an_edit_of_the_last_block_on_the_vlms():
    for family in ("llava_onevision", "qwen2_vl"):
        model = tiny(family)
        last = model.adapter.towers()[0].n_layers - 1
        with model.hooks([(f"vision.blocks.{last}.hook_resid_post", lambda x, hook: torch.zeros_like(x))]):
            _, cache = model.run_with_cache(**run_kwargs(family), names_filter=["vision.hook_out", "projector.hook_out"])
        assert cache["vision.hook_out"].abs().max() == 0
        _, zeros_in = model.run_with_cache(**run_kwargs(family), names_filter="projector.hook_out")
        assert not torch.equal(cache["projector.hook_out"], zeros_in["projector.hook_out"])


def test_several_taps_on_one_module_fire_in_definition_order():
    # hook_attn_out (the attention output) and hook_resid_mid (block input + that output) are both forward hooks
    # of one attention module: an ablated attention must leave resid_mid equal to resid_pre
    model = tiny("clip")
    names = [f"vision.blocks.0.{leaf}" for leaf in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid")]
    image = sample_image(64, 64, seed=3)
    with model.hooks([(names[1], lambda x, hook: torch.zeros_like(x))]):
        _, cache = model.run_with_cache(image, names_filter=names)
    torch.testing.assert_close(cache[names[2]], cache[names[0]], rtol=0, atol=0)
    seen = []
    hooks = [(n, lambda x, hook: seen.append(hook.name)) for n in reversed(names)]
    model.run_with_hooks(image, fwd_hooks=hooks)
    assert seen == names


# ---- 4. what a hook returns ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("returned", "model_dtype"), [(torch.bfloat16, torch.float32), (torch.float64, torch.bfloat16)])
def test_a_hook_returning_another_dtype_is_an_error_naming_the_hook(returned, model_dtype):
    model = HookedVLM.from_hf(*TINY_MODELS["clip"]()).to(model_dtype)
    name = "vision.blocks.0.hook_resid_post"
    image = sample_image(64, 64, seed=3)
    with pytest.raises(HookDtypeError, match=rf"{name}.*dtype {returned}.*expected {model_dtype}"):
        model.run_with_hooks(image, fwd_hooks=[(name, lambda x, hook: x.to(returned))])
    assert issubclass(HookDtypeError, TypeError) and issubclass(HookDtypeError, HookShapeError)
    # the same dtype passes, and the model is clean afterwards
    model.run_with_hooks(image, fwd_hooks=[(name, lambda x, hook: x * 1)])
    assert model.current_inputs is None


def test_a_hook_returning_a_meta_tensor_is_an_error_naming_the_hook():
    model = tiny("clip")
    name = "vision.blocks.1.hook_mlp_out"
    with pytest.raises(HookDtypeError, match=rf"{name}.*meta device"):
        model.run_with_hooks(sample_image(64, 64), fwd_hooks=[(name, lambda x, hook: torch.empty_like(x, device="meta"))])


# ---- 3. two threads on one model -----------------------------------------------------------------------------------
def test_two_threads_never_get_a_wrong_or_empty_cache():
    model = HookedVLM.from_hf(*TINY_MODELS["clip"]())
    names = ["vision.blocks.1.hook_resid_post", "vision.blocks.0.attn.hook_pattern"]
    images = [sample_image(48, 40, seed=1), sample_image(64, 64, seed=9)]
    refs = [model.run_with_cache(x, names_filter=names)[1] for x in images]
    outcome = {"ok": 0, "wrong": 0, "refused": 0}

    def work(i):
        for _ in range(15):
            try:
                _, cache = model.run_with_cache(images[i], names_filter=names)
            except ConcurrentRunError as error:
                assert "own model" in str(error) and "batch" in str(error)
                outcome["refused"] += 1
                continue
            same = set(cache.keys()) == set(names) and all(torch.equal(cache[n], refs[i][n]) for n in names)
            outcome["ok" if same else "wrong"] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome["wrong"] == 0 and outcome["ok"] > 0, outcome
    assert model.current_inputs is None and not attention._captures
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.raw_model.modules())


def test_a_run_in_progress_refuses_other_threads_plain_forwards_raw_forwards_and_hooks():
    model = HookedVLM.from_hf(*TINY_MODELS["clip"]())
    image = sample_image(64, 64, seed=2)
    clean = model(image)
    inside, release = threading.Event(), threading.Event()

    def blocking_ablation(x, hook):
        inside.set()
        assert release.wait(30)
        return torch.zeros_like(x)

    name = "vision.blocks.0.hook_resid_post"
    worker = threading.Thread(target=lambda: model.run_with_hooks(image, fwd_hooks=[(name, blocking_ablation)]))
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(ConcurrentRunError, match="another thread"):
            model(image)  # would otherwise run the other thread's ablation
        with pytest.raises(ConcurrentRunError, match="another thread"):
            model.run_with_cache(image, names_filter=name)
        with pytest.raises(ConcurrentRunError, match="another thread"):
            model.add_hook(name, lambda x, hook: x)
        pixel_values = model.prepare_inputs(image).kwargs["pixel_values"]
        with pytest.raises(ConcurrentRunError, match=rf"{name}.*other than the one"):
            model.raw_model.get_image_features(pixel_values=pixel_values)
    finally:
        release.set()
        worker.join()
    assert model.current_inputs is None
    torch.testing.assert_close(model(image), clean, rtol=0, atol=0)


# ---- 5. arguments checked before the forward -----------------------------------------------------------------------
class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.raw_model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"names_filter": "vision.blocks.0.attn.hook_pattern", "heads": [99]}, ValueError, r"heads=.*indices 0\.\.3"),
        ({"names_filter": "vision.blocks.1.attn.hook_z", "heads": [-1]}, ValueError, r"heads=.*indices 0\.\.3"),
        ({"names_filter": "vision.blocks.0.attn.hook_pattern", "heads": []}, ValueError, r"heads=\[\] selects no head"),
        ({"names_filter": "vision.blocks.0.attn.hook_pattern", "heads": "0"}, TypeError, r"heads= takes"),
        ({"names_filter": "vision.blocks.0.hook_resid_post", "positions": [500]}, ValueError, r"outside.*length 17"),
        ({"names_filter": "vision.blocks.0.hook_resid_post", "positions": "text"}, ValueError, r"'text' matches no"),
        ({"names_filter": "vision.hook_out", "text": 123}, TypeError, r"text= takes a str.*got int"),
        ({"names_filter": "vision.hook_out", "text": []}, ValueError, r"text= takes.*empty list"),
        ({"names_filter": "vision.hook_out", "text": b"a cat"}, TypeError, r"text= .*bytes"),
    ],
)
def test_bad_arguments_raise_one_clear_line_before_the_forward(kwargs, error, match):
    model = tiny("clip")
    counter = ForwardCounter(model)
    try:
        with pytest.raises(error, match=match):
            model.run_with_cache(sample_image(64, 64), **kwargs)
    finally:
        counter.handle.remove()
    assert counter.calls == 0 and model.current_inputs is None


@pytest.mark.parametrize(("prompt", "error", "match"), [
    (123, TypeError, "prompt= takes a str.*got int"), (b"hello", TypeError, "prompt=.*bytes"),
    ([1], TypeError, "list holding int"), ([], ValueError, "prompt=.*empty list"),
])
def test_bad_prompts_of_the_vlms_raise_before_the_forward(prompt, error, match):
    model = tiny("qwen2_vl")
    counter = ForwardCounter(model)
    try:
        with pytest.raises(error, match=match):
            model(sample_image(64, 64), prompt=prompt)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


def test_valid_heads_and_positions_still_slice_the_cache():
    model = tiny("clip")
    name = "vision.blocks.0.attn.hook_pattern"
    _, full = model.run_with_cache(sample_image(64, 64), names_filter=name)
    _, some = model.run_with_cache(sample_image(64, 64), names_filter=name, heads=torch.tensor([3, 1]), positions=[0])
    torch.testing.assert_close(some[name], full[name][:, [3, 1]][:, :, [0]])
