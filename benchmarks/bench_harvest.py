"""Harvesting CLIP ViT-L/14 layer 22 at real size (random weights, bf16): eager early stop and compiled harvest.

    python benchmarks/bench_harvest.py [--batch 256] [--layer 22] [--rounds 10]

Rows: the raw HF sdpa forward (whole model, the baseline every harvest is held against); the raw forward
truncated by hand to the hooked layer (the floor for an eager harvest); ``run_with_cache`` of the layer's residual
with early stop; :class:`hooked_vlm.compiled.CompiledHarvest` (torch.compile, max-autotune without CUDA graphs)
of the same hook, with PyTorch's attention kernel and with cuDNN attention first; and, for reference, the raw
forward with cuDNN attention first. Activations of the compiled harvests are compared with the eager ones (bf16).
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
from harness import environment, markdown, save, time_variants  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.compiled import CompiledHarvest  # noqa: E402
from hooked_vlm.testing import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mode", default="max-autotune-no-cudagraphs")
    args = parser.parse_args()
    env = environment()
    raw = build("openai/clip-vit-large-patch14", device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
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
                torch.cuda.synchronize()
                difference = (compiled.float() - eager.float()).abs()
                parity[label] = {"max |Δ| vs eager": difference.max().item(),
                                 "mean |Δ| vs eager": difference.mean().item(),
                                 "first call incl. compile (s)": round(time.perf_counter() - start, 1)}
            variants = {
                "hf_raw_full_forward": lambda: raw.get_image_features(pixel_values=x),
                "hf_raw_full_forward_cudnn_attention": raw_cudnn_first,
                "hf_raw_truncated_by_hand": truncated_raw,
                "hooked_run_with_cache_early_stop": lambda: model.run_with_cache(x, names_filter=name),
                **{label: (lambda harvest=harvest: harvest(x)) for label, harvest in harvests.items()},
            }
            rows = time_variants(variants, {k: "hf_raw_full_forward" for k in variants if k != "hf_raw_full_forward"},
                                 rounds=args.rounds)
            blocks = {label: len(h.model.raw_model.vision_model.encoder.layers) for label, h in harvests.items()}
    assert len(layers) == len(raw.vision_model.encoder.layers) and set(blocks.values()) == {args.layer + 1}, blocks
    for row in rows:
        row.note = f"{args.batch / row.median_ms * 1000:.0f} images/s"
    save(f"harvest_clip_l{args.layer}_b{args.batch}", {"env": env, "rows": rows, "parity": parity})
    print(markdown(f"CLIP ViT-L/14 harvest of {name}, batch {args.batch}, bf16 ({env['card']})", rows, f"parity: {parity}"))


if __name__ == "__main__":
    main()
