"""Generation with a steering vector on LLaVA-OneVision-0.5b at real size (random weights, bf16, sdpa).

    python benchmarks/bench_generate.py [--new-tokens 64] [--rounds 5]

Rows: the raw HF ``generate``; ``HookedVLM.generate`` with no hooks; with a steering vector added to a mid LM
layer's residual at every step (``hooked_vlm.steering``); with it added to generated tokens only. Greedy, a fixed
number of new tokens (EOS suppressed), one 384×384 image (1485 image tokens) + 20 text tokens; tokens/s =
new tokens / median time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import CONFIGS, llava_inputs  # noqa: E402
from harness import environment, markdown, save, time_variants  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.steering import SteeringVector, steer  # noqa: E402
from hooked_vlm.testing import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = environment()
    raw = build(CONFIGS["llava"], device="cuda", dtype=torch.bfloat16)
    model = HookedVLM.from_hf(raw)
    inputs = llava_inputs(raw, 1)
    prepared = model.prepare_inputs(inputs)
    mid = raw.config.text_config.num_hidden_layers // 2
    direction = torch.randn(raw.config.text_config.hidden_size, device="cuda", dtype=torch.bfloat16)
    everywhere = SteeringVector.from_tensor(f"lm.blocks.{mid}.hook_resid_post", direction, scale=4.0)
    generated_only = SteeringVector.from_tensor(f"lm.blocks.{mid}.hook_resid_post", direction, scale=4.0,
                                                positions="generated")
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def steered(vector):
        with steer(model, vector):
            return model.generate(prepared, **settings)

    with torch.no_grad():
        plain = model.generate(prepared, **settings).sequences
        reference = raw.generate(**inputs, **settings)
        changed = steered(everywhere).sequences
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
        rows = time_variants(variants, {k: "hf_generate" for k in variants if k != "hf_generate"},
                             rounds=args.rounds, warmup=1)
    for row in rows:
        row.note = f"{args.new_tokens / row.median_ms * 1000:.1f} tokens/s"
    save(f"generate_llava05_{args.new_tokens}tok", {"env": env, "rows": rows, "parity": parity})
    print(markdown(f"LLaVA-OneVision-0.5b generate, {args.new_tokens} new tokens, batch 1, bf16 ({env['card']})",
                   rows, f"parity: {parity}"))


if __name__ == "__main__":
    main()
