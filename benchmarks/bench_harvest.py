"""Harvesting CLIP ViT-L/14 layer 22 at real size (random weights, bf16): eager early stop and compiled harvest.

    python benchmarks/bench_harvest.py [--batch 256] [--layer 22] [--rounds 10]

Rows: the raw HF sdpa forward (whole model, the baseline every harvest is held against); the raw forward
truncated by hand to the hooked layer (the floor for an eager harvest); ``run_with_cache`` of the layer's residual
with early stop; :class:`hooked_vlm.compiled.CompiledHarvest` (torch.compile, max-autotune without CUDA graphs)
of the same hook. Activations of the compiled harvest are compared with the eager ones (bf16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

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

    with torch.no_grad():
        eager = model.run_with_cache(x, names_filter=name)[1][name]
        harvest = CompiledHarvest(model, [name], compile_kwargs={"mode": args.mode})
        with harvest:
            start = time.perf_counter()
            compiled = harvest(x)[name]
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            difference = (compiled.float() - eager.float()).abs()
            parity = {
                "compiled vs eager max |Δ|": difference.max().item(),
                "compiled vs eager mean |Δ|": difference.mean().item(),
                "max |activation|": eager.abs().max().item(),
                "first call incl. compile (s)": round(compile_s, 1),
            }
            variants = {
                "hf_raw_full_forward": lambda: raw.get_image_features(pixel_values=x),
                "hf_raw_truncated_by_hand": truncated_raw,
                "compiled_harvest": lambda: harvest(x),
            }
            rows = time_variants(variants, {k: "hf_raw_full_forward" for k in variants if k != "hf_raw_full_forward"},
                                 rounds=args.rounds)
        eager_rows = time_variants(
            {"hf_raw_full_forward": lambda: raw.get_image_features(pixel_values=x),
             "hooked_run_with_cache_early_stop": lambda: model.run_with_cache(x, names_filter=name)},
            {"hooked_run_with_cache_early_stop": "hf_raw_full_forward"}, rounds=args.rounds,
        )
    rows += [r for r in eager_rows if r.variant != "hf_raw_full_forward"]
    for row in rows:
        row.note = f"{args.batch / row.median_ms * 1000:.0f} images/s"
    save(f"harvest_clip_l{args.layer}_b{args.batch}", {"env": env, "rows": rows, "parity": parity})
    print(markdown(f"CLIP ViT-L/14 harvest of {name}, batch {args.batch}, bf16 ({env['card']})", rows, f"parity: {parity}"))


if __name__ == "__main__":
    main()
