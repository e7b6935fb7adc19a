"""Generation with a steering vector on LLaVA-OneVision-0.5b at real size (random weights, bf16, sdpa).

    python benchmarks/bench_generate.py [--new-tokens 64] [--rounds 5] [--peers [nnsight] [bridge]]
    python benchmarks/bench_generate.py --peers nnsight bridge --device cpu --layers 2 --new-tokens 4  # smoke

Rows: the raw HF ``generate``; ``HookedVLM.generate`` with no hooks; with a steering vector added to a mid LM
layer's residual at every step (``hooked_vlm.steering``); with it added to generated tokens only. Greedy, a fixed
number of new tokens (EOS suppressed), one 384×384 image (1485 image tokens) + 20 text tokens; tokens/s =
new tokens / median time.

With ``--peers`` (bare: nnsight): the same three tasks through nnsight, timed in the same rounds —
``NNsight(copy).trace(**inputs, fn="generate", ...)`` (the HF ``generate`` of a deep copy of the model, traced), the same
vector added to the same decoder layer's output under ``tracer.iter[:n]`` (every forward: the prefill and one per
new token; ``min_new_tokens`` makes that exactly ``n`` forwards, and a bounded loop lets ``tracer.result`` be saved
after it, which an open ``tracer.all()`` loop does not) or ``tracer.iter[1:n]`` (generated tokens only: the forwards
after the prefill). With ``--peers bridge`` (transformer_lens's TransformerBridge, booted as in ``bench_vlm.py``
around a deep copy of the raw model switched to eager attention; needs ``TL4=1`` on the lent machine): its own
``generate`` (greedy, KV cache, ``stop_at_eos=False``) with no hooks and inside ``bridge.hooks(...)`` with the
vector on ``blocks.{mid}.hook_resid_post`` (generated tokens only: the hook adds where the step's sequence is one
token), plus the eager copy's HF ``generate`` (``hf_generate_eager``), to tell eager attention's cost from the
bridge's. Every hooked row's note (and the JSON's ``peer_ratios``) gives hooked median ÷ peer median; the parity
dict says whether each peer's greedy tokens equal hooked_vlm's (steered) or HF's (no hooks).

Known: with transformers 5.x the bridge's KV-cached ``generate`` does not extend its cache (transformers passes it
to the decoder layers as ``cache=``, the bridge's attention reads ``past_key_values``), so each decode step attends to
itself only: its tokens differ from HF's from the second new token on (the parity dict shows it) and its time is of
that cheaper computation.

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
from bench_vlm import boot_bridge, build_model, llava_inputs  # noqa: E402
from harness import add_peer_ratios, environment, markdown, run_once, save, time_variants, versions  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.steering import SteeringVector, steer  # noqa: E402

# hooked row → the peer rows doing the same task; each hooked row's note gives hooked median ÷ peer median.
PEER_ROWS = {
    "hooked_generate_no_hooks": ["nnsight_generate_no_hooks", "bridge_generate_no_hooks"],
    "hooked_generate_steer_all_steps": ["nnsight_generate_steer_all_steps", "bridge_generate_steer_all_steps"],
    "hooked_generate_steer_generated_only": [
        "nnsight_generate_steer_generated_only", "bridge_generate_steer_generated_only"
    ],
}


def same_tokens(a: torch.Tensor, b: torch.Tensor, n_prompt: int) -> bool | str:
    """True when the sequences are equal, else where the new tokens first differ."""
    if a.shape == b.shape and torch.equal(a, b):
        return True
    if a.shape != b.shape:
        return f"False (shapes {tuple(a.shape)} vs {tuple(b.shape)})"
    differs = (a[:, n_prompt:] != b[:, n_prompt:].to(a.device)).any(0).nonzero()
    if not len(differs):
        return "False (prompt differs)"
    return f"False (new tokens differ from index {differs[0, 0].item()} on)"


def nnsight_variants(raw, inputs: dict, mid: int, added: torch.Tensor, settings: dict, n_new: int) -> dict:
    from nnsight import NNsight

    wrapped = NNsight(copy.deepcopy(raw))  # NNsight instruments every submodule of what it wraps, for good
    layer = wrapped.model.language_model.layers[mid]

    def plain():
        with wrapped.trace(**inputs, fn="generate", **settings) as tracer:
            ids = tracer.result.save()
        return ids

    def steer_all_steps():
        with wrapped.trace(**inputs, fn="generate", **settings) as tracer:
            for _ in tracer.iter[:n_new]:  # every forward: the prefill, then one per new token
                layer.output = layer.output + added
            ids = tracer.result.save()
        return ids

    def steer_generated_only():
        with wrapped.trace(**inputs, fn="generate", **settings) as tracer:
            for _ in tracer.iter[1:n_new]:  # the forwards after the prefill: each one's input is a generated token
                layer.output = layer.output + added
            ids = tracer.result.save()
        return ids

    return {
        "nnsight_generate_no_hooks": plain,
        "nnsight_generate_steer_all_steps": steer_all_steps,
        "nnsight_generate_steer_generated_only": steer_generated_only,
    }


def bridge_variants(bridge, eager_copy, inputs: dict, mid: int, added: torch.Tensor, settings: dict, n_new: int):
    ids = inputs["input_ids"]
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    resid = f"blocks.{mid}.hook_resid_post"

    def generate():
        return bridge.generate(ids, max_new_tokens=n_new, do_sample=False, stop_at_eos=False, verbose=False, **rest)

    def steered(hook_fn):
        with bridge.hooks(fwd_hooks=[(resid, hook_fn)]):
            return generate()

    return {
        "hf_generate_eager": lambda: eager_copy.generate(**inputs, **settings),
        "bridge_generate_no_hooks": generate,
        "bridge_generate_steer_all_steps": lambda: steered(lambda t, hook: t + added),
        # KV-cached decode steps see one (generated) token; the prefill sees the whole prompt
        "bridge_generate_steer_generated_only": lambda: steered(lambda t, hook: t + added if t.shape[1] == 1 else t),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--peers", nargs="*", choices=["nnsight", "bridge"], default=None,
        help="peer libraries timed in the same rounds; bare --peers means nnsight",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run (see above)")
    parser.add_argument("--layers", type=int, default=None, help="blocks per tower (smoke runs); default: the config's")
    args = parser.parse_args()
    peers = ["nnsight"] if args.peers == [] else (args.peers or [])
    device, smoke = args.device, args.device == "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    env = environment() | versions("transformer_lens", "nnsight")
    raw = build_model("llava", device, dtype, args.layers)
    # the bridge rewires the HF model it is given: it gets a copy with the same weights, made before anything else
    # touches ``raw``
    bridge_copy = copy.deepcopy(raw) if "bridge" in peers else None
    model = HookedVLM.from_hf(raw)
    inputs = llava_inputs(raw, 1, device, dtype)
    n_prompt = inputs["input_ids"].shape[1]
    prepared = model.prepare_inputs(inputs)
    mid = raw.config.text_config.num_hidden_layers // 2
    direction = torch.randn(raw.config.text_config.hidden_size, device=device, dtype=dtype)
    everywhere = SteeringVector.from_tensor(f"lm.blocks.{mid}.hook_resid_post", direction, scale=4.0)
    generated_only = SteeringVector.from_tensor(f"lm.blocks.{mid}.hook_resid_post", direction, scale=4.0,
                                                positions="generated")
    added = 4.0 * direction  # what the peers add: scale × direction, as the SteeringVector does
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def steered(vector):
        with steer(model, vector):
            return model.generate(prepared, **settings)

    with torch.no_grad():
        plain = model.generate(prepared, **settings).sequences
        reference = raw.generate(**inputs, **settings)
        changed = steered(everywhere).sequences
        changed_generated = steered(generated_only).sequences
        parity = {
            "no hooks == HF generate": bool(torch.equal(plain, reference)),
            "steering changes tokens": not torch.equal(changed, reference),
        }
        variants = {
            "hf_generate": lambda: raw.generate(**inputs, **settings),
            "hooked_generate_no_hooks": lambda: model.generate(prepared, **settings),
            "hooked_generate_steer_all_steps": lambda: steered(everywhere),
            "hooked_generate_steer_generated_only": lambda: steered(generated_only),
        }
        baselines = {k: "hf_generate" for k in variants if k != "hf_generate"}
        if "nnsight" in peers:
            nnsight = nnsight_variants(raw, inputs, mid, added, settings, args.new_tokens)
            variants |= nnsight
            baselines |= {k: "hf_generate" for k in nnsight}
            parity |= {
                "nnsight no hooks == HF generate": same_tokens(nnsight["nnsight_generate_no_hooks"](), reference,
                                                               n_prompt),
                "nnsight steer all steps == hooked (greedy tokens)": same_tokens(
                    nnsight["nnsight_generate_steer_all_steps"](), changed, n_prompt),
                "nnsight steer generated only == hooked (greedy tokens)": same_tokens(
                    nnsight["nnsight_generate_steer_generated_only"](), changed_generated, n_prompt),
            }
        if bridge_copy is not None:
            bridge, eager_copy = boot_bridge(bridge_copy, device, dtype)
            bridge_rows = bridge_variants(bridge, eager_copy, inputs, mid, added, settings, args.new_tokens)
            variants |= bridge_rows
            baselines |= {k: "hf_generate" for k in bridge_rows}
            eager_reference = bridge_rows["hf_generate_eager"]()
            bridge_plain = bridge_rows["bridge_generate_no_hooks"]()
            parity |= {
                "HF generate eager == sdpa": same_tokens(eager_reference, reference, n_prompt),
                "bridge no hooks == HF generate eager": same_tokens(bridge_plain, eager_reference, n_prompt),
                "bridge no hooks == HF generate": same_tokens(bridge_plain, reference, n_prompt),
                "bridge steer all steps == hooked (greedy tokens)": same_tokens(
                    bridge_rows["bridge_generate_steer_all_steps"](), changed, n_prompt),
                "bridge steer generated only == hooked (greedy tokens)": same_tokens(
                    bridge_rows["bridge_generate_steer_generated_only"](), changed_generated, n_prompt),
            }
        if smoke:
            rows = run_once(variants, baselines)
        else:
            rows = time_variants(variants, baselines, rounds=args.rounds, warmup=1)
    for row in rows:
        row.note = f"{args.new_tokens / row.median_ms * 1000:.1f} tokens/s"
    ratios = add_peer_ratios(rows, PEER_ROWS)
    with_ = ", ".join({"nnsight": f"nnsight {env.get('nnsight')}", "bridge": f"TransformerBridge (transformer_lens "
                       f"{env.get('transformer_lens')}, eager)"}[p] for p in peers)
    title = (f"LLaVA-OneVision-0.5b generate, {args.new_tokens} new tokens, batch 1, "
             f"{'CPU SMOKE (fp32, ' + str(args.layers) + ' blocks per tower; not a measurement)' if smoke else 'bf16'}"
             f"{', with ' + with_ if with_ else ''} ({env['card']})")
    if not smoke:
        save(f"generate_llava05_{args.new_tokens}tok",
             {"env": env, "rows": rows, "parity": parity, "peer_ratios": ratios})
    print(markdown(title, rows, f"parity: {parity}"))


if __name__ == "__main__":
    main()
