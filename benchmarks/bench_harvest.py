"""Harvesting CLIP ViT-L/14 layer 22 at real size (random weights, bf16): eager early stop and compiled harvest.

    python benchmarks/bench_harvest.py [--batch 256] [--layer 22] [--rounds 10]
    python benchmarks/bench_harvest.py --batch 2 --device cpu --layers 2  # smoke

Rows: the raw HF sdpa forward (whole model, the baseline every harvest is held against); the raw forward
truncated by hand to the hooked layer (the floor for an eager harvest); ``run_with_cache`` of the layer's residual
with early stop; :class:`hooked_vlm.compiled.CompiledHarvest` (torch.compile, max-autotune without CUDA graphs)
of the same hook, with PyTorch's attention kernel and with cuDNN attention first; and, for reference, the raw
forward with cuDNN attention first. Activations of the compiled harvests are compared with the eager ones (bf16).
The peer row, ``nnsight_save_early_stop``, is what an nnsight user writes to harvest: a trace of
``get_image_features`` on an ``NNsight`` wrapper around a deep copy of the raw model (nnsight instruments the module
it is given for good, so the raw rows keep the untouched model), ``encoder.layers[layer].output.save()`` then
``tracer.stop()``; each hooked row's note (and the JSON's ``peer_ratios``) gives hooked median ÷ its median.

``--device cpu --layers N`` is a smoke run (N blocks per tower, fp32, one call per variant, nothing saved; the layer
defaults to N - 2): it checks that every variant runs (the compiled ones compile for the CPU), not how fast.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clip import HF_NAME, build_clip  # noqa: E402
from harness import add_peer_ratios, environment, markdown, max_diff, run_once, save, time_variants, versions  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.compiled import CompiledHarvest  # noqa: E402

# hooked row → the peer rows doing the same task (hooked median ÷ peer median goes into the hooked row's note)
PEER_ROWS = {
    "hooked_run_with_cache_early_stop": ["nnsight_save_early_stop"],
    "compiled_harvest": ["nnsight_save_early_stop"],
    "compiled_harvest_cudnn_attention": ["nnsight_save_early_stop"],
}


def nnsight_harvest(raw, layer: int, x: torch.Tensor):
    """What an nnsight user writes to harvest one layer: save its output, stop the forward there."""
    from nnsight import NNsight

    wrapped = NNsight(copy.deepcopy(raw))
    target = wrapped.vision_model.encoder.layers[layer]

    def harvest():
        with wrapped.trace(pixel_values=x, fn="get_image_features") as tracer:
            saved = target.output.save()
            tracer.stop()
        return saved

    return harvest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layer", type=int, default=None, help="default: 22 (smoke: --layers - 2)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run (see above)")
    parser.add_argument("--layers", type=int, default=None, help="blocks per tower (smoke runs); default: the config's")
    args = parser.parse_args()
    smoke = args.device == "cpu"
    if args.layer is None:
        args.layer = 22 if args.layers is None else max(args.layers - 2, 0)
    device, dtype = args.device, (torch.float32 if smoke else torch.bfloat16)
    env = environment() | versions("nnsight")
    raw = build_clip(HF_NAME, device, dtype, args.layers)
    model = HookedVLM.from_hf(raw)
    size = raw.config.vision_config.image_size
    x = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
    name = f"vision.blocks.{args.layer}.hook_resid_post"
    layers = raw.vision_model.encoder.layers

    def truncated_raw():
        raw.vision_model.encoder.layers = nn.ModuleList(list(layers)[: args.layer + 1])
        try:
            return raw.vision_model(pixel_values=x).last_hidden_state
        finally:
            raw.vision_model.encoder.layers = layers

    cudnn_first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]

    def raw_cudnn_first():
        with sdpa_kernel(cudnn_first, set_priority=True):
            return raw.get_image_features(pixel_values=x)

    parity = {}
    with torch.no_grad():
        eager = model.run_with_cache(x, names_filter=name)[1][name]
        parity["max |activation|"] = eager.abs().max().item()
        # each harvest truncates and taps the model it wraps while it is open: give each its own copy, so that the
        # raw and eager rows run the whole, untapped model
        harvests = {
            "compiled_harvest": CompiledHarvest(HookedVLM.from_hf(copy.deepcopy(raw)), [name],
                                                compile_kwargs={"mode": args.mode}),
            "compiled_harvest_cudnn_attention": CompiledHarvest(HookedVLM.from_hf(copy.deepcopy(raw)), [name],
                                                                compile_kwargs={"mode": args.mode},
                                                                attention_backends=cudnn_first),
        }
        with contextlib.ExitStack() as stack:
            for label, harvest in harvests.items():
                stack.enter_context(harvest)
                start = time.perf_counter()
                compiled = harvest(x)[name]
                if not smoke:
                    torch.cuda.synchronize()
                difference = (compiled.float() - eager.float()).abs()
                parity[label] = {"max |Δ| vs eager": difference.max().item(),
                                 "mean |Δ| vs eager": difference.mean().item(),
                                 "first call incl. compile (s)": round(time.perf_counter() - start, 1)}
            peers = {}
            if "nnsight" in env:  # the peer row where nnsight is installed
                peers["nnsight_save_early_stop"] = nnsight_harvest(raw, args.layer, x)
                parity["nnsight_save_early_stop"] = {"max |Δ| vs eager": max_diff(peers["nnsight_save_early_stop"](), eager)}
            variants = {
                "hf_raw_full_forward": lambda: raw.get_image_features(pixel_values=x),
                "hf_raw_full_forward_cudnn_attention": raw_cudnn_first,
                "hf_raw_truncated_by_hand": truncated_raw,
                "hooked_run_with_cache_early_stop": lambda: model.run_with_cache(x, names_filter=name),
                **{label: (lambda harvest=harvest: harvest(x)) for label, harvest in harvests.items()},
                **peers,
            }
            rows = (time_variants if not smoke else run_once)(
                variants, {k: "hf_raw_full_forward" for k in variants if k != "hf_raw_full_forward"}, rounds=args.rounds
            )
            blocks = {label: len(h.model.raw_model.vision_model.encoder.layers) for label, h in harvests.items()}
    assert len(layers) == len(raw.vision_model.encoder.layers) and set(blocks.values()) == {args.layer + 1}, blocks
    for row in rows:
        row.note = f"{args.batch / row.median_ms * 1000:.0f} images/s"
    ratios = add_peer_ratios(rows, PEER_ROWS)
    if not smoke:
        save(f"harvest_clip_l{args.layer}_b{args.batch}",
             {"env": env, "rows": rows, "parity": parity, "peer_ratios": ratios})
    mode = f"CPU SMOKE (fp32, {args.layers or 'all'} blocks per tower; not a measurement)" if smoke else "bf16"
    with_ = f", with nnsight {env['nnsight']}" if "nnsight" in env else ""
    print(markdown(f"CLIP ViT-L/14 harvest of {name}, batch {args.batch}, {mode}{with_} ({env['card']})", rows,
                   f"parity: {parity}"))


if __name__ == "__main__":
    main()
