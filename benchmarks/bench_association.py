"""Association of SAE features with a score, from stored rows, at the issue's size, on the CPU.

    python benchmarks/bench_association.py [--images 10000] [--positions 256] [--d-in 768] [--d-sae 16384]
                                           [--permutations 1000] [--dtype bfloat16] [--architecture standard]

Rows are random bf16 vectors held in memory as :class:`hooked_vlm.sae.association.TensorRows` (the store's
reading interface, one shard): this times the encoding through the SAE, the per-image reduction and the
statistics, not the disk (reading a 3.9 GB store is seconds). A score is planted in feature 0 (its image
maximum plus noise), and the run checks that feature 0 comes out first. Prints one Markdown row.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_vlm.sae.association import TensorRows, associate, image_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16_384)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--architecture", default="standard", choices=["standard", "topk"])
    parser.add_argument("--chunk-rows", type=int, default=8192)
    args = parser.parse_args()

    torch.manual_seed(0)
    n_rows = args.images * args.positions
    rows = torch.randn(n_rows, args.d_in, dtype=torch.bfloat16)
    image = torch.arange(args.images).repeat_interleave(args.positions)
    position = torch.arange(args.positions).repeat(args.images)
    index = torch.stack([image, image % 256, position, torch.zeros_like(image), position // 16, position % 16], 1)
    store = TensorRows("h", rows, index, [str(i) for i in range(args.images)])
    metadata = SAEMetadata(hook_name="h")
    if args.architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=32, metadata=metadata))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=args.d_in, d_sae=args.d_sae, metadata=metadata))
    with torch.no_grad():
        sae.W_enc.normal_(0, args.d_in ** -0.5)
        sae.b_enc.fill_(-1.5)  # about 7% of rows active per feature, as a sparse SAE
    dtype = getattr(torch, args.dtype)

    cpu_start, start = time.process_time(), time.perf_counter()
    acts = image_activations(store, sae, dtype=dtype, chunk_rows=args.chunk_rows, progress=False)
    encoded = time.perf_counter() - start
    score = acts.values[:, 0] + acts.values[:, 0].std() * torch.randn(args.images)
    encoded_cpu = time.process_time() - cpu_start
    cpu_start, start = time.process_time(), time.perf_counter()
    result = associate(acts, score, n_permutations=args.permutations)
    stats = time.perf_counter() - start
    stats_cpu = time.process_time() - cpu_start
    first = int(result.ranking()[0])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"machine: {machine}; threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} at the end")
    print("| images × positions × features | d_in | SAE | encode dtype | encode + reduce s | statistics s "
          "(P permutations) | total s | CPU s (all threads) | rows/s | planted feature first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.images:,} × {args.positions} × {args.d_sae:,} | {args.d_in} | {args.architecture} | {args.dtype} | "
          f"{encoded:.1f} | {stats:.1f} ({args.permutations}) | {encoded + stats:.1f} | "
          f"{encoded_cpu:.0f} + {stats_cpu:.0f} | {n_rows / encoded:,.0f} | "
          f"{first == 0} (q {float(result.q_value[0]):.2g}) |")


if __name__ == "__main__":
    main()
