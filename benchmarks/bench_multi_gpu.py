"""LLaVA-OneVision-7B and Qwen2-VL-7B (random weights, bf16, sdpa) on one GPU and spread over two by accelerate.

    python benchmarks/bench_multi_gpu.py [--models llava qwen] [--gpus 2] [--rounds 20]
    python benchmarks/bench_multi_gpu.py --tiny --device cpu      # smoke run of the script, no GPU

Each model is built on cuda:0 and measured there, then spread in place over ``--gpus`` GPUs with
``hooked_vlm.testing.dispatch(raw, "balanced")`` (what ``from_pretrained(device_map="auto")`` does) and measured
again. Parity: max |Δ| between the placements of the logits, cached activations (an LM and a vision residual,
the projector output), a steered forward, and an activation-patching sweep (3 LM layers × the last position).
Timings, with the harness in each placement (rows are interleaved within a placement; the placements run one
after the other on the same cards): the raw forward, ``model(x)`` with no hooks, one cached LM residual, one
steering vector; peak memory per GPU for one call of each. Inputs as in ``bench_vlm.py``: LLaVA-OneVision one
384×384 image (1485 image tokens) + 20 text tokens; Qwen2-VL one 224×224 image (64 image tokens) + 20 text tokens.

The CPU smoke run uses the tiny models and spreads them over the CPU and disk (accelerate offloading), timed
with a wall clock; its numbers only show that every step runs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, environment, markdown, save, time_variants  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.patching import activation_patching  # noqa: E402
from hooked_vlm.readouts import LogitDiff  # noqa: E402
from hooked_vlm.steering import SteeringVector, steer  # noqa: E402
from hooked_vlm.testing import TINY_MODELS, alternating_device_map, build, dispatch, real_size_inputs  # noqa: E402

CONFIGS = {"llava": "llava-hf/llava-onevision-qwen2-7b-ov-hf", "qwen": "Qwen/Qwen2-VL-7B-Instruct"}
TINY = {"llava": "llava_onevision", "qwen": "qwen2_vl"}
BASELINES = {"hooked_no_hooks": "hf_raw", "hooked_cache_1_resid": "hf_raw", "hooked_steer_1": "hf_raw"}


def measures(model: HookedVLM, clean, corrupted, vector: SteeringVector) -> dict[str, torch.Tensor]:
    """What parity compares between placements (caches gathered where the inputs are)."""
    _, lm = model.adapter.towers()
    mid, last = lm.n_layers // 2, lm.n_layers - 1
    names = [f"lm.blocks.{mid}.hook_resid_post", "vision.blocks.0.hook_resid_post", "projector.hook_out"]
    main = clean.kwargs["input_ids"].device
    with torch.no_grad():
        out = {"logits": model(clean)}
        _, cache = model.run_with_cache(clean, names_filter=names, stop_early=False, device=main)
        out |= {f"cache {name}": cache[name] for name in names}
        with steer(model, vector):
            out["steered logits"] = model(clean)
    hooks = [f"lm.blocks.{k}.hook_resid_post" for k in (0, mid, last)]
    out["patching sweep"] = activation_patching(
        model, clean, corrupted, LogitDiff(10, 20), hooks, positions=[-1], batch_size=3, progress=False
    ).values
    return out


def variants(model: HookedVLM, prepared, vector: SteeringVector) -> dict[str, Callable[[], object]]:
    raw, name = model.raw_model, vector.hook_name
    return {
        "hf_raw": lambda: raw(**prepared.kwargs).logits,
        "hooked_no_hooks": lambda: model(prepared),
        "hooked_cache_1_resid": lambda: model.run_with_cache(prepared, names_filter=name, stop_early=False),
        "hooked_steer_1": lambda: model.run_with_hooks(prepared, fwd_hooks=[vector.fwd_hook(model)]),
    }


def time_on_cpu(fns: dict[str, Callable[[], object]], rounds: int) -> list[Row]:
    """The harness's interleaved rounds with a wall clock (CUDA events need a GPU)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    rows = [Row(n, statistics.median(t), min(t), 0.0) for n, t in times.items()]
    medians = {row.variant: row.median_ms for row in rows}
    for row in rows:
        if row.variant in BASELINES:
            row.baseline = BASELINES[row.variant]
            row.ratio = row.median_ms / medians[row.baseline]
    return rows


def peaks_per_gpu(fns: dict[str, Callable[[], object]], gpus: list[int]) -> dict[str, dict[str, float]]:
    """Peak allocated GiB on each GPU over one call of each variant (weights included)."""
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.empty_cache()
        for gpu in gpus:
            torch.cuda.reset_peak_memory_stats(gpu)
        fn()
        for gpu in gpus:
            torch.cuda.synchronize(gpu)
        peaks[name] = {f"cuda:{gpu}": round(torch.cuda.max_memory_allocated(gpu) / 2**30, 2) for gpu in gpus}
    return peaks


def measure(model: HookedVLM, inputs: dict, corrupted_inputs: dict, args, gpus: list[int]) -> dict:
    """Parity tensors, timing rows and per-GPU peaks of ``model`` in its current placement."""
    clean, corrupted = model.prepare_inputs(inputs), model.prepare_inputs(corrupted_inputs)
    _, lm = model.adapter.towers()
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_tensor(f"lm.blocks.{lm.n_layers // 2}.hook_resid_post", direction, scale=4.0)
    fns = variants(model, clean, vector)
    with torch.no_grad():
        if args.device == "cpu":
            rows, peaks = time_on_cpu(fns, args.rounds), {}
        else:
            # events on cuda:0 cover work on the other GPUs: every variant's output comes back to cuda:0 through
            # a copy that waits for them
            rows = time_variants(fns, BASELINES, rounds=args.rounds)
            peaks = peaks_per_gpu(fns, gpus)
            for row in rows:
                row.note = "peak GiB " + ", ".join(f"{gpu} {gib:.2f}" for gpu, gib in peaks[row.variant].items())
    return {"measures": measures(model, clean, corrupted, vector), "rows": rows, "peaks": peaks}


def run_model(key: str, args, gpus: list[int], offload_dir: str) -> dict:
    if args.tiny:
        raw, _ = TINY_MODELS[TINY[key]]()
    else:
        raw = build(CONFIGS[key], device="cuda:0", dtype=torch.bfloat16)
        torch.cuda.empty_cache()  # the float32 construction's blocks, so accelerate sees the GPU's real free memory
    model = HookedVLM.from_hf(raw)
    inputs, corrupted = real_size_inputs(model, seed=0), real_size_inputs(model, seed=0, image_seed=1)
    single = measure(model, inputs, corrupted, args, gpus)
    start = time.perf_counter()
    if args.device == "cpu":
        dispatch(raw, alternating_device_map(raw, ["disk", "cpu", "cpu"]), offload_dir=offload_dir)
    else:
        dispatch(raw, "balanced", max_memory={gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus})
    dispatch_s = time.perf_counter() - start
    used = sorted({str(d) for d in raw.hf_device_map.values()})
    if args.device != "cpu" and len(used) < 2:
        raise RuntimeError(f"accelerate placed the whole model on {used}; nothing is spread")
    spread = measure(HookedVLM.from_hf(raw), inputs, corrupted, args, gpus)
    parity = {}
    for what, expected in single["measures"].items():
        actual = spread["measures"][what].to(expected.device)
        parity[f"max |Δ| {what}"] = (actual.float() - expected.float()).abs().max().item()
        parity[f"max |{what}|"] = expected.float().abs().max().item()
    lm_layers = {k: v for k, v in raw.hf_device_map.items() if ".layers." in k and "language_model" in k}
    placement = {
        "devices": used,
        "first LM layer per device": {
            str(d): min(int(k.rsplit(".", 1)[1]) for k, v in lm_layers.items() if v == d)
            for d in sorted(set(lm_layers.values()), key=str)
        },
        "dispatch s": round(dispatch_s, 2),
        "device_map": {k: str(v) for k, v in raw.hf_device_map.items()},
    }
    del model, raw
    gc.collect()
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return {"single": single, "spread": spread, "parity": parity, "placement": placement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--gpus", type=int, default=2, help="GPUs to spread over (cuda:0 .. cuda:N-1)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny random models (for --device cpu)")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} needs {args.gpus} CUDA devices, this machine has {torch.cuda.device_count()}")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs the tiny models only (pass --tiny): a 7B model on the CPU takes hours")
    gpus = list(range(args.gpus)) if args.device == "cuda" else []
    env = environment() | {"gpus": str(args.gpus if gpus else 0)}
    print(f"card: {env['card']} × {env['gpus']}; torch {env['torch']}; transformers {env['transformers']}")
    for key in args.models:
        with tempfile.TemporaryDirectory() as offload_dir:
            result = run_model(key, args, gpus, offload_dir)
        name = f"{TINY[key]} (tiny, CPU)" if args.tiny else f"{CONFIGS[key]} (random weights)"
        stem = f"multi_gpu_{key}{'_tiny_cpu' if args.tiny else ''}"
        save(stem, {
            "env": env, "single_gpu": result["single"]["rows"], "spread": result["spread"]["rows"],
            "peaks_single_gpu": result["single"]["peaks"], "peaks_spread": result["spread"]["peaks"],
            "parity": result["parity"], "placement": result["placement"],
        })
        where = "float32, CPU" if args.tiny else f"bf16 sdpa, 1 × {env['card']}"
        spread_where = "float32, CPU + disk offload" if args.tiny else f"bf16 sdpa, {args.gpus} × {env['card']}, balanced"
        per_gpu = "peak GiB: cuda:0 (the harness's column); per GPU in the note"
        print(markdown(f"{name}, batch 1, {where}", result["single"]["rows"], per_gpu))
        placement = {k: v for k, v in result["placement"].items() if k != "device_map"}
        print(markdown(f"{name}, batch 1, {spread_where}", result["spread"]["rows"], f"{per_gpu}; {placement}"))
        print("parity (spread vs one device):")
        for what, value in result["parity"].items():
            print(f"- {what}: {value:.4g}")
        print()


if __name__ == "__main__":
    main()
