"""Residual patching sweep on LLaVA-OneVision-0.5b at real size (random weights, bf16): batched vs one forward each.

    python benchmarks/bench_patching.py [--positions 32] [--batch 64]

Every LM layer's ``hook_resid_post`` × a spaced subset of the 1485 image-token positions (clean and corrupted
differ in the image only), with ``hooked_vlm.patching.activation_patching``: batched (``batch_size`` patches per
forward, blocks before the patched layer reused) against one forward per patch. The full sweep (24 layers × 1485
positions) is extrapolated from the measured per-patch time of each mode.
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
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    env = environment()
    raw = build(CONFIGS["llava"], device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    clean = llava_inputs(raw, 1)
    corrupted = dict(clean, pixel_values=torch.randn_like(clean["pixel_values"]))
    image_positions = clean["input_ids"][0].eq(raw.config.image_token_id).nonzero()[:, 0]
    step = max(1, len(image_positions) // args.positions)
    subset = image_positions[::step][: args.positions].tolist()
    readout = LogitDiff(100, 200)
    hooks = "lm.blocks.*.hook_resid_post"
    n_layers = raw.config.text_config.num_hidden_layers
    n_patches = n_layers * len(subset)
    full = n_layers * len(image_positions)

    def sweep(batch_size: int, reuse_prefix: bool):
        return activation_patching(model, clean, corrupted, readout, hooks, positions=subset, batch_size=batch_size,
                                   reuse_prefix=reuse_prefix, progress=False)

    with torch.no_grad():
        sweep(args.batch, True)  # warm-up (allocator, kernels)
        batched, batched_s = timed(lambda: sweep(args.batch, True))
        single, single_s = timed(lambda: sweep(1, False))
    values = lambda result: result.values if hasattr(result, "values") else result.tensor  # noqa: E731
    difference = (values(batched).float() - values(single).float()).abs().max().item()
    results = {
        "patches": n_patches,
        "batched_s": round(batched_s, 2),
        "one_per_forward_s": round(single_s, 2),
        "speed-up": round(single_s / batched_s, 1),
        "batched_patches_per_s": round(n_patches / batched_s, 1),
        "one_per_forward_patches_per_s": round(n_patches / single_s, 1),
        "full_sweep_patches": full,
        "full_sweep_batched_min (extrapolated)": round(full / (n_patches / batched_s) / 60, 1),
        "full_sweep_one_per_forward_min (extrapolated)": round(full / (n_patches / single_s) / 60, 1),
        "max |Δ| batched vs one-per-forward": difference,
    }
    save("patching_llava05_resid_image", {"env": env, "results": results, "args": vars(args)})
    print(f"LLaVA-OneVision-0.5b residual patching, {n_layers} layers × {len(subset)} image positions "
          f"(batch {args.batch}) on {env['card']}: {results}")


if __name__ == "__main__":
    main()
