"""CLIP ViT-L/14 at real size (random weights, bf16, sdpa): hooked_vlm against the raw forward, same process.

    python benchmarks/bench_clip.py [--batch 64 256] [--rounds 20]

Rows (image tower only, as harvesting and probing use it): the raw forward; hooked_vlm with no hooks; one cached
mid-layer residual; every block's residual cached (against the raw forward with ``output_hidden_states=True``);
one layer's attention pattern (against the raw model with that one layer switched to eager); an additive
steering vector; and a cached residual with early stop (against the raw forward). Ratios are medians over
interleaved rounds measured with CUDA events. Results go to $OUT (JSON) and stdout (markdown).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown, save, time_variants  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.testing import build  # noqa: E402

MID = 12


def eager_layer(raw_layer_attention):
    """Switch one HF attention module to eager by giving it its own config copy (the raw baseline for patterns)."""
    config = copy.copy(raw_layer_attention.config)
    config._attn_implementation_internal = "eager"
    raw_layer_attention.config = config


def hf_rows(batch: int, rounds: int) -> tuple[list, dict]:
    raw = build("openai/clip-vit-large-patch14", device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    steer = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    raw_eager_one = build("openai/clip-vit-large-patch14", device="cuda", dtype=torch.bfloat16)
    raw_eager_one.load_state_dict(raw.state_dict())
    eager_layer(raw_eager_one.vision_model.encoder.layers[MID].self_attn)
    resid = f"vision.blocks.{MID}.hook_resid_post"

    with torch.no_grad():
        reference = raw.get_image_features(pixel_values=x).pooler_output
        parity = {
            "no hooks (max |Δ|)": (model(x) - reference).abs().max().item(),
            "pattern captured (max |Δ|)": (
                model.run_with_cache(x, names_filter=f"vision.blocks.{MID}.attn.hook_pattern", stop_early=False)[0]
                - raw_eager_one.get_image_features(pixel_values=x).pooler_output
            ).abs().max().item(),
            "all residuals vs hidden_states (max |Δ|)": max(
                (model.run_with_cache(x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False)[1][f"vision.blocks.{i}.hook_resid_post"]
                 - raw.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[i + 1]).abs().max().item()
                for i in (0, MID, 23)
            ),
        }

        variants = {
            "hf_raw": lambda: raw.get_image_features(pixel_values=x),
            "hf_raw_output_hidden_states": lambda: raw.vision_model(pixel_values=x, output_hidden_states=True),
            "hf_raw_one_layer_eager": lambda: raw_eager_one.get_image_features(pixel_values=x),
            "hooked_no_hooks": lambda: model(x),
            "hooked_cache_1_resid": lambda: model.run_with_cache(x, names_filter=resid, stop_early=False),
            "hooked_cache_all_resid": lambda: model.run_with_cache(
                x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False
            ),
            "hooked_pattern_1_layer": lambda: model.run_with_cache(
                x, names_filter=f"vision.blocks.{MID}.attn.hook_pattern", stop_early=False
            ),
            "hooked_steer_1": lambda: model.run_with_hooks(x, fwd_hooks=[(resid, lambda t, hook: t + steer)]),
            "hooked_cache_1_resid_early_stop": lambda: model.run_with_cache(x, names_filter=resid),
        }
        baselines = {
            "hooked_no_hooks": "hf_raw",
            "hooked_cache_1_resid": "hf_raw",
            "hooked_cache_all_resid": "hf_raw_output_hidden_states",
            "hooked_pattern_1_layer": "hf_raw_one_layer_eager",
            "hooked_steer_1": "hf_raw",
            "hooked_cache_1_resid_early_stop": "hf_raw",
            "hf_raw_output_hidden_states": "hf_raw",
            "hf_raw_one_layer_eager": "hf_raw",
        }
        rows = time_variants(variants, baselines, rounds=rounds)
    for row in rows:
        if row.variant in ("hf_raw", "hooked_no_hooks"):
            row.note = f"{batch / row.median_ms * 1000:.0f} images/s"
    return rows, parity


def open_clip_rows(batch: int, rounds: int) -> tuple[list, dict]:
    raw = build("open_clip:ViT-L-14", device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    resid = f"vision.blocks.{MID}.hook_resid_post"
    with torch.no_grad():
        parity = {"no hooks (max |Δ|)": (model(x) - raw.encode_image(x)).abs().max().item()}
        variants = {
            "open_clip_raw": lambda: raw.encode_image(x),
            "hooked_no_hooks": lambda: model(x),
            "hooked_cache_1_resid": lambda: model.run_with_cache(x, names_filter=resid, stop_early=False),
            "hooked_cache_all_resid": lambda: model.run_with_cache(
                x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False
            ),
            "hooked_pattern_1_layer": lambda: model.run_with_cache(
                x, names_filter=f"vision.blocks.{MID}.attn.hook_pattern", stop_early=False
            ),
        }
        baselines = {name: "open_clip_raw" for name in variants if name != "open_clip_raw"}
        rows = time_variants(variants, baselines, rounds=rounds)
    for row in rows:
        if row.variant in ("open_clip_raw", "hooked_no_hooks"):
            row.note = f"{batch / row.median_ms * 1000:.0f} images/s"
    return rows, parity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-open-clip", action="store_true")
    args = parser.parse_args()
    env = environment()
    print(f"card: {env['card']}; torch {env['torch']}; transformers {env['transformers']}")
    for batch in args.batch:
        rows, parity = hf_rows(batch, args.rounds)
        save(f"clip_hf_b{batch}", {"env": env, "rows": rows, "parity": parity})
        print(markdown(f"HF CLIPModel ViT-L/14, batch {batch}, bf16 sdpa ({env['card']})", rows, f"parity: {parity}"))
        torch.cuda.empty_cache()
        if not args.skip_open_clip:
            rows, parity = open_clip_rows(batch, args.rounds)
            save(f"clip_open_clip_b{batch}", {"env": env, "rows": rows, "parity": parity})
            print(markdown(f"open_clip ViT-L-14, batch {batch}, bf16 ({env['card']})", rows, f"parity: {parity}"))
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
