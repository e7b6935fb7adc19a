"""CLIP ViT-L/14 at real size (random weights, bf16, sdpa): hooked_vlm against the raw forward, same process.

    python benchmarks/bench_clip.py [--batch 64 256] [--rounds 20] [--peers [nnsight]] [--skip-open-clip]
    python benchmarks/bench_clip.py --batch 2 --peers nnsight --device cpu --layers 2  # smoke

Rows (image tower only, as harvesting and probing use it): the raw forward; hooked_vlm with no hooks; one cached
mid-layer residual; every block's residual cached (against the raw forward with ``output_hidden_states=True``);
one layer's attention pattern (against the raw model with that one layer switched to eager); an additive
steering vector; and a cached residual with early stop (against the raw forward). Ratios are medians over
interleaved rounds measured with CUDA events. Results go to $OUT (JSON) and stdout (markdown).

With ``--peers nnsight``: the same tasks through nnsight, timed in the same rounds, on an ``NNsight`` wrapper around
a deep copy of the raw model (same weights; nnsight installs its controller as every submodule's ``forward`` for
good, so the raw rows keep the untouched model). Each trace runs the method the raw row runs
(``fn="get_image_features"`` / ``fn="encode_image"``): an empty trace that saves the result; the mid layer's output
saved; every encoder layer's output saved; the mid layer's output replaced by output + v; the mid layer's output
saved then ``tracer.stop()``; and the mid layer's pattern, on a copy of the one-layer-eager model with
``self_attn.output[1]`` saved (HF; under sdpa that slot is None, so switching the layer to eager is what an nnsight
user has to do) or, for open_clip, with that block's ``nn.MultiheadAttention`` call edited through ``.inputs`` to
``need_weights=True, average_attn_weights=False`` and ``attn.output[1]`` saved. open_clip has no hooked steer or
early-stop rows, so no nnsight ones either. transformer_lens's TransformerBridge has no adapter for a stand-alone
CLIP, so nnsight is the only peer. Every hooked row's note (and the JSON's ``peer_ratios``) gives hooked median ÷
peer median for the same task; the parity dict gives each nnsight value against the hooked one (max |Δ|).

``--device cpu --layers N`` is a smoke run (N blocks per tower, fp32, one call per variant, nothing saved): it checks
that every variant runs, not how fast.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_peer_ratios, environment, markdown, max_diff, run_once, save, time_variants, versions  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.testing import build, load_config  # noqa: E402

HF_NAME = "openai/clip-vit-large-patch14"
OPEN_CLIP_NAME = "open_clip:ViT-L-14"

# hooked row → the peer rows doing the same task; each hooked row's note gives hooked median ÷ peer median.
PEER_ROWS = {
    "hooked_no_hooks": ["nnsight_empty_trace"],
    "hooked_cache_1_resid": ["nnsight_save_1"],
    "hooked_cache_all_resid": ["nnsight_save_all"],
    "hooked_pattern_1_layer": ["nnsight_pattern_1_layer"],
    "hooked_steer_1": ["nnsight_steer_1"],
    "hooked_cache_1_resid_early_stop": ["nnsight_save_1_early_stop"],
}


def build_clip(name: str, device: str, dtype: torch.dtype, layers: int | None = None):
    """The real-size random-weight model; ``layers`` cuts both towers to that many blocks (CPU smoke runs only)."""
    if layers is None:
        return build(name, device=device, dtype=dtype)
    data = load_config(name)
    if data.get("library") == "open_clip":
        import open_clip
        from open_clip.model import CLIP

        config = open_clip.get_model_config(data["model"])
        config["vision_cfg"]["layers"] = layers
        config["text_cfg"]["layers"] = layers
        with torch.device(device):
            model = CLIP(**config, **data.get("kwargs", {}))
    else:
        import transformers
        from transformers import CONFIG_MAPPING

        for sub in ("vision_config", "text_config"):
            data[sub]["num_hidden_layers"] = layers
        config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
        with torch.device(device):
            model = getattr(transformers, data["architectures"][0])(config)
    return model.to(dtype).eval()


def eager_layer(raw_layer_attention):
    """Switch one HF attention module to eager by giving it its own config copy (the raw baseline for patterns)."""
    config = copy.copy(raw_layer_attention.config)
    config._attn_implementation_internal = "eager"
    raw_layer_attention.config = config


def nnsight_saves(wrapped, blocks, mid: int, *args, **kwargs) -> dict:
    """The empty trace and the saves through nnsight, alike for both CLIPs; ``args`` / ``kwargs`` go to ``trace``."""

    def empty_trace():
        with wrapped.trace(*args, **kwargs) as tracer:
            result = tracer.result.save()
        return result

    def save_one():
        with wrapped.trace(*args, **kwargs):
            saved = blocks[mid].output.save()
        return saved

    def save_all():
        saved = []  # made outside the trace: nnsight runs the block's body in its own frame
        with wrapped.trace(*args, **kwargs):
            for block in blocks:
                saved.append(block.output.save())
        return saved

    return {"nnsight_empty_trace": empty_trace, "nnsight_save_1": save_one, "nnsight_save_all": save_all}


def nnsight_hf_variants(raw, raw_eager_one, x: torch.Tensor, mid: int, steer: torch.Tensor) -> dict:
    """The hooked rows' tasks through nnsight, on deep copies (the wrapper instruments the module it is given)."""
    from nnsight import NNsight

    wrapped = NNsight(copy.deepcopy(raw))
    wrapped_eager = NNsight(copy.deepcopy(raw_eager_one))  # layer ``mid`` eager, as in hf_raw_one_layer_eager
    layers = wrapped.vision_model.encoder.layers
    fn = "get_image_features"  # what hf_raw runs (CLIPModel.forward would want text too)

    def steer_one():
        with wrapped.trace(pixel_values=x, fn=fn) as tracer:
            layers[mid].output = layers[mid].output + steer
            result = tracer.result.save()
        return result

    def save_one_early_stop():
        with wrapped.trace(pixel_values=x, fn=fn) as tracer:
            saved = layers[mid].output.save()
            tracer.stop()
        return saved

    def pattern_one():
        with wrapped_eager.trace(pixel_values=x, fn=fn):
            pattern = wrapped_eager.vision_model.encoder.layers[mid].self_attn.output[1].save()
        return pattern

    return nnsight_saves(wrapped, layers, mid, pixel_values=x, fn=fn) | {
        "nnsight_pattern_1_layer": pattern_one,
        "nnsight_steer_1": steer_one,
        "nnsight_save_1_early_stop": save_one_early_stop,
    }


def hf_rows(batch: int, rounds: int, peers: list[str], device: str = "cuda", layers: int | None = None):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    raw = build_clip(HF_NAME, device, dtype, layers)
    model = HookedVLM.from_hf(raw)
    vision = raw.config.vision_config
    mid = vision.num_hidden_layers // 2  # 12 of ViT-L/14's 24
    size = vision.image_size
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    steer = torch.randn(vision.hidden_size, device=device, dtype=dtype)
    raw_eager_one = build_clip(HF_NAME, device, dtype, layers)
    raw_eager_one.load_state_dict(raw.state_dict())
    eager_layer(raw_eager_one.vision_model.encoder.layers[mid].self_attn)
    resid = f"vision.blocks.{mid}.hook_resid_post"
    pattern = f"vision.blocks.{mid}.attn.hook_pattern"
    last = vision.num_hidden_layers - 1

    with torch.no_grad():
        reference = raw.get_image_features(pixel_values=x).pooler_output
        parity = {
            "no hooks (max |Δ|)": (model(x) - reference).abs().max().item(),
            "pattern captured (max |Δ|)": (
                model.run_with_cache(x, names_filter=pattern, stop_early=False)[0]
                - raw_eager_one.get_image_features(pixel_values=x).pooler_output
            ).abs().max().item(),
            "all residuals vs hidden_states (max |Δ|)": max(
                (model.run_with_cache(x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False)[1][f"vision.blocks.{i}.hook_resid_post"]
                 - raw.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[i + 1]).abs().max().item()
                for i in sorted({0, mid, last})
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
            "hooked_pattern_1_layer": lambda: model.run_with_cache(x, names_filter=pattern, stop_early=False),
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
        if "nnsight" in peers:
            nnsight = nnsight_hf_variants(raw, raw_eager_one, x, mid, steer)
            variants |= nnsight
            baselines |= {k: "hf_raw" for k in nnsight}
            baselines["nnsight_save_all"] = "hf_raw_output_hidden_states"
            baselines["nnsight_pattern_1_layer"] = "hf_raw_one_layer_eager"
            # residuals and pattern from separate runs: capturing the pattern recomputes that layer's attention
            # eagerly, which moves its output by bf16 rounding
            cache = model.run_with_cache(x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False)[1]
            hooked_pattern = model.run_with_cache(x, names_filter=pattern, stop_early=False)[1][pattern]
            saved_all = nnsight["nnsight_save_all"]()
            steered = model.run_with_hooks(x, fwd_hooks=[(resid, lambda t, hook: t + steer)])
            parity |= {
                "nnsight empty trace vs raw (max |Δ|)": max_diff(nnsight["nnsight_empty_trace"]().pooler_output, reference),
                "nnsight save_1 vs hooked cache (max |Δ|)": max_diff(nnsight["nnsight_save_1"](), cache[resid]),
                "nnsight save_all vs hooked cache (max |Δ|, every layer)": max(
                    max_diff(saved, cache[f"vision.blocks.{i}.hook_resid_post"]) for i, saved in enumerate(saved_all)
                ),
                "nnsight pattern (eager layer, self_attn.output[1]) vs hooked pattern (max |Δ|)": max_diff(
                    nnsight["nnsight_pattern_1_layer"](), hooked_pattern
                ),
                "nnsight steer vs hooked steer (max |Δ| image embeds)": max_diff(
                    nnsight["nnsight_steer_1"]().pooler_output, steered
                ),
                "nnsight save_1 early stop vs hooked cache (max |Δ|)": max_diff(
                    nnsight["nnsight_save_1_early_stop"](), cache[resid]
                ),
            }
            del cache, hooked_pattern, saved_all, steered
        rows = (time_variants if device == "cuda" else run_once)(variants, baselines, rounds=rounds)
    for row in rows:
        if row.variant in ("hf_raw", "hooked_no_hooks"):
            row.note = f"{batch / row.median_ms * 1000:.0f} images/s"
    ratios = add_peer_ratios(rows, PEER_ROWS)
    return rows, parity, ratios


def nnsight_open_clip_variants(raw, x: torch.Tensor, mid: int) -> dict:
    from nnsight import NNsight

    wrapped = NNsight(copy.deepcopy(raw))
    blocks = wrapped.visual.transformer.resblocks
    fn = "encode_image"  # what open_clip_raw runs

    def pattern_one():
        # the block calls its nn.MultiheadAttention with need_weights=False: ask it for per-head weights instead
        with wrapped.trace(x, fn=fn):
            args, kwargs = blocks[mid].attn.inputs
            blocks[mid].attn.inputs = (args, {**kwargs, "need_weights": True, "average_attn_weights": False})
            pattern = blocks[mid].attn.output[1].save()
        return pattern

    return nnsight_saves(wrapped, blocks, mid, x, fn=fn) | {"nnsight_pattern_1_layer": pattern_one}


def open_clip_rows(batch: int, rounds: int, peers: list[str], device: str = "cuda", layers: int | None = None):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    raw = build_clip(OPEN_CLIP_NAME, device, dtype, layers)
    model = HookedVLM.from_hf(raw)
    mid = len(raw.visual.transformer.resblocks) // 2
    size = raw.visual.image_size[0]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    resid = f"vision.blocks.{mid}.hook_resid_post"
    pattern = f"vision.blocks.{mid}.attn.hook_pattern"
    with torch.no_grad():
        reference = raw.encode_image(x)
        parity = {"no hooks (max |Δ|)": (model(x) - reference).abs().max().item()}
        variants = {
            "open_clip_raw": lambda: raw.encode_image(x),
            "hooked_no_hooks": lambda: model(x),
            "hooked_cache_1_resid": lambda: model.run_with_cache(x, names_filter=resid, stop_early=False),
            "hooked_cache_all_resid": lambda: model.run_with_cache(
                x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False
            ),
            "hooked_pattern_1_layer": lambda: model.run_with_cache(x, names_filter=pattern, stop_early=False),
        }
        if "nnsight" in peers:
            nnsight = nnsight_open_clip_variants(raw, x, mid)
            variants |= nnsight
            # residuals and pattern from separate runs: capturing the pattern recomputes that layer's attention
            # eagerly, which moves its output by bf16 rounding
            cache = model.run_with_cache(x, names_filter="vision.blocks.*.hook_resid_post", stop_early=False)[1]
            hooked_pattern = model.run_with_cache(x, names_filter=pattern, stop_early=False)[1][pattern]
            saved_all = nnsight["nnsight_save_all"]()
            parity |= {
                "nnsight empty trace vs raw (max |Δ|)": max_diff(nnsight["nnsight_empty_trace"](), reference),
                "nnsight save_1 vs hooked cache (max |Δ|)": max_diff(nnsight["nnsight_save_1"](), cache[resid]),
                "nnsight save_all vs hooked cache (max |Δ|, every block)": max(
                    max_diff(saved, cache[f"vision.blocks.{i}.hook_resid_post"]) for i, saved in enumerate(saved_all)
                ),
                "nnsight pattern (need_weights=True) vs hooked pattern (max |Δ|)": max_diff(
                    nnsight["nnsight_pattern_1_layer"](), hooked_pattern
                ),
            }
            del cache, hooked_pattern, saved_all
        baselines = {name: "open_clip_raw" for name in variants if name != "open_clip_raw"}
        rows = (time_variants if device == "cuda" else run_once)(variants, baselines, rounds=rounds)
    for row in rows:
        if row.variant in ("open_clip_raw", "hooked_no_hooks"):
            row.note = f"{batch / row.median_ms * 1000:.0f} images/s"
    ratios = add_peer_ratios(rows, PEER_ROWS)
    return rows, parity, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-open-clip", action="store_true")
    parser.add_argument(
        "--peers", nargs="*", choices=["nnsight"], default=None,
        help="peer libraries timed in the same rounds; bare --peers means nnsight (TransformerBridge has no CLIP)",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run (see above)")
    parser.add_argument("--layers", type=int, default=None, help="blocks per tower (smoke runs); default: the config's")
    args = parser.parse_args()
    peers = ["nnsight"] if args.peers == [] else (args.peers or [])
    smoke = args.device == "cpu"
    env = environment() | versions("nnsight", "open_clip_torch")
    print(f"card: {env['card']}; torch {env['torch']}; transformers {env['transformers']}"
          + "".join(f"; {k} {env[k]}" for k in ("nnsight", "open_clip_torch") if k in env))
    if smoke:
        mode = f"CPU SMOKE (fp32, {args.layers or 'all'} blocks per tower; not a measurement)"
    else:
        mode = "bf16 sdpa"
    with_ = f", with nnsight {env.get('nnsight')}" if "nnsight" in peers else ""
    for batch in args.batch:
        rows, parity, ratios = hf_rows(batch, args.rounds, peers, args.device, args.layers)
        if not smoke:
            save(f"clip_hf_b{batch}", {"env": env, "rows": rows, "parity": parity, "peer_ratios": ratios})
        print(markdown(f"HF CLIPModel ViT-L/14, batch {batch}, {mode}{with_} ({env['card']})", rows, f"parity: {parity}"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not args.skip_open_clip:
            rows, parity, ratios = open_clip_rows(batch, args.rounds, peers, args.device, args.layers)
            if not smoke:
                save(f"clip_open_clip_b{batch}", {"env": env, "rows": rows, "parity": parity, "peer_ratios": ratios})
            oc_mode = mode.replace(" sdpa", "")
            print(markdown(f"open_clip ViT-L-14, batch {batch}, {oc_mode}{with_} ({env['card']})", rows, f"parity: {parity}"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
