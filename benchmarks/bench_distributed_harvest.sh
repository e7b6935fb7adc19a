#!/usr/bin/env bash
# bench_distributed_harvest.py on 1 rank, then on N (default 2), each a fresh torchrun on this machine; the N-rank
# run prints its ratio of images/s to the 1-rank run (both write JSON to $OUT, default out/benchmarks).
#   bash benchmarks/bench_distributed_harvest.sh [N] [options of bench_distributed_harvest.py]
# On a lent GPU machine (no network): bash benchmarks/on_device.sh bash benchmarks/bench_distributed_harvest.sh 2
set -eo pipefail
N=${1:-2}
shift || true
export NCCL_NVLS_ENABLE=0  # no NVLink multicast (see the lent machines' notes)
cd "$(dirname "$0")/.."
for n in 1 $([ "$N" = 1 ] || echo "$N"); do
  # a hung rank (NCCL waits for 10 minutes) must not take the whole command with it
  timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node "$n" \
    benchmarks/bench_distributed_harvest.py "$@"
done
