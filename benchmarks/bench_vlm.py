"""LLaVA-OneVision-0.5b and Qwen2-VL-2B at real size (random weights, bf16, sdpa): hooked_vlm vs the raw forward.

    python benchmarks/bench_vlm.py [--models llava qwen] [--batch 1 8] [--rounds 20] [--peers]

Inputs are built by hand at the shapes the checkpoints' processors produce (no download): LLaVA-OneVision, one
384×384 image → 2 tiles, 1485 image tokens + 20 text tokens; Qwen2-VL, one 448×448 image → grid 1×32×32,
256 image tokens + 21 text tokens. Rows: raw forward; no hooks; one cached mid LM residual; every residual of both
towers (vs the raw forward with ``output_hidden_states=True``, which only gives the LM's); one LM layer's pattern
(vs the raw model with that layer eager); an additive steering vector; a vision-only request with early stop (vs
the raw vision tower + projector alone). With ``--peers``: the same through nnsight (save one, save all, steer).
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

CONFIGS = {"llava": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "qwen": "Qwen/Qwen2-VL-2B-Instruct"}


def llava_inputs(raw, batch: int) -> dict:
    config = raw.config
    n_image, n_text = 1485, 20
    text = torch.randint(100, 150000, (batch, n_text), device="cuda")
    image = torch.full((batch, n_image), config.image_token_id, device="cuda")
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 2, 3, 384, 384, device="cuda", dtype=torch.bfloat16),
        "image_sizes": torch.tensor([[384, 384]] * batch, device="cuda"),
    }


def qwen_inputs(raw, batch: int) -> dict:
    config = raw.config
    n_image, grid = 256, (1, 32, 32)
    text = torch.randint(100, 150000, (batch, 19), device="cuda")
    image = torch.full((batch, n_image), config.image_token_id, device="cuda")
    start = torch.full((batch, 1), config.vision_start_token_id, device="cuda")
    end = torch.full((batch, 1), config.vision_end_token_id, device="cuda")
    input_ids = torch.cat([text[:, :5], start, image, end, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "pixel_values": torch.randn(batch * 1024, 1176, device="cuda", dtype=torch.bfloat16),
        "image_grid_thw": torch.tensor([grid] * batch, device="cuda"),
    }


def vision_only(raw, name: str, inputs: dict):
    if name == "llava":
        return lambda: raw.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=raw.config.vision_feature_layer,
            vision_feature_select_strategy=raw.config.vision_feature_select_strategy,
        )
    return lambda: raw.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def eager_layer(attention) -> None:
    config = copy.copy(attention.config)
    config._attn_implementation_internal = "eager"
    attention.config = config


def rows_for(name: str, batch: int, rounds: int, peers: bool):
    raw = build(CONFIGS[name], device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    inputs = (llava_inputs if name == "llava" else qwen_inputs)(raw, batch)
    lm_layers = raw.config.text_config.num_hidden_layers
    mid = lm_layers // 2
    resid = f"lm.blocks.{mid}.hook_resid_post"
    d_lm = raw.config.text_config.hidden_size
    steer = torch.randn(d_lm, device="cuda", dtype=torch.bfloat16)
    one_eager = build(CONFIGS[name], device="cuda", dtype=torch.bfloat16)
    one_eager.load_state_dict(raw.state_dict())
    eager_layer(one_eager.model.language_model.layers[mid].self_attn)
    forward = lambda m: m(**inputs).logits  # noqa: E731

    with torch.no_grad():
        reference = forward(raw)
        parity = {
            "no hooks (max |Δ| logits)": (model(inputs) - reference).abs().max().item(),
            "one cached hook (max |Δ| logits)": (
                model.run_with_cache(inputs, names_filter=resid, stop_early=False)[0] - reference
            ).abs().max().item(),
            # against sdpa, not the one-layer-eager copy: HF's eager function applies no causal mask when the model
            # (on sdpa) hands it none, so that copy is a timing baseline only
            "pattern captured vs sdpa (max |Δ| logits, bf16)": (
                model.run_with_cache(inputs, names_filter=f"lm.blocks.{mid}.attn.hook_pattern", stop_early=False)[0]
                - reference
            ).abs().max().item(),
            "max |logits|": reference.abs().max().item(),
        }
        all_resid = lambda n: n.endswith("hook_resid_post") and (n.startswith("lm.") or n.startswith("vision."))  # noqa: E731
        variants = {
            "hf_raw": lambda: forward(raw),
            "hf_raw_output_hidden_states": lambda: raw(**inputs, output_hidden_states=True),
            "hf_raw_one_layer_eager": lambda: forward(one_eager),
            "hf_raw_vision_and_projector": vision_only(raw, name, inputs),
            "hooked_no_hooks": lambda: model(inputs),
            "hooked_cache_1_resid": lambda: model.run_with_cache(inputs, names_filter=resid, stop_early=False),
            "hooked_cache_all_resid": lambda: model.run_with_cache(inputs, names_filter=all_resid, stop_early=False),
            "hooked_pattern_1_layer": lambda: model.run_with_cache(
                inputs, names_filter=f"lm.blocks.{mid}.attn.hook_pattern", stop_early=False
            ),
            "hooked_steer_1": lambda: model.run_with_hooks(inputs, fwd_hooks=[(resid, lambda t, hook: t + steer)]),
            "hooked_vision_only_early_stop": lambda: model.run_with_cache(inputs, names_filter="projector.hook_out"),
        }
        baselines = {
            "hf_raw_output_hidden_states": "hf_raw",
            "hf_raw_one_layer_eager": "hf_raw",
            "hf_raw_vision_and_projector": "hf_raw",
            "hooked_no_hooks": "hf_raw",
            "hooked_cache_1_resid": "hf_raw",
            "hooked_cache_all_resid": "hf_raw_output_hidden_states",
            "hooked_pattern_1_layer": "hf_raw_one_layer_eager",
            "hooked_steer_1": "hf_raw",
            "hooked_vision_only_early_stop": "hf_raw_vision_and_projector",
        }
        if peers:
            variants |= nnsight_variants(raw, inputs, mid, steer)
            baselines |= {k: "hf_raw" for k in variants if k.startswith("nnsight")}
            baselines["nnsight_save_all_lm"] = "hf_raw_output_hidden_states"
        rows = time_variants(variants, baselines, rounds=rounds)
    return rows, parity


def nnsight_variants(raw, inputs: dict, mid: int, steer: torch.Tensor) -> dict:
    from nnsight import NNsight

    wrapped = NNsight(raw)
    layers = wrapped.model.language_model.layers

    def save_one():
        with wrapped.trace(**inputs):
            saved = layers[mid].output.save()
        return saved

    def save_all():
        saved = []  # made outside the trace: nnsight runs the block's body in its own frame
        with wrapped.trace(**inputs):
            for layer in layers:
                saved.append(layer.output.save())
        return saved

    def steer_one():
        with wrapped.trace(**inputs):
            layers[mid].output = layers[mid].output + steer
            logits = wrapped.output.logits.save()
        return logits

    return {"nnsight_save_1": save_one, "nnsight_save_all_lm": save_all, "nnsight_steer_1": steer_one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llava", "qwen"], choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peers", action="store_true")
    args = parser.parse_args()
    env = environment()
    print(f"card: {env['card']}; torch {env['torch']}; transformers {env['transformers']}")
    for name in args.models:
        for batch in args.batch:
            rows, parity = rows_for(name, batch, args.rounds, args.peers)
            save(f"vlm_{name}_b{batch}", {"env": env, "rows": rows, "parity": parity})
            print(markdown(f"{CONFIGS[name]} (random weights), batch {batch}, bf16 sdpa ({env['card']})", rows, f"parity: {parity}"))
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
