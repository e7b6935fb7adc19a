"""End to end harvest, folder of JPEGs → rows (→ store), CLIP ViT-L/14 real size (random weights, bf16), in one process.

    python benchmarks/bench_e2e_harvest.py [--images 4096] [--batch 256] [--layer 22]
    python benchmarks/bench_e2e_harvest.py --device cpu --layers 2 --images 24 --batch 8  # smoke

The images are written first: ``--images`` JPEGs of 640×480 (smooth random colour fields with noise, quality 90)
into a temporary folder, so every row reads the same files. Rows (images/s, each one pass over the folder unless
said otherwise; hook ``vision.blocks.{layer}.hook_resid_post``, ``patches``):

* ``gpu_only_run_with_cache``: ``run_with_cache`` with early stop on ready ``pixel_values`` already on the device
  (the rate the GPU allows; what the other rows are held against);
* ``decode_one_thread`` / ``decode_processor_one_thread``: PIL decode, and decode + ``CLIPImageProcessor``, in the
  main thread (first 512 files);
* ``harvest_thread_prefetch``: :func:`hooked_vlm.sae.harvest` over the folder, ``workers=0`` (one prefetch thread);
* ``harvest_workers``: the same with ``workers=W`` loading processes (default: every core but one);
* ``store_workers``: :func:`harvest_to_store` with ``workers=W`` (shards hashed and written off the main thread);
* ``store_workers_compiled``: the same with ``compiled={"mode": "default"}``, compile time included;
* ``gpu_decode_preprocess``: ``torchvision.io.decode_jpeg`` on the GPU + resize (bicubic, antialias), centre
  crop and normalise on the GPU, with the max / mean difference of its pixel values to the HF processor's.

``--device cpu --layers N`` is a smoke run (N blocks, fp32): it checks that every row runs, not how fast.
Results: JSON under ``$OUT`` (default out/benchmarks), ``bench_e2e_harvest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clip import HF_NAME, build_clip  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.sae import harvest, harvest_to_store  # noqa: E402
from hooked_vlm.sae.pipeline import default_workers  # noqa: E402


def _write_jpeg(args: tuple[Path, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def write_images(folder: Path, n: int) -> list[Path]:
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    with Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        pool.map(_write_jpeg, [(p, i) for i, p in enumerate(paths)], chunksize=32)
    return paths


def rate(n: int, seconds: float) -> dict:
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_preprocess(paths: list[Path], processor, device: str, batch: int) -> tuple[float, torch.Tensor]:
    """nvJPEG decode + resize/crop/normalise on the device; returns seconds and the first batch's pixels."""
    import torchvision
    from torchvision.transforms.v2 import functional as F

    size = processor.crop_size["height"]
    mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)
    first = None
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        data = [torchvision.io.read_file(str(p)) for p in paths[i : i + batch]]
        decoded = torchvision.io.decode_jpeg(data, device=device)
        out = []
        for image in decoded:  # [3, H, W] uint8, sizes may differ
            image = F.resize(image, [size], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
            out.append(F.center_crop(image, [size, size]))
        pixels = ((torch.stack(out).float() / 255) - mean) / std
        if first is None:
            first = pixels
    sync(device)
    return time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--layers", type=int, help="blocks per tower (CPU smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    args = parser.parse_args()
    from transformers import CLIPImageProcessor

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    layer = args.layer if args.layers is None else max(0, args.layers - 2)
    raw = build_clip(HF_NAME, args.device, dtype, args.layers).eval()
    processor = CLIPImageProcessor()  # openai/clip-vit-large-patch14's settings are the defaults
    # the image half of a CLIPProcessor (its tokenizer would need a download; the image tower needs none)
    model = HookedVLM.from_hf(raw, SimpleNamespace(image_processor=processor))
    hook = f"vision.blocks.{layer}.hook_resid_post"
    results: dict = {"card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "cores": len(os.sched_getaffinity(0)), "workers": args.workers, "batch": args.batch,
                     "hook": hook, "torch": torch.__version__, "rows": {}}
    rows = results["rows"]

    def report(name: str, value: dict) -> None:
        rows[name] = value
        print(f"{name:32s} {json.dumps(value)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        started = time.perf_counter()
        paths = write_images(folder, args.images)
        print(f"wrote {len(paths)} JPEGs in {time.perf_counter() - started:.1f} s", flush=True)

        # GPU only: ready pixel values on the device, early stop at the hook
        x = torch.randn(args.batch, 3, 224, 224, device=args.device, dtype=dtype)
        with torch.no_grad():
            for _ in range(2):
                model.run_with_cache(x, names_filter=[hook])
            sync(args.device)
            rounds = max(1, args.images // args.batch)
            start = time.perf_counter()
            for _ in range(rounds):
                model.run_with_cache(x, names_filter=[hook])
            sync(args.device)
        report("gpu_only_run_with_cache", rate(rounds * args.batch, time.perf_counter() - start))

        subset = paths[: min(512, len(paths))]
        start = time.perf_counter()
        for p in subset:
            Image.open(p).convert("RGB")
        report("decode_one_thread", rate(len(subset), time.perf_counter() - start))
        start = time.perf_counter()
        for p in subset:
            processor(images=Image.open(p).convert("RGB"), return_tensors="pt")
        report("decode_processor_one_thread", rate(len(subset), time.perf_counter() - start))

        def timed_harvest(**kwargs) -> dict:
            sync(args.device)
            start = time.perf_counter()
            n = 0
            for batch in harvest(model, folder, hook, positions="patches", batch_size=args.batch, progress=False,
                                 **kwargs):
                n += batch.stop - batch.start
            sync(args.device)
            return rate(n, time.perf_counter() - start)

        if "harvest_thread_prefetch" not in args.skip:
            report("harvest_thread_prefetch", timed_harvest(workers=0))
        report("harvest_workers", timed_harvest(workers=args.workers))

        def timed_store(name: str, **kwargs) -> None:
            sync(args.device)
            start = time.perf_counter()
            store = harvest_to_store(model, folder, hook, Path(tmp) / name, positions="patches",
                                     batch_size=args.batch, progress=False, workers=args.workers, **kwargs)
            sync(args.device)
            value = rate(len(store.image_ids), time.perf_counter() - start) | {"rows": store.n_rows[hook],
                                                                               "shards": store.n_shards}
            report(name, value)

        timed_store("store_workers")
        if "store_workers_compiled" not in args.skip:
            timed_store("store_workers_compiled", compiled={"mode": "default"})

        if args.device == "cuda" and "gpu_decode_preprocess" not in args.skip:
            gpu_preprocess(paths[: args.batch], processor, args.device, args.batch)  # warm-up
            seconds, pixels = gpu_preprocess(paths, processor, args.device, args.batch)
            reference = processor(images=[Image.open(p).convert("RGB") for p in paths[: args.batch]],
                                  return_tensors="pt")["pixel_values"].to(args.device)
            diff = (pixels - reference).abs()
            report("gpu_decode_preprocess", rate(len(paths), seconds) | {
                "max_abs_diff_to_hf": round(float(diff.max()), 4), "mean_abs_diff_to_hf": round(float(diff.mean()), 4)})

    out = Path(os.environ.get("OUT", "out/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_e2e_harvest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
