"""LLaVA-OneVision-0.5b and Qwen2-VL-2B at real size (random weights, bf16, sdpa): hooked_vlm vs the raw forward.

    python benchmarks/bench_vlm.py [--models llava qwen] [--batch 1 8] [--rounds 20] [--peers [nnsight] [bridge]]
    python benchmarks/bench_vlm.py --models llava --batch 1 --peers nnsight bridge --device cpu --layers 2  # smoke

Inputs are built by hand at the shapes the checkpoints' processors produce (no download): LLaVA-OneVision, one
384×384 image → 2 tiles, 1485 image tokens + 20 text tokens; Qwen2-VL, one 448×448 image → grid 1×32×32,
256 image tokens + 21 text tokens. Rows: raw forward; no hooks; one cached mid LM residual; every residual of both
towers (vs the raw forward with ``output_hidden_states=True``, which only gives the LM's); one LM layer's pattern
(vs the raw model with that layer eager); an additive steering vector; a vision-only request with early stop (vs
the raw vision tower + projector alone). With ``--peers``: the same through nnsight (save one, save all, steer) on a deep copy of the raw model (``NNsight``
replaces the forward of every submodule it wraps, for good);
with ``--peers bridge`` (LLaVA-OneVision only, the one family transformer_lens's TransformerBridge supports): the same
through a TransformerBridge booted around a deep copy of the raw model (same weights; it rewires the copy in place),
switched to eager attention as ``boot_transformers(name)`` loads it, plus that eager copy unwrapped
(``hf_raw_eager``) to split the bridge's cost into eager attention and the wrapper. Every hooked row's note (and the
JSON's ``peer_ratios``) gives hooked median ÷ peer median for the same task, from the same rounds.

``--device cpu --layers N`` is a smoke run (N blocks per tower, fp32, one call per variant, nothing saved): it checks
that every variant runs, not how fast.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_peer_ratios, environment, markdown, run_once, save, time_variants, versions  # noqa: E402

# Offline by design (random weights from shipped configs). The bridge's boot tries to load the checkpoint's processor
# from the hub and, when that fails and torchvision is missing, to pip-install torchvision: fail both at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PIP_NO_INDEX", "1")
os.environ.setdefault("UV_OFFLINE", "1")

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.testing import build, load_config  # noqa: E402

CONFIGS = {
    "llava": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "qwen": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2_5": "Qwen/Qwen2.5-VL-3B-Instruct",  # same inputs as Qwen2-VL (one 448×448 image per prompt)
    "gemma3": "google/gemma-3-4b-it",  # one 896×896 image per prompt: 256 soft tokens
}


def build_model(name: str, device: str, dtype: torch.dtype, layers: int | None = None):
    """The real-size random-weight model; ``layers`` cuts every tower to that many blocks (CPU smoke runs only)."""
    if layers is None:
        return build(CONFIGS[name], device=device, dtype=dtype)
    import transformers
    from transformers import CONFIG_MAPPING

    data = load_config(CONFIGS[name])
    for sub in (data, data.get("text_config") or {}):
        if "num_hidden_layers" in sub:
            sub["num_hidden_layers"] = layers
    vision = data["vision_config"]
    vision["depth" if "depth" in vision else "num_hidden_layers"] = layers
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    with torch.device(device):
        model = getattr(transformers, data["architectures"][0])(config)
    return model.to(dtype).eval()


def llava_inputs(raw, batch: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    config = raw.config
    n_image, n_text = 1485, 20
    text = torch.randint(100, 150000, (batch, n_text), device=device)
    image = torch.full((batch, n_image), config.image_token_id, device=device)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 2, 3, 384, 384, device=device, dtype=dtype),
        "image_sizes": torch.tensor([[384, 384]] * batch, device=device),
    }


def qwen_inputs(raw, batch: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    config = raw.config
    n_image, grid = 256, (1, 32, 32)
    text = torch.randint(100, 150000, (batch, 19), device=device)
    image = torch.full((batch, n_image), config.image_token_id, device=device)
    start = torch.full((batch, 1), config.vision_start_token_id, device=device)
    end = torch.full((batch, 1), config.vision_end_token_id, device=device)
    input_ids = torch.cat([text[:, :5], start, image, end, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "pixel_values": torch.randn(batch * 1024, 1176, device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([grid] * batch, device=device),
    }


def gemma3_inputs(raw, batch: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    config = raw.config
    text = torch.randint(100, 200000, (batch, 20), device=device)
    start = torch.full((batch, 1), config.boi_token_id, device=device)
    image = torch.full((batch, config.mm_tokens_per_image), config.image_token_id, device=device)
    end = torch.full((batch, 1), config.eoi_token_id, device=device)
    input_ids = torch.cat([text[:, :5], start, image, end, text[:, 5:]], dim=1)
    side = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": (input_ids == config.image_token_id).long(),  # the bidirectional image spans
        "pixel_values": torch.randn(batch, 3, side, side, device=device, dtype=dtype),
    }


INPUTS = {"llava": llava_inputs, "qwen": qwen_inputs, "qwen2_5": qwen_inputs, "gemma3": gemma3_inputs}


def vision_only(raw, name: str, inputs: dict):
    if name == "llava":
        return lambda: raw.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=raw.config.vision_feature_layer,
            vision_feature_select_strategy=raw.config.vision_feature_select_strategy,
        )
    if name == "gemma3":
        return lambda: raw.model.get_image_features(pixel_values=inputs["pixel_values"])
    return lambda: raw.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def eager_layer(attention) -> None:
    config = copy.copy(attention.config)
    config._attn_implementation_internal = "eager"
    attention.config = config


# hooked row → the peer rows doing the same task; each hooked row's note gives hooked median ÷ peer median.
PEER_ROWS = {
    "hooked_no_hooks": ["bridge_no_hooks"],
    "hooked_cache_1_resid": ["nnsight_save_1", "bridge_cache_1_resid"],
    "hooked_cache_all_resid": ["nnsight_save_all_lm", "bridge_cache_all_resid"],
    "hooked_pattern_1_layer": ["bridge_pattern_1_layer"],
    "hooked_steer_1": ["nnsight_steer_1", "bridge_steer_1"],
    "hooked_vision_only_early_stop": ["bridge_vision_only_stop_at_layer_0"],
}


def rows_for(name: str, batch: int, rounds: int, peers: list[str], device: str = "cuda", layers: int | None = None):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    raw = build_model(name, device, dtype, layers)
    # the bridge rewires the HF model it is given (wrappers replace its submodules): it gets a copy with the same
    # weights, made before anything else touches ``raw``
    bridge_copy = copy.deepcopy(raw) if "bridge" in peers else None
    model = HookedVLM.from_hf(raw)
    inputs = INPUTS[name](raw, batch, device, dtype)
    lm_layers = raw.config.text_config.num_hidden_layers
    mid = lm_layers // 2
    resid = f"lm.blocks.{mid}.hook_resid_post"
    d_lm = raw.config.text_config.hidden_size
    steer = torch.randn(d_lm, device=device, dtype=dtype)
    one_eager = build_model(name, device, dtype, layers)
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
        if "nnsight" in peers:
            nnsight = nnsight_variants(raw, inputs, mid, steer)
            variants |= nnsight
            baselines |= {k: "hf_raw" for k in nnsight}
            baselines["nnsight_save_all_lm"] = "hf_raw_output_hidden_states"
        if bridge_copy is not None:
            bridge, eager_copy = boot_bridge(bridge_copy, device, dtype)
            bridge_rows, bridge_baselines = bridge_variants(bridge, eager_copy, inputs, mid, steer)
            variants |= bridge_rows
            baselines |= bridge_baselines
            steered = model.run_with_hooks(inputs, fwd_hooks=[(resid, lambda t, hook: t + steer)])
            parity |= {
                "bridge no hooks vs sdpa (max |Δ| logits)": (bridge_rows["bridge_no_hooks"]() - reference).abs().max().item(),
                "bridge no hooks vs raw eager (max |Δ| logits)": (
                    bridge_rows["bridge_no_hooks"]() - bridge_rows["hf_raw_eager"]()
                ).abs().max().item(),
                "bridge steer vs hooked steer (max |Δ| logits)": (bridge_rows["bridge_steer_1"]() - steered).abs().max().item(),
            }
        rows = (time_variants if device == "cuda" else run_once)(variants, baselines, rounds=rounds)
    ratios = add_peer_ratios(rows, PEER_ROWS)
    return rows, parity, ratios


def nnsight_variants(raw, inputs: dict, mid: int, steer: torch.Tensor) -> dict:
    from nnsight import NNsight

    wrapped = NNsight(copy.deepcopy(raw))  # NNsight instruments every submodule of what it wraps, for good
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


def boot_bridge(hf_copy, device: str, dtype: torch.dtype):
    """A TransformerBridge around ``hf_copy`` (LLaVA-OneVision), the way ``boot_transformers(name)`` loads it.

    Booted by name, the bridge loads the model with ``attn_implementation="eager"`` (its multimodal adapters ask for
    it). Handed a loaded model (``hf_model=``) it keeps the model's own attention, and the vision tower's
    ``hook_pattern`` then never fires; so the copy is switched to eager first, as the name path would load it. The
    LM attention is re-implemented by the bridge (eager maths, from HF's projection weights) either way.
    Returns the bridge and a second, unwrapped eager copy (``hf_raw_eager``), to tell eager attention's cost from
    the bridge's own.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from hooked_vlm.testing.llava_onevision import qwen2_tokenizer

    hf_copy.set_attn_implementation("eager")
    eager_copy = copy.deepcopy(hf_copy)
    bridge = TransformerBridge.boot_transformers(
        CONFIGS["llava"],
        hf_model=hf_copy,
        # no hub: a byte-level Qwen2 tokenizer built in memory (inputs are token ids; it is never used to encode)
        tokenizer=qwen2_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"]),
        dtype=dtype,
        device=device,
        hf_config_overrides={"architectures": [type(hf_copy).__name__]},
    )
    return bridge.eval(), eager_copy


def bridge_variants(bridge, eager_copy, inputs: dict, mid: int, steer: torch.Tensor) -> tuple[dict, dict]:
    """The hooked rows' tasks through the bridge's HookedTransformer-style API (its canonical names and aliases)."""
    ids = inputs["input_ids"]
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    resid = f"blocks.{mid}.hook_resid_post"  # alias of blocks.{mid}.hook_out
    # every block output of both towers, by the canonical names both 3.9 and 4.3 register (4.3 adds
    # hook_resid_post aliases on the vision blocks, 3.9 has them on the LM blocks only)
    block_outputs = lambda n: n.endswith(".hook_out") and n.count(".") == (  # noqa: E731
        2 if n.startswith("blocks.") else 3 if n.startswith("vision_encoder.encoder_layers.") else -1
    )
    variants = {
        "hf_raw_eager": lambda: eager_copy(**inputs).logits,
        "bridge_no_hooks": lambda: bridge(ids, **rest),
        "bridge_cache_1_resid": lambda: bridge.run_with_cache(ids, names_filter=resid, **rest),
        "bridge_cache_all_resid": lambda: bridge.run_with_cache(ids, names_filter=block_outputs, **rest),
        "bridge_pattern_1_layer": lambda: bridge.run_with_cache(ids, names_filter=f"blocks.{mid}.attn.hook_pattern", **rest),
        "bridge_steer_1": lambda: bridge.run_with_hooks(ids, fwd_hooks=[(resid, lambda t, hook: t + steer)], **rest),
        # stop_at_layer=0 stops at the first LM block: vision tower, projector and the embedding merge run
        "bridge_vision_only_stop_at_layer_0": lambda: bridge.run_with_cache(
            ids, names_filter="vision_projector.hook_out", stop_at_layer=0, **rest
        ),
    }
    baselines = {
        "hf_raw_eager": "hf_raw",
        "bridge_no_hooks": "hf_raw",
        "bridge_cache_1_resid": "hf_raw",
        "bridge_cache_all_resid": "hf_raw_output_hidden_states",
        "bridge_pattern_1_layer": "hf_raw_one_layer_eager",
        "bridge_steer_1": "hf_raw",
        "bridge_vision_only_stop_at_layer_0": "hf_raw_vision_and_projector",
    }
    return variants, baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llava", "qwen"], choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--peers", nargs="*", choices=["nnsight", "bridge"], default=None,
        help="peer libraries timed in the same rounds; bare --peers means nnsight (bridge: LLaVA-OneVision only)",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run (see above)")
    parser.add_argument("--layers", type=int, default=None, help="blocks per tower (smoke runs); default: the config's")
    args = parser.parse_args()
    peers = ["nnsight"] if args.peers == [] else (args.peers or [])
    smoke = args.device == "cpu"
    env = environment() | versions("transformer_lens", "nnsight")
    print(f"card: {env['card']}; torch {env['torch']}; transformers {env['transformers']}; "
          + "; ".join(f"{k} {env[k]}" for k in ("nnsight", "transformer_lens") if k in env))
    for name in args.models:
        model_peers = [p for p in peers if p != "bridge" or name == "llava"]
        if model_peers != peers:
            print(f"{CONFIGS[name]}: no TransformerBridge rows (transformer_lens has no adapter for this architecture)")
        for batch in args.batch:
            rows, parity, ratios = rows_for(name, batch, args.rounds, model_peers, args.device, args.layers)
            with_ = ", ".join(
                {"nnsight": f"nnsight {env.get('nnsight')}", "bridge": f"TransformerBridge (transformer_lens "
                 f"{env.get('transformer_lens')}, eager)"}[p] for p in model_peers
            )
            title = (f"{CONFIGS[name]} (random weights), batch {batch}, "
                     f"{'CPU SMOKE (fp32, ' + str(args.layers) + ' blocks per tower; not a measurement)' if smoke else 'bf16 sdpa'}"
                     f"{', with ' + with_ if with_ else ''} ({env['card']})")
            if not smoke:
                save(f"vlm_{name}_b{batch}", {"env": env, "rows": rows, "parity": parity, "peer_ratios": ratios})
            print(markdown(title, rows, f"parity: {parity}"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
