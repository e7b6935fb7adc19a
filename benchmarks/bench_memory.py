"""GPU memory of caching a 7k-token LLaVA-OneVision prompt (real-size config, random weights, bf16, sdpa).

    python benchmarks/bench_memory.py [--model llava-hf/llava-onevision-qwen2-7b-ov-hf] [--side 1152]

One ``side``×``side`` image (1152 → 10 tiles → 7371 image tokens with anyres_max_9) and a short prompt. Each row
runs once after a warm-up, from an emptied allocator, and reports the peak GPU memory, the cache's bytes and where
they live, and the wall time; a row that runs out of memory says so and the next row starts clean:

* the raw forward, and the raw forward with ``output_hidden_states=True``;
* the naive cache, everything (``run_with_cache(x)``, TransformerLens's default: every hook incl. all patterns);
* every LM residual (``hook_resid_pre/mid/post`` of every block) kept on the GPU, offloaded with a blocking
  ``.cpu()`` per hook (plain hooks), and with ``device="cpu"`` (pinned host memory, copies that do not stop the
  forward); then only the image tokens' positions; then every LM pattern of one head at the text queries.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, save  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.testing import build  # noqa: E402

GIB = 2**30
RESIDUALS = "lm.blocks.*.hook_resid_*"


def prompt_inputs(raw, side: int, n_text: int = 24) -> dict:
    """A one-image prompt at the shapes the checkpoint's processor gives a ``side``×``side`` image."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = raw.config
    tile = config.vision_config.image_size
    n_tiles = image_size_to_num_patches((side, side), config.image_grid_pinpoints, tile)
    pixel_values = torch.randn(1, n_tiles, 3, tile, tile, device="cuda", dtype=torch.bfloat16)
    image_sizes = torch.tensor([[side, side]], device="cuda")
    with torch.no_grad():  # the number of image tokens, as the model itself packs them
        features = raw.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    n_image = sum(len(f) for f in features.pooler_output)
    text = torch.randint(0, config.image_token_id, (1, n_text), device="cuda")  # ids below the special tokens
    image = torch.full((1, n_image), config.image_token_id, device="cuda")
    input_ids = torch.cat([text[:, :6], image, text[:, 6:]], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            "image_sizes": image_sizes}


def cache_bytes(cache) -> dict[str, float]:
    where: dict[str, float] = {}
    for tensor in cache.values():
        place = "pinned cpu" if tensor.device.type == "cpu" and tensor.is_pinned() else tensor.device.type
        where[place] = where.get(place, 0.0) + tensor.numel() * tensor.element_size() / GIB
    return {k: round(v, 2) for k, v in where.items()}


def measure(name: str, fn) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            cache = fn()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:
        row = {"row": name, "result": "out of GPU memory", "error": str(error).splitlines()[0][:160]}
    else:
        row = {"row": name, "result": "ok", "seconds": round(time.perf_counter() - start, 2),
               "n_tensors": len(cache) if cache is not None else 0,
               "cache_gib": cache_bytes(cache) if cache is not None else {}}
        del cache
    row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-hf/llava-onevision-qwen2-7b-ov-hf")
    parser.add_argument("--side", type=int, default=1152)
    args = parser.parse_args()
    env = environment()
    raw = build(args.model, device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    x = prompt_inputs(raw, args.side)
    prepared = model.prepare_inputs(x)
    n_tokens = x["input_ids"].shape[1]
    weights = torch.cuda.memory_allocated() / GIB
    n_image = int(prepared.layout.mask("image", "lm.blocks.0.hook_resid_post").sum())
    print(f"{args.model}: {n_tokens} tokens ({n_image} image), weights "
          f"{weights:.1f} GiB on {env['card']}", flush=True)
    with torch.no_grad():
        model.run_with_cache(prepared, names_filter=RESIDUALS, device="cpu")  # warm-up: kernels, pinned pool

    def blocking_offload():
        cache = {}

        def keep(tensor, hook):
            cache[hook.name] = tensor.detach().cpu()

        model.run_with_hooks(prepared, fwd_hooks=[(RESIDUALS, keep)])
        return cache

    def raw_forward():
        raw(**x)

    rows = [
        measure("raw forward", raw_forward),
        measure("raw forward, output_hidden_states=True",
                lambda: dict(enumerate(raw(**x, output_hidden_states=True).hidden_states))),
        measure("naive: run_with_cache(x), every hook on the GPU", lambda: model.run_with_cache(prepared)[1]),
        measure("every LM residual on the GPU", lambda: model.run_with_cache(prepared, names_filter=RESIDUALS)[1]),
        measure("every LM residual, blocking .cpu() per hook", blocking_offload),
        measure("every LM residual, device='cpu' (pinned, non-blocking)",
                lambda: model.run_with_cache(prepared, names_filter=RESIDUALS, device="cpu")[1]),
        measure("every LM residual, image tokens only, on the GPU",
                lambda: model.run_with_cache(prepared, names_filter=RESIDUALS, positions="image")[1]),
        measure("every LM pattern, head 0, text queries, device='cpu'",
                lambda: model.run_with_cache(prepared, names_filter="lm.blocks.*.attn.hook_pattern", heads=[0],
                                             positions="text", device="cpu")[1]),
    ]
    save(f"memory_{args.model.split('/')[-1]}_{n_tokens}tok", {"env": env, "n_tokens": n_tokens,
                                                                  "weights_gib": round(weights, 2),
                                                                  "rows": {row["row"]: row for row in rows}})
    print(f"\n### {args.model}, one {args.side}×{args.side} image, {n_tokens} tokens, bf16 ({env['card']})\n")
    print("| what | result | peak GPU GiB | cache GiB (where) | s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['result']} | {row['peak_gpu_gib']} | {row.get('cache_gib', '—')} | "
              f"{row.get('seconds', '—')} |")


if __name__ == "__main__":
    main()
