#!/usr/bin/env bash
# Run a command on a lent GPU machine (no network there): install the wheels carried in .whl/ into /tmp/site,
# make the source tree importable without building it (hooked_vlm.adapters is the adapters/ folder), then run "$@".
# Wheels: see doc/benchmarks.md ("Reproducing") for the pip download command that fills .whl/.
# TL4=1: also install .whl/tl4/*.whl (transformer-lens 4.3) into /tmp/site_tl4 and put it first on the path, for
# bench_vlm.py's TransformerBridge rows; sae_lens needs transformer-lens < 4, so leave TL4 unset for bench_sae.py.
set -eo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -n "${TL4:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_tl4 .whl/tl4/*.whl
  export PYTHONPATH=/tmp/site_tl4:$PYTHONPATH
fi
[ -e hooked_vlm/adapters ] || ln -s ../adapters hooked_vlm/adapters
# sae_lens imports wandb at module level; the machine has none and no network (see device_stubs/wandb)
python3 -c "import wandb" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/benchmarks/device_stubs
"$@"
