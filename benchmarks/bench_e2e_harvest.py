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
* ``loader_only_workers`` / ``loader_only_gpu_preprocess``: :class:`~hooked_vlm.sae.pipeline.BatchLoader` alone
  (batches prepared and on the device, no forward): how fast loading is by itself;
* ``harvest_workers``: the same with ``workers=W`` loading processes (default: every core but one), each batch
  cut into one chunk per worker;
* ``harvest_gpu_preprocess``: ``preprocess="gpu"``, at most 4 workers only reading file bytes (nvJPEG decode and the
  processor's steps on the GPU, on a side stream);
* ``store_workers`` / ``store_gpu_preprocess``: :func:`harvest_to_store` likewise (shards hashed and written by
  writer threads), into a folder under ``--store-root`` (default: the temporary folder of the images);
* ``store_gpu_compiled``: ``compiled=True``: compiled only where it pays off (here: eager, with a log line);
* ``store_gpu_compiled_always``: ``compiled={"mode": "default", "min_images": 0}`` (compiled however short),
  compile time included;
* ``gpu_decode_preprocess``: :func:`hooked_vlm.sae.gpu_preprocess.decode` + ``device_transform`` alone over the
  folder, with the max / mean difference of its pixel values to the HF processor's on the CPU;
* ``llava_*`` (``--llava``): LLaVA-OneVision-0.5b (random weights, a processor built in memory with the
  checkpoint's 384 px tiles and grid pinpoints), hook ``vision.blocks.{L-2}.hook_resid_post`` patches, batch
  ``--llava-batch``, the first ``--llava-images`` files: GPU only on ready inputs, and ``harvest`` with W workers
  (the processor's anyres tiling on the CPU, whole forwards per worker); ``llava_processor_one_thread`` (the
  processor on one thread, as in a worker) and ``llava_loader_only_workers`` (the loader alone).

``--device cpu --layers N`` is a smoke run (N blocks, fp32): it checks that every row runs, not how fast.
Results: JSON under ``$OUT`` (default out/benchmarks), ``bench_e2e_harvest.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
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
from hooked_vlm.sae.harvesting import image_source  # noqa: E402
from hooked_vlm.sae.pipeline import BatchLoader, default_workers  # noqa: E402


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
    """The library's decode + device transform over ``paths``; returns seconds and the first batch's pixels."""
    from hooked_vlm.sae.gpu_preprocess import decode, device_transform, raw_image

    transform = device_transform(processor)
    first = None
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        pixels = transform(decode([raw_image(p) for p in paths[i : i + batch]], torch.device(device)))
        if first is None:
            first = pixels
    sync(device)
    return time.perf_counter() - start, first


def build_llava(device: str, dtype: torch.dtype, layers: int | None):
    """Real-size LLaVA-OneVision-0.5b with random weights and a processor built in memory (no download): the
    checkpoint's image processor settings (384 px tiles, its grid pinpoints), a byte-level tokenizer whose
    ``<image>`` id the config is given."""
    import transformers
    from transformers import (
        CONFIG_MAPPING,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from hooked_vlm.testing import load_config
    from hooked_vlm.testing.llava_onevision import CHAT_TEMPLATE, qwen2_tokenizer

    data = load_config("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    tokenizer = qwen2_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    data["image_token_index"] = tokenizer.convert_tokens_to_ids("<image>")
    data["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
    if layers is not None:
        data["vision_config"]["num_hidden_layers"] = layers
        data["text_config"]["num_hidden_layers"] = layers
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    with torch.device(device):
        raw = getattr(transformers, data["architectures"][0])(config).to(dtype).eval()
    tile = config.vision_config.image_size
    size = {"height": tile, "width": tile}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=data["image_grid_pinpoints"], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        num_image_tokens=(tile // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE)
    return HookedVLM.from_hf(raw, processor), config.vision_config.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--layers", type=int, help="blocks per tower (CPU smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    parser.add_argument("--store-root", help="folder for the stores (default: the images' temporary folder)")
    parser.add_argument("--profile", action="store_true", help="cProfile the harvest rows' main thread into $OUT")
    parser.add_argument("--llava", action="store_true", help="also the LLaVA-OneVision-0.5b vision-hook rows")
    parser.add_argument("--llava-images", type=int, default=1024)
    parser.add_argument("--llava-batch", type=int, default=32)
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

        def timed_loader(**kwargs) -> dict:
            """The loader alone (no forwards): how fast batches arrive, prepared, on the device."""
            bounds = [(i, min(i + args.batch, len(paths))) for i in range(0, len(paths), args.batch)]
            sync(args.device)
            start = time.perf_counter()
            loader = BatchLoader(model, image_source(folder), None, bounds, args.workers, **kwargs)
            for _ in loader:
                pass
            sync(args.device)
            loader.close()
            return rate(len(paths), time.perf_counter() - start)

        def profiled(name: str, run) -> dict:
            """``run()`` under cProfile (main thread); the top of the profile goes to $OUT/profile_<name>.txt."""
            if not args.profile:
                return run()
            profile = cProfile.Profile()
            value = profile.runcall(run)
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            out = Path(os.environ.get("OUT", "out/benchmarks"))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"profile_{name}.txt").write_text(text.getvalue())
            return value

        if "harvest_thread_prefetch" not in args.skip:
            report("harvest_thread_prefetch", timed_harvest(workers=0))
        report("loader_only_workers", timed_loader())
        report("harvest_workers", profiled("harvest_workers", lambda: timed_harvest(workers=args.workers)))
        if args.device == "cuda":
            report("loader_only_gpu_preprocess", timed_loader(preprocess="gpu"))
            report("harvest_gpu_preprocess", profiled(
                "harvest_gpu_preprocess", lambda: timed_harvest(workers=args.workers, preprocess="gpu")))
        store_root = Path(args.store_root or tmp)

        def timed_store(name: str, **kwargs) -> None:
            sync(args.device)
            start = time.perf_counter()
            store = harvest_to_store(model, folder, hook, store_root / name, positions="patches",
                                     batch_size=args.batch, progress=False, workers=args.workers, **kwargs)
            sync(args.device)
            value = rate(len(store.image_ids), time.perf_counter() - start) | {"rows": store.n_rows[hook],
                                                                               "shards": store.n_shards}
            report(name, value)
            shutil.rmtree(store_root / name)

        timed_store("store_workers")
        if args.device == "cuda":
            timed_store("store_gpu_preprocess", preprocess="gpu")
            timed_store("store_gpu_compiled", preprocess="gpu", compiled=True)
            if "store_gpu_compiled_always" not in args.skip:
                timed_store("store_gpu_compiled_always", preprocess="gpu", compiled={"mode": "default", "min_images": 0})

        if args.device == "cuda" and "gpu_decode_preprocess" not in args.skip:
            gpu_preprocess(paths[: args.batch], processor, args.device, args.batch)  # warm-up
            seconds, pixels = gpu_preprocess(paths, processor, args.device, args.batch)
            reference = processor(images=[Image.open(p).convert("RGB") for p in paths[: args.batch]],
                                  return_tensors="pt")["pixel_values"].to(args.device)
            diff = (pixels - reference).abs()
            report("gpu_decode_preprocess", rate(len(paths), seconds) | {
                "max_abs_diff_to_hf": round(float(diff.max()), 4), "mean_abs_diff_to_hf": round(float(diff.mean()), 4)})

        if args.llava:
            from hooked_vlm.sae.harvesting import model_inputs

            del model, raw
            torch.cuda.empty_cache() if args.device == "cuda" else None
            llava, n_layers = build_llava(args.device, dtype, args.layers)
            llava_hook = f"vision.blocks.{max(0, n_layers - 2)}.hook_resid_post"
            results["llava_hook"] = llava_hook
            images = [Image.open(p).convert("RGB") for p in paths[: args.llava_batch]]
            prepared = llava.prepare_inputs(**model_inputs(llava, images, None))
            with torch.no_grad():
                for _ in range(2):
                    llava.run_with_cache(prepared, names_filter=[llava_hook])
                sync(args.device)
                rounds = max(1, args.llava_images // args.llava_batch)
                start = time.perf_counter()
                for _ in range(rounds):
                    llava.run_with_cache(prepared, names_filter=[llava_hook])
                sync(args.device)
            report("llava_gpu_only_run_with_cache", rate(rounds * args.llava_batch, time.perf_counter() - start)
                   | {"tiles_per_image": int(prepared.kwargs["pixel_values"].shape[1])})
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a loading process
            start = time.perf_counter()
            for i in range(0, len(images), 4):
                llava.prepare_inputs(**model_inputs(llava, images[i : i + 4], None))
            torch.set_num_threads(threads)
            report("llava_processor_one_thread", rate(len(images), time.perf_counter() - start))
            subset = paths[: args.llava_images]
            llava_bounds = [(i, min(i + args.llava_batch, len(subset))) for i in range(0, len(subset), args.llava_batch)]
            start = time.perf_counter()
            loader = BatchLoader(llava, image_source(subset), None, llava_bounds, args.workers)
            for _ in loader:
                pass
            sync(args.device)
            loader.close()
            report("llava_loader_only_workers", rate(len(subset), time.perf_counter() - start))
            sync(args.device)
            start = time.perf_counter()
            n = sum(b.stop - b.start for b in harvest(llava, subset, llava_hook, positions="patches",
                                                      batch_size=args.llava_batch, progress=False,
                                                      workers=args.workers))
            sync(args.device)
            report("llava_harvest_workers", rate(n, time.perf_counter() - start))

    gpu = rows["gpu_only_run_with_cache"]["images_per_s"]
    for name, value in rows.items():
        base = rows["llava_gpu_only_run_with_cache"]["images_per_s"] if name.startswith("llava_") else gpu
        value["ratio_to_gpu_only"] = round(value["images_per_s"] / base, 3)
    print({name: value["ratio_to_gpu_only"] for name, value in rows.items()}, flush=True)
    out = Path(os.environ.get("OUT", "out/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_e2e_harvest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
