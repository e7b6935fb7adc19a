"""Single-GPU behaviour that the CPU suite cannot reach: caches offloaded to pinned host memory, CUDA parity.

Skipped without CUDA (see conftest.py); run on a GPU machine with ``python -m pytest -q -m gpu``.
"""

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.testing import TINY_MODELS, sample_image

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def llava():
    raw, processor = TINY_MODELS["llava_onevision"]()
    return HookedVLM.from_hf(raw.to("cuda"), processor)


def test_cpu_cache_is_pinned_and_equals_the_gpu_cache(llava):
    names = "lm.blocks.*.hook_resid_post"
    inputs = {"inputs": sample_image(), "prompt": "Describe the image."}
    _, on_gpu = llava.run_with_cache(**inputs, names_filter=names)
    _, on_host = llava.run_with_cache(**inputs, names_filter=names, device="cpu")
    _, sliced = llava.run_with_cache(**inputs, names_filter=names, device="cpu", dtype=torch.bfloat16,
                                     positions="image")
    assert on_gpu.keys() == on_host.keys() == sliced.keys()
    for name in on_gpu.keys():
        assert on_host[name].device.type == "cpu" and on_host[name].is_pinned()
        torch.testing.assert_close(on_host[name], on_gpu[name].cpu(), rtol=0, atol=0)
        image = on_gpu.layout.mask("image", name)
        expected = on_gpu[name][image.to("cuda")].to(torch.bfloat16).cpu()
        torch.testing.assert_close(sliced[name].flatten(0, 1), expected, rtol=0, atol=0)


def test_cached_residuals_equal_hidden_states_on_cuda(llava):
    prepared = llava.prepare_inputs(sample_image(), prompt="Describe the image.")
    with torch.no_grad():
        reference = llava.raw_model(**prepared.kwargs, output_hidden_states=True).hidden_states
        _, cache = llava.run_with_cache(prepared, names_filter="lm.blocks.*.hook_resid_post", device="cpu")
    n_layers = len(reference) - 1
    for layer in range(n_layers - 1):  # the last hidden state is after the final norm
        torch.testing.assert_close(cache[f"lm.blocks.{layer}.hook_resid_post"], reference[layer + 1].cpu())


def test_generation_step_cache_offloads_to_cpu(llava):
    generation = llava.generate(sample_image(), prompt="Describe the image.", max_new_tokens=3, do_sample=False,
                                cache_names="lm.blocks.0.hook_resid_post", cache_device="cpu")
    steps = generation.step_cache["lm.blocks.0.hook_resid_post"]
    assert len(steps) == 3 and all(step.device.type == "cpu" and step.is_pinned() for step in steps)


def test_cache_stays_on_the_model_device_by_default():
    raw, processor = TINY_MODELS["clip"]()
    model = HookedVLM.from_hf(raw.to("cuda"), processor)
    _, cache = model.run_with_cache(sample_image(), names_filter="vision.blocks.0.hook_resid_post")
    assert cache["vision.blocks.0.hook_resid_post"].is_cuda
