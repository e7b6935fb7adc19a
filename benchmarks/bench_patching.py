"""Residual patching sweep on LLaVA-OneVision-0.5b at real size (random weights, bf16): batched vs one forward each.

    python benchmarks/bench_patching.py [--subset 16] [--batch 64] [--full]

Every LM layer's ``hook_resid_post`` × image-token positions (clean and corrupted differ in the image only), with
``hooked_vlm.patching.activation_patching``. On a spaced subset of ``--subset`` positions: batched (``--batch``
patches per forward, with the base run's image features and earlier blocks replayed), batched without that reuse,
and one plain forward per patch. With ``--full``: the whole sweep (24 layers × 1485 positions) batched, timed
end to end, and its values at the subset compared with the other modes'; the one-forward-per-patch time of the
full sweep is the subset's per-patch time × the number of patches (running it would take about half an hour).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import CONFIGS, llava_inputs  # noqa: E402
from harness import environment, save  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.patching import activation_patching  # noqa: E402
from hooked_vlm.readouts import LogitDiff  # noqa: E402
from hooked_vlm.testing import build  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    env = environment()
    raw = build(CONFIGS["llava"], device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    clean = llava_inputs(raw, 1)
    corrupted = dict(clean, pixel_values=torch.randn_like(clean["pixel_values"]))
    image_positions = clean["input_ids"][0].eq(raw.config.image_token_id).nonzero()[:, 0].tolist()
    step = max(1, len(image_positions) // args.subset)
    subset = image_positions[::step][: args.subset]
    readout = LogitDiff(100, 200)
    hooks = "lm.blocks.*.hook_resid_post"
    n_layers = raw.config.text_config.num_hidden_layers

    def sweep(positions, batch_size: int, reuse_prefix: bool):
        return activation_patching(model, clean, corrupted, readout, hooks, positions=positions, batch_size=batch_size,
                                   reuse_prefix=reuse_prefix, progress=False).values.float()

    with torch.no_grad():
        sweep(subset, args.batch, True)  # warm-up (allocator, kernels)
        batched, batched_s = timed(lambda: sweep(subset, args.batch, True))
        no_reuse, no_reuse_s = timed(lambda: sweep(subset, args.batch, False))
        single, single_s = timed(lambda: sweep(subset, 1, False))
    n_patches, per_patch = n_layers * len(subset), single_s / (n_layers * len(subset))
    results = {
        "subset": {
            "patches": n_patches,
            "batched_s": round(batched_s, 2),
            "batched_without_reuse_s": round(no_reuse_s, 2),
            "one_per_forward_s": round(single_s, 2),
            "speed-up": round(single_s / batched_s, 1),
            "max |Δ| batched vs one-per-forward": (batched - single).abs().max().item(),
            "max |Δ| batched vs without reuse": (batched - no_reuse).abs().max().item(),
        }
    }
    if args.full:
        with torch.no_grad():
            full, full_s = timed(lambda: sweep(image_positions, args.batch, True))
        at_subset = full[:, [image_positions.index(p) for p in subset]]
        n_full = n_layers * len(image_positions)
        results["full"] = {
            "patches": n_full,
            "batched_s": round(full_s, 1),
            "batched_patches_per_s": round(n_full / full_s, 1),
            "one_per_forward_s (subset per-patch time × patches)": round(per_patch * n_full, 1),
            "speed-up": round(per_patch * n_full / full_s, 1),
            "max |Δ| full sweep vs one-per-forward at the subset": (at_subset - single).abs().max().item(),
        }
    save("patching_llava05_resid_image", {"env": env, "results": results, "args": vars(args)})
    print(f"LLaVA-OneVision-0.5b residual patching, {n_layers} layers × image positions (batch {args.batch}) on "
          f"{env['card']}: {results}")


if __name__ == "__main__":
    main()
