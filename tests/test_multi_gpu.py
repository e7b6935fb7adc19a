"""LLaVA-OneVision-7B and Qwen2-VL-7B at real size, spread over several GPUs by accelerate, against one GPU.

Skipped unless two CUDA devices are visible; on a lent multi-GPU machine:
``bash benchmarks/on_device.sh python3 -m pytest -q tests/test_multi_gpu.py`` (about a minute on two H100s).

Each model is built once with random weights in bf16 on ``cuda:0`` (it fits one GPU), and every result below is
computed there: logits, cached activations of every tower (on their own devices, gathered on ``cuda:0``, and
on the CPU), an early stop, steering, a patch from a CPU cache through a plain hook, an SAE spliced on
another GPU than its hook, ablation and attention knockout, an activation-patching sweep and a steered
generation. Then accelerate spreads the same weights, first ``"balanced"`` (as ``from_pretrained(device_map=
"auto")`` does), then alternating GPUs at every block and projector stage (every boundary a device boundary),
and the same results must agree to bf16 resolution.
"""

from __future__ import annotations

import gc

import pytest
import torch
from accelerate.hooks import remove_hook_from_module

from hooked_vlm import HookedVLM
from hooked_vlm.patching import ablation_hooks, activation_patching, knockout_hooks
from hooked_vlm.readouts import LogitDiff
from hooked_vlm.steering import SteeringVector, steer
from hooked_vlm.testing import alternating_device_map, build, dispatch, real_size_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices"),
]

CONFIGS = {"llava": "llava-hf/llava-onevision-qwen2-7b-ov-hf", "qwen": "Qwen/Qwen2-VL-7B-Instruct"}
#: bf16 keeps 8 significant bits; a result differing by more than 2⁻⁶ of its largest magnitude is not rounding
TOLERANCE = 2**-6


def results(model: HookedVLM, clean: dict, corrupted: dict, main: str = "cuda:0") -> dict[str, torch.Tensor]:
    """Everything compared between placements, computed the same way whatever the placement; caches are gathered
    on ``main`` and SAEs put there."""
    vision, lm = model.adapter.towers()
    mid, last = lm.n_layers // 2, lm.n_layers - 1
    cached = ["vision.blocks.*.hook_resid_post", "projector.hook_out", "lm.hook_embed", "lm.blocks.*.hook_resid_pre",
              "lm.blocks.*.hook_resid_mid", "lm.blocks.*.hook_resid_post", f"lm.blocks.{mid}.attn.hook_pattern",
              f"lm.blocks.{mid}.attn.hook_z", "lm.ln_final.hook_normalized"]
    out: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    vectors = [
        SteeringVector.from_tensor(f"vision.blocks.{vision.n_layers // 2}.hook_resid_pre",
                                   torch.randn(vision.d_model, generator=generator)),
        SteeringVector.from_tensor(f"lm.blocks.{mid}.hook_resid_mid", torch.randn(lm.d_model, generator=generator),
                                   scale=4.0, positions="image"),
        SteeringVector.from_tensor(f"lm.blocks.{last}.hook_resid_pre", torch.randn(lm.d_model, generator=generator)),
    ]
    readout = LogitDiff(10, 20)
    with torch.no_grad():
        out["logits"] = model(clean)
        _, cache = model.run_with_cache(clean, names_filter=cached, stop_early=False)  # each on its own device
        out |= {f"cache {name}": cache[name] for name in cache.keys()}
        _, gathered = model.run_with_cache(clean, names_filter="lm.blocks.*.hook_resid_post", device=main)
        assert {t.device for t in gathered.values()} == {torch.device(main)}
        out["stacked on one device"] = gathered.stack("lm.blocks.*.hook_resid_post")
        _, on_cpu = model.run_with_cache(corrupted, names_filter="lm.blocks.*.hook_resid_post", device="cpu")
        assert {t.device.type for t in on_cpu.values()} == {"cpu"}
        out["cache on cpu"] = torch.stack([on_cpu[name] for name in on_cpu.keys()])
        stopped, early = model.run_with_cache(clean, names_filter="projector.hook_out")
        assert stopped is None
        out["early stop"] = early["projector.hook_out"]
        with steer(model, vectors):
            out["steered"] = model(clean)[:, -8:]
        # a plain hook returning a CPU tensor: the corrupted run's residuals patched into the clean run
        from_cpu = [(f"lm.blocks.{k}.hook_resid_post", lambda t, hook: on_cpu[hook.name]) for k in (0, mid)]
        out["patched from cpu"] = model.run_with_hooks(clean, fwd_hooks=from_cpu)[:, -8:]
        edits = [*ablation_hooks(model, clean, f"lm.blocks.{mid}.hook_mlp_out"),
                 *knockout_hooks(model, clean, source="image", target=-1, layers=[mid, last])]
        out["ablation and knockout"] = model.run_with_hooks(clean, fwd_hooks=edits)[:, -8:]
        sae = random_sae(f"lm.blocks.{last}.hook_resid_mid", lm.d_model, main)
        out["sae spliced"] = model.run_with_saes(clean, saes=[sae])[:, -8:]
    hooks = [f"lm.blocks.{k}.hook_resid_post" for k in (0, mid - 1, mid, last)] + ["projector.hook_out"]
    sweep = activation_patching(model, clean, corrupted, readout, hooks[:4], positions=[-2, -1], batch_size=3,
                                progress=False)
    out["activation patching"] = sweep.values
    out["projector patching"] = activation_patching(model, clean, corrupted, readout, hooks[4:], progress=False).values
    with torch.no_grad(), steer(model, vectors):
        out["generated"] = model.generate(clean, max_new_tokens=4, do_sample=False).new_tokens
    return out


def random_sae(hook_name: str, d_in: int, device: str):
    """A float32 SAE on ``device`` (the hook may sit on another GPU: the splice moves activations to it and back)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=512, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    return sae.to(device)


@pytest.fixture(scope="module", params=list(CONFIGS))
def single_gpu(request):
    """``(raw model, clean, corrupted, results on one GPU)``; the model is freed afterwards."""
    raw = build(CONFIGS[request.param], device="cuda:0", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    clean, corrupted = real_size_inputs(model, seed=0), real_size_inputs(model, seed=0, image_seed=1)
    expected = results(model, clean, corrupted)
    yield raw, clean, corrupted, expected
    del raw, model, expected
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("placement", ["balanced", "alternating"])
def test_spread_over_gpus_equals_one_gpu(single_gpu, placement):
    raw, clean, corrupted, expected = single_gpu
    remove_hook_from_module(raw, recurse=True)  # the previous placement's hooks (weights stay where they are)
    gpus = list(range(torch.cuda.device_count()))
    dispatch(raw, "balanced" if placement == "balanced" else alternating_device_map(raw, gpus))
    used = {p.device for p in raw.parameters()}
    assert len(set(raw.hf_device_map.values())) >= 2 and len(used) >= 2 and all(d.type == "cuda" for d in used)

    actual = results(HookedVLM.from_hf(raw), clean, corrupted)
    assert actual.keys() == expected.keys()
    exact = torch.equal(actual["logits"].to(expected["logits"].device), expected["logits"])
    for what, value in expected.items():
        if what == "generated":
            # greedy decoding flips on near-ties, so tokens must match only where the logits agree exactly (as
            # they do when every kernel runs with the same shapes on the same kind of GPU)
            assert actual[what].shape == value.shape
            if exact:
                assert torch.equal(actual[what].to(value.device), value)
            continue
        got = actual[what].to(value.device).float()
        delta = (got - value.float()).abs().max().item()
        scale = value.float().abs().max().item()
        assert delta <= TOLERANCE * scale, f"{what}: max |Δ| = {delta:.3g}, largest value {scale:.3g}"
