"""SAE training throughput through sae_lens at the issue's size: d_in 1024 (CLIP ViT-L/14), d_sae = 64 × 1024, k = 32.

    python benchmarks/bench_sae.py [--steps 200] [--batch 4096]

Rows come from ``hooked_vlm.sae.train_sae`` fed an endless stream of activation batches already on the GPU
(harvest throughput is measured separately by bench_harvest.py), TopK, bf16 autocast, no normalisation
estimate: samples/s over the steps after a warm-up run of the same size.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, save  # noqa: E402

from hooked_vlm.sae import train_sae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    env = environment()
    pool = torch.randn(16, args.batch, args.d_in, device=args.device)
    results = {}
    for run in ("warm-up", "timed"):
        stream = (pool[i % 16] for i in itertools.count())
        with tempfile.TemporaryDirectory() as out:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trained = train_sae(
                stream, "vision.blocks.22.hook_resid_post", output_path=out,
                training_samples=args.steps * args.batch, batch_size=args.batch, d_sae=64 * args.d_in, k=32,
                architecture="topk", normalize_activations="none", device=args.device, autocast=args.device == "cuda", buffer_batches=4,
            )
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        results[run] = {"seconds": round(seconds, 2), "samples_per_s": round(args.steps * args.batch / seconds),
                        "final_loss": float(trained.losses[-1])}
    if args.device == "cuda":
        results["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save("sae_train_topk_64x1024_k32", {"env": env, "results": results, "args": vars(args)})
    print(f"SAE training (TopK, d_in {args.d_in}, d_sae {64 * args.d_in}, k 32, batch {args.batch}, "
          f"{args.steps} steps) on {env['card']}: {results}")


if __name__ == "__main__":
    main()
