"""Residual patching sweep on LLaVA-OneVision-0.5b at real size (random weights, bf16): batched vs one forward each.

    python benchmarks/bench_patching.py [--subset 16] [--batch 64] [--full] [--peers [nnsight] [bridge]]
    python benchmarks/bench_patching.py --subset 2 --batch 4 --peers nnsight bridge --device cpu --layers 2  # smoke

Every LM layer's ``hook_resid_post`` × image-token positions (clean and corrupted differ in the image only), with
``hooked_vlm.patching.activation_patching``. On a spaced subset of ``--subset`` positions: batched (``--batch``
patches per forward, with the base run's image features and earlier blocks replayed), batched without that reuse,
and one plain forward per patch. With ``--full``: the whole sweep (24 layers × 1485 positions) batched, timed
end to end, and its values at the subset compared with the other modes'; the one-forward-per-patch time of the
full sweep is the subset's per-patch time × the number of patches (running it would take about half an hour).

With ``--peers`` (bare: nnsight), on the subset, what a peer library's user writes for the same sweep, timed the
same way (end to end, after a one-patch warm-up) and its values compared with hooked_vlm's: nnsight (on a deep
copy) — one trace of the clean input saving every decoder layer's output, then one trace of the corrupted input per
patch setting ``layers[l].output[:, pos]`` to the clean value (the layer's output is the residual tensor itself in
transformers 5) and saving the logits, ``LogitDiff(100, 200)`` (last-position logit of token 100 minus token 200,
in float32) computed from them; ``logits_to_keep=1`` is passed (to the peers' runs too) as hooked_vlm passes it for this
readout, so all project the vocabulary at the last position only. ``--peers bridge`` (transformer_lens's
TransformerBridge booted as in ``bench_vlm.py`` around a deep copy of the raw model, eager attention; needs
``TL4=1`` on the lent machine): one ``run_with_cache`` of the clean input for every ``blocks.{l}.hook_resid_post``,
then one ``run_with_hooks`` per patch (``blocks.{l}.hook_resid_post`` is the LM block's output, as in hooked_vlm).
Ratios are hooked time ÷ peer time for the same patches (batched, and one forward per patch). Every mode also
reports its peak GPU memory (every resident model copy included, so compare within one run).

``--device cpu --layers N`` is a smoke run (N blocks per tower, fp32, nothing saved): it checks that every mode
runs, not how fast (``--full`` is 1485 positions per layer, too slow for it).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import boot_bridge, build_model, llava_inputs  # noqa: E402
from harness import environment, save, versions  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.patching import activation_patching  # noqa: E402
from hooked_vlm.readouts import LogitDiff  # noqa: E402

CORRECT, INCORRECT = 100, 200  # the LogitDiff readout's token ids


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """``fn()``, its wall time, and the peak GPU memory during it (GiB, every resident model copy included; NaN on
    the CPU)."""
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return result, seconds, round(peak, 2)


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """``LogitDiff(CORRECT, INCORRECT)`` by hand: the last position's logits, in float32."""
    last = logits[:, -1].float()
    return last[:, CORRECT] - last[:, INCORRECT]


def nnsight_sweep(wrapped, clean: dict, corrupted: dict, layers: list[int], positions: list[int]) -> torch.Tensor:
    """Activation patching as an nnsight user writes it: clean activations from one trace, one trace per patch."""
    blocks = wrapped.model.language_model.layers
    clean_acts = []  # made outside the trace: nnsight runs the block's body in its own frame
    with wrapped.trace(**clean, logits_to_keep=1):
        for block in blocks:
            clean_acts.append(block.output.save())
    values = []
    for layer in layers:
        for pos in positions:
            with wrapped.trace(**corrupted, logits_to_keep=1):
                blocks[layer].output[:, pos] = clean_acts[layer][:, pos]
                logits = wrapped.output.logits.save()
            values.append(logit_diff(logits)[0])
    return torch.stack(values).view(len(layers), len(positions))


def bridge_sweep(bridge, clean: dict, corrupted: dict, layers: list[int], positions: list[int]) -> torch.Tensor:
    """The same through a TransformerBridge: one ``run_with_cache`` of the clean input, one ``run_with_hooks`` each."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(bridge.cfg.n_layers)]
    _, cache = bridge.run_with_cache(clean["input_ids"], names_filter=names, logits_to_keep=1,
                                     **{k: v for k, v in clean.items() if k != "input_ids"})
    clean_acts = [cache[name] for name in names]
    rest = {k: v for k, v in corrupted.items() if k != "input_ids"}
    values = []
    for layer in layers:
        for pos in positions:
            def patch(t, hook, layer=layer, pos=pos):
                t[:, pos] = clean_acts[layer][:, pos]
                return t

            logits = bridge.run_with_hooks(corrupted["input_ids"], fwd_hooks=[(names[layer], patch)], logits_to_keep=1,
                                           **rest)
            values.append(logit_diff(logits)[0])
    return torch.stack(values).view(len(layers), len(positions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--full", action="store_true")
    parser.add_argument(
        "--peers", nargs="*", choices=["nnsight", "bridge"], default=None,
        help="peer libraries run on the subset; bare --peers means nnsight",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run (see above)")
    parser.add_argument("--layers", type=int, default=None, help="blocks per tower (smoke runs); default: the config's")
    args = parser.parse_args()
    peers = ["nnsight"] if args.peers == [] else (args.peers or [])
    smoke = args.device == "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    env = environment() | versions("transformer_lens", "nnsight")
    raw = build_model("llava", args.device, dtype, args.layers)
    # the bridge rewires the HF model it is given: it gets a copy with the same weights, made before anything else
    # touches ``raw``
    bridge_copy = copy.deepcopy(raw) if "bridge" in peers else None
    model = HookedVLM.from_hf(raw)
    clean = llava_inputs(raw, 1, args.device, dtype)
    corrupted = dict(clean, pixel_values=torch.randn_like(clean["pixel_values"]))
    image_positions = clean["input_ids"][0].eq(raw.config.image_token_id).nonzero()[:, 0].tolist()
    step = max(1, len(image_positions) // args.subset)
    subset = image_positions[::step][: args.subset]
    readout = LogitDiff(CORRECT, INCORRECT)
    hooks = "lm.blocks.*.hook_resid_post"
    n_layers = raw.config.text_config.num_hidden_layers

    def sweep(positions, batch_size: int, reuse_prefix: bool):
        return activation_patching(model, clean, corrupted, readout, hooks, positions=positions, batch_size=batch_size,
                                   reuse_prefix=reuse_prefix, progress=False).values.float()

    with torch.no_grad():
        sweep(subset, args.batch, True)  # warm-up (allocator, kernels)
        batched, batched_s, batched_peak = timed(lambda: sweep(subset, args.batch, True))
        no_reuse, no_reuse_s, no_reuse_peak = timed(lambda: sweep(subset, args.batch, False))
        single, single_s, single_peak = timed(lambda: sweep(subset, 1, False))
    n_patches, per_patch = n_layers * len(subset), single_s / (n_layers * len(subset))
    results = {
        "subset": {
            "patches": n_patches,
            "batched_s": round(batched_s, 2),
            "batched_without_reuse_s": round(no_reuse_s, 2),
            "one_per_forward_s": round(single_s, 2),
            "speed-up": round(single_s / batched_s, 1),
            "max |Δ| batched vs one-per-forward": (batched - single).abs().max().item(),
            "max |Δ| batched vs without reuse": (batched - no_reuse).abs().max().item(),
            "batched_patches_per_s": round(n_patches / batched_s, 1),
            "one_per_forward_patches_per_s": round(n_patches / single_s, 1),
            "peak GiB (batched / without reuse / one per forward)": [batched_peak, no_reuse_peak, single_peak],
        }
    }
    all_layers = list(range(n_layers))
    peer_per_patch = {}
    peer_runs = {}
    if "nnsight" in peers:
        from nnsight import NNsight

        wrapped = NNsight(copy.deepcopy(raw))  # NNsight instruments every submodule of what it wraps, for good
        peer_runs["nnsight"] = lambda layers, positions: nnsight_sweep(wrapped, clean, corrupted, layers, positions)
    if bridge_copy is not None:
        bridge, eager_copy = boot_bridge(bridge_copy, args.device, dtype)
        del eager_copy
        peer_runs["bridge"] = lambda layers, positions: bridge_sweep(bridge, clean, corrupted, layers, positions)
    for peer, run in peer_runs.items():
        with torch.no_grad():
            run([0], subset[:1])  # warm-up
            values, peer_s, peer_peak = timed(lambda run=run: run(all_layers, subset))
        values = values.float().to(batched.device)
        peer_per_patch[peer] = peer_s / n_patches
        results["subset"] |= {
            f"{peer}_one_per_forward_s": round(peer_s, 2),
            f"{peer}_patches_per_s": round(n_patches / peer_s, 1),
            f"{peer} peak GiB": peer_peak,
            f"batched ÷ {peer} (time)": round(batched_s / peer_s, 4),
            f"one-per-forward ÷ {peer} (time)": round(single_s / peer_s, 3),
            f"max |Δ| batched vs {peer}": (batched - values).abs().max().item(),
            f"max |Δ| one-per-forward vs {peer}": (single - values).abs().max().item(),
        }
    if args.full:
        with torch.no_grad():
            full, full_s, full_peak = timed(lambda: sweep(image_positions, args.batch, True))
        at_subset = full[:, [image_positions.index(p) for p in subset]]
        n_full = n_layers * len(image_positions)
        results["full"] = {
            "patches": n_full,
            "batched_s": round(full_s, 1),
            "batched_patches_per_s": round(n_full / full_s, 1),
            "batched peak GiB": full_peak,
            "one_per_forward_s (subset per-patch time × patches)": round(per_patch * n_full, 1),
            "speed-up": round(per_patch * n_full / full_s, 1),
            "max |Δ| full sweep vs one-per-forward at the subset": (at_subset - single).abs().max().item(),
        }
        for peer, per in peer_per_patch.items():
            results["full"] |= {
                f"{peer}_one_per_forward_s (subset per-patch time × patches)": round(per * n_full, 1),
                f"batched ÷ {peer} (time)": round(full_s / (per * n_full), 4),
            }
    if not smoke:
        save("patching_llava05_resid_image", {"env": env, "results": results, "args": vars(args)})
    with_ = ", ".join({"nnsight": f"nnsight {env.get('nnsight')}", "bridge": f"TransformerBridge (transformer_lens "
                       f"{env.get('transformer_lens')}, eager)"}[p] for p in peers)
    print(f"LLaVA-OneVision-0.5b residual patching, {n_layers} layers × image positions (batch {args.batch})"
          f"{', CPU SMOKE (fp32; not a measurement)' if smoke else ''}{', with ' + with_ if with_ else ''} on "
          f"{env['card']}: {results}")


if __name__ == "__main__":
    main()
