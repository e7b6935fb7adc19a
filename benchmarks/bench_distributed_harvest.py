"""Data-parallel harvesting under torchrun: images/s of CLIP ViT-L/14 (random weights, bf16) on 1 and N GPUs.

    python3 -m torch.distributed.run --standalone --nproc_per_node N benchmarks/bench_distributed_harvest.py \\
        [--images 16384] [--batch 256] [--layer 22] [--positions patches] [--dir DIR]
    bash benchmarks/bench_distributed_harvest.sh 2                       # N = 1, then N = 2: the ratio
    bash benchmarks/bench_distributed_harvest.sh 2 --device cpu --tiny   # smoke test: tiny CLIP, 2 gloo ranks

Every rank puts the model on its own GPU (``torchrun_group``), harvests its part of the images into the store
(``harvest_to_store(..., rank=, world_size=)``: what a harvest under torchrun runs, with the clock read between
the steps), and rank 0 merges the parts. The job's images/s is all images over the wall time from a barrier before
harvesting to a barrier after the merge; each rank's, its part over its own time. Before that, untimed, each rank
measures input preparation alone (CPU, one thread: the prefetch worker's job) and the forward alone (GPU), so
the table shows which of the two bounds the harvest.

Rows: ``vision.blocks.22.hook_resid_post`` at ``patches`` (256 rows of 1024 per image, 512 KB in bf16), the
patch tokens of a late layer that vision SAEs are usually trained on (``--positions cls``: one row per image).
Images: 64 distinct images drawn in code (256-320 px), cycled up to ``--images``; they are in memory, so file
decoding is not measured, CLIP preprocessing (resize, crop, normalise; 224 px, built offline) is. The store goes
to /dev/shm when it has room, else to the temp dir (printed), and is deleted at the end. Results: JSON in
``$OUT`` (default out/benchmarks); a run on N > 1 ranks prints its ratio to the 1-rank run of the same settings
found there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, save  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.sae import ActivationStore, ImageSource, harvest_to_store, merge_stores, torchrun_group  # noqa: E402
from hooked_vlm.sae.harvesting import select_rows  # noqa: E402
from hooked_vlm.testing import build, clip_processor, sample_image, tiny_clip  # noqa: E402

POOL = 64  # distinct drawn images


def drawn_images(n: int, sizes: list[tuple[int, int]]) -> ImageSource:
    """``n`` images: ``POOL`` distinct ones of the given sizes, drawn once, repeated (held in memory, as decoded)."""
    cycled = itertools.islice(itertools.cycle(sizes), POOL)
    pool = [sample_image(width=w, height=h, seed=i) for i, (w, h) in enumerate(cycled)]
    return ImageSource([f"drawn-{i}" for i in range(n)], f"{n} drawn images ({POOL} distinct, cycled)",
                       lambda start, stop: [pool[i % POOL] for i in range(start, stop)])


def load(args: argparse.Namespace, device: str) -> tuple[HookedVLM, str, ImageSource, str]:
    torch.manual_seed(0)  # the same random weights on every rank
    if args.tiny:
        raw, processor = tiny_clip()
        model = HookedVLM.from_hf(raw.to(device), processor)
        source = drawn_images(args.images, [(64, 48), (48, 64), (64, 64)])
        return model, "vision.blocks.1.hook_resid_post", source, "tiny"
    raw = build("openai/clip-vit-large-patch14", device=device, dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw, clip_processor(224))
    source = drawn_images(args.images, [(320, 256), (256, 320), (288, 288), (256, 256)])
    tag = f"clip_l{args.layer}_{args.positions}_b{args.batch}"
    return model, f"vision.blocks.{args.layer}.hook_resid_post", source, tag


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alone(model: HookedVLM, source: ImageSource, hook: str, args: argparse.Namespace) -> tuple[float, float, int, int]:
    """images/s of preparing inputs alone and of the forward (with row selection) alone, over one batch (best of
    two, after a warm-up run of each, which also initialises cuBLAS and the allocator); rows per image and bytes
    per row."""
    images = source.load(0, args.batch)
    prepare_s, forward_s = [], []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            prepared = model.prepare_inputs(images)
            synchronize()
            prepare_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            _, cache = model.run_with_cache(prepared, names_filter=hook)
            rows, _ = select_rows(cache, hook, args.positions)
            synchronize()
            forward_s.append(time.perf_counter() - start)
    return (args.batch / min(prepare_s[1:]), args.batch / min(forward_s[1:]), len(rows) // args.batch,
            rows.shape[1] * rows.element_size())


def store_dir(requested: str | None, need: int) -> Path:
    """Where the store goes: ``requested``, else /dev/shm (RAM: disk speed is not what is measured) if it has room."""
    if requested:
        return Path(requested)
    for base in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(base) and os.access(base, os.W_OK) and shutil.disk_usage(base).free > 1.5 * need:
            return Path(base)
    raise SystemExit(f"no room for a {need / 2**30:.1f} GiB store in /dev/shm or {tempfile.gettempdir()}: "
                     "pass --dir, or fewer --images")


def report(tag: str, args: argparse.Namespace, hook: str, path: Path, per_image: int, job_s: float,
           ranks: list[dict]) -> None:
    world = len(ranks)
    store = ActivationStore(path)
    assert store.complete and len(store.manifest["parts"]) == world, store
    assert store.n_rows[hook] == per_image * args.images, f"{store.n_rows[hook]} rows, not {per_image} per image"
    gib = sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**30
    env = environment()
    job = {"images": args.images, "seconds": round(job_s, 3), "images_per_s": round(args.images / job_s, 1)}
    out = os.environ.get("OUT", "out/benchmarks")
    payload = {"env": env, "settings": {**vars(args), "hook": hook, "ranks": world, "store_dir": str(path.parent),
                                        "store_gib": round(gib, 2), "rows_per_image": per_image},
               "job": job, "ranks": {str(r["rank"]): r for r in ranks}}  # save() takes lists for Row lists
    lines = [f"### Data-parallel harvest, {world} rank(s): {hook} at {args.positions}, batch {args.batch}, "
             f"{args.images} images ({env['card']})", "",
             f"store: {gib:.2f} GiB in {path.parent}; {store.n_shards} shards; torch {env['torch']}", "",
             "| rank | images | seconds | images/s | prepare alone (1 thread), images/s | forward alone, images/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | "
              f"{r['prepare_images_per_s']:.0f} | {r['forward_images_per_s']:.0f} |" for r in ranks]
    lines += [f"| **job** | {args.images} | {job_s:.2f} | **{job['images_per_s']:.0f}** | | |"]
    baseline = Path(out) / f"distributed_harvest_{tag}_n1.json"
    if world > 1 and baseline.is_file():
        base = json.loads(baseline.read_text())
        ratio = job["images_per_s"] / base["job"]["images_per_s"]
        payload["scaling"] = {"from_1_rank_images_per_s": base["job"]["images_per_s"], "ratio": round(ratio, 3),
                              "baseline_card": base["env"]["card"]}
        lines += ["", f"**1 → {world} ranks: {base['job']['images_per_s']:.0f} → {job['images_per_s']:.0f} "
                      f"images/s = {ratio:.2f}×** (1-rank run on {base['env']['card']}, {baseline})"]
    save(f"distributed_harvest_{tag}_n{world}", payload)
    print("\n".join(lines) + "\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help="images to harvest (default 16384; 256 with --tiny)")
    parser.add_argument("--batch", type=int, help="images per forward (default 256; 16 with --tiny)")
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--positions", default="patches", choices=["patches", "cls", "all"])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if there is one")
    parser.add_argument("--tiny", action="store_true", help="the tiny random CLIP (smoke test on the CPU)")
    parser.add_argument("--dir", help="folder for the store (default /dev/shm if it has room, else the temp dir)")
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads per rank (default 4)")
    args = parser.parse_args()
    args.images = args.images or (256 if args.tiny else 16384)
    args.batch = args.batch or (16 if args.tiny else 256)
    with torchrun_group(args.device) as device:
        if not dist.is_initialized():
            parser.error("run under torchrun: python3 -m torch.distributed.run --standalone --nproc_per_node N ...")
        rank, world = dist.get_rank(), dist.get_world_size()
        # torchrun leaves a lone rank all cores but gives each of several ranks 1 thread: the same for every run
        # instead (few are needed: the CPU's share of a harvest is preprocessing, in numpy, and copies)
        torch.set_num_threads(args.threads)
        model, hook, source, tag = load(args, device)
        prepare_ips, forward_ips, per_image, row_bytes = alone(model, source, hook, args)
        chosen = [None]
        if rank == 0:
            need = per_image * row_bytes * args.images
            chosen = [str(store_dir(args.dir, need) / f"hooked_vlm_bench_store_{world}")]
            shutil.rmtree(chosen[0], ignore_errors=True)  # a fresh harvest, not the resumption of an old one
        dist.broadcast_object_list(chosen, src=0)
        path = Path(chosen[0])

        dist.barrier()
        start = time.perf_counter()
        part = harvest_to_store(model, source, hook, path, positions=args.positions, batch_size=args.batch,
                                rank=rank, world_size=world, progress=False, model_name=f"{tag} (random weights)")
        part_s = time.perf_counter() - start
        dist.barrier()
        if rank == 0:
            merge_stores(path)
        dist.barrier()
        job_s = time.perf_counter() - start

        first, stop = part.image_range
        mine = {"rank": rank, "device": device, "images": stop - first, "seconds": round(part_s, 3),
                "images_per_s": round((stop - first) / part_s, 1), "prepare_images_per_s": round(prepare_ips, 1),
                "forward_images_per_s": round(forward_ips, 1)}
        ranks: list[dict] = [{}] * world
        dist.all_gather_object(ranks, mine)
        if rank == 0:
            try:
                report(tag, args, hook, path, per_image, job_s, ranks)
            finally:
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()


if __name__ == "__main__":
    main()
