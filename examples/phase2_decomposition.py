"""Phase 2 — decomposition: which heads and patches make an image score as aesthetic, and which LM heads and
image tokens carry a VLM's answer, with a ✓ per item.

    python examples/phase2_decomposition.py                                  # tiny random CLIP and LLaVA-OneVision
    python examples/phase2_decomposition.py --model openai/clip-vit-large-patch14 --device cuda \\
        --aesthetic sac+logos+ava1-l14-linearMSE.pth --image a.jpg --image2 b.jpg \\
        --vlm llava-hf/llava-onevision-qwen2-0.5b-ov-hf --prompt "Is it sunny? Answer Yes or No." --answer Yes --wrong No

1. CLIP: the aesthetic score of two images (the LAION predictor with --aesthetic; without it a random probe in
   the released format, so the numbers are noise) split exactly into heads, MLPs, embeddings and biases
   (``hooked_vlm.attribution.attribute``); the sum is checked against the score minus the probe's bias
2. CLIP: each head's share split by source patch (pattern-weighted values at CLS), as heatmaps beside each image
3. the TransformerLens cache methods on the vision tower: the full decomposition sums to the last residual,
   ``apply_ln_to_stack`` of the whole sum is the model's own normed CLS
4. LLaVA-OneVision: the logit difference answer − wrong at the last token split into LM heads and MLPs, the heads'
   share mapped onto the image tokens, and ``logit_attrs`` checked against the model's logits

Everything is written to --out (default out/phase2_decomposition/).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from hooked_vlm.attribution import attribute, attribution_names
from hooked_vlm.cli import load_model
from hooked_vlm.inputs import load_images
from hooked_vlm.readouts import LogitDiff, Probe
from hooked_vlm.testing import half_and_half_image, sample_image

from common import Checklist, load, parser


def random_laion_probe(d_embed: int) -> Probe:
    """The LAION predictor's architecture with random weights (tiny models have no released head)."""
    torch.manual_seed(0)
    sizes = [d_embed, 1024, 128, 64, 16, 1]
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if i < 3:
            layers.append(nn.Dropout(0.1))
    return Probe("hook_image_embeds", nn.Sequential(*layers), normalize=True)


def main() -> int:
    p = parser(__doc__, "tiny:clip", "out/phase2_decomposition", image="first image (default: a drawn sample)")
    p.add_argument("--image2", help="second image (default: a drawn half-and-half image)")
    p.add_argument("--aesthetic", help="LAION improved-aesthetic-predictor .pth (default: a random probe)")
    p.add_argument("--vlm", default="tiny:llava_onevision", help="the VLM (default tiny:llava_onevision)")
    p.add_argument("--prompt", default="Is it sunny? Answer A or B.")
    p.add_argument("--answer", default="A")
    p.add_argument("--wrong", default="B")
    args = p.parse_args()
    check = Checklist()
    args.out.mkdir(parents=True, exist_ok=True)

    # ---- 1. CLIP: the aesthetic score into heads -------------------------------------------------------------
    clip = load(args)
    images = load_images(args.image) if args.image else [sample_image(96, 96, seed=0)]
    images += load_images(args.image2) if args.image2 else [half_and_half_image(96, 96)]
    with torch.no_grad():
        output, cache = clip.run_with_cache(images, names_filter=attribution_names("vision"), stop_early=False)
    d_embed = cache["hook_image_embeds"].shape[-1]
    probe = Probe.from_laion_aesthetic(args.aesthetic) if args.aesthetic else random_laion_probe(d_embed)
    probe.module.to(cache["hook_image_embeds"].device)
    a = attribute(cache, probe, output)
    print(f"aesthetic score per image: {a.value.tolist()}  ({a.note})")
    for b in range(len(images)):
        print(f"image {b}: top components {[(label, round(v, 4)) for label, v in a.top(6, batch=b)]}")
        a.plot_heads(args.out / f"clip_heads_image{b}.png", batch=b, title=f"aesthetic score by head, image {b}")
    residual = (a.values.sum(0) - (a.value - a.bias)).abs().max().item()
    check(residual < 1e-3, f"the components sum to the score minus the probe's bias (max error {residual:.2e})")

    # ---- 2. by source patch ---------------------------------------------------------------------------------
    heads = a.heads()
    strongest = [divmod(int(heads[b].abs().argmax()), a.n_heads) for b in range(len(images))]
    for b, (layer, head) in enumerate(strongest):
        a.plot_patches(images[b], args.out / f"clip_patches_image{b}_all_heads.png", batch=b)
        a.plot_patches(images[b], args.out / f"clip_patches_image{b}_L{layer}H{head}.png", head=(layer, head), batch=b)
    source_error = (a.by_source.sum(-1) - heads).abs().max().item()
    check(source_error < 1e-4, f"each head's patches sum to the head (max error {source_error:.2e}); strongest heads {strongest}")

    # ---- 3. TransformerLens cache methods ----------------------------------------------------------------------
    n = clip.adapter.towers()[0].n_layers
    stack = cache.get_full_resid_decomposition(tower="vision", pos_slice=0)
    final = cache[f"vision.blocks.{n - 1}.hook_resid_post"][:, 0]
    error = (stack.sum(0) - final).abs().max().item()
    check(error < 1e-3, f"get_full_resid_decomposition sums to the last residual at CLS (max error {error:.2e})")
    normed = cache.apply_ln_to_stack(stack, pos_slice=0, tower="vision").sum(0)
    norm_bias = clip.raw_model.get_submodule(clip.hook_dict["vision.hook_out"].tap.module).bias
    error = (normed + norm_bias - cache["vision.hook_out"]).abs().max().item()
    check(error < 1e-3, f"apply_ln_to_stack of the whole sum + the norm's bias is vision.hook_out (max error {error:.2e})")

    # ---- 4. LLaVA-OneVision: the answer's logit difference ----------------------------------------------------------
    vlm = load_model(args.vlm, device=args.device)
    readout = LogitDiff(args.answer, args.wrong, tokenizer=vlm)
    with torch.no_grad():
        logits, cache = vlm.run_with_cache(images[0], prompt=args.prompt, names_filter=attribution_names("lm"), stop_early=False)
    a = attribute(cache, readout, logits)
    print(f"logit difference {args.answer!r} − {args.wrong!r}: {a.value.tolist()}; top {a.top(6)}")
    a.plot_heads(args.out / "vlm_lm_heads.png", title="logit difference by LM head")
    a.plot_patches(images[0], args.out / "vlm_image_tokens_all_heads.png", title="logit difference by image token (LM heads)")
    error = (a.values.sum(0) - a.value).abs().max().item()
    check(error < 1e-3, f"the LM components sum to the logit difference (max error {error:.2e})")
    stack = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(stack, readout.correct[:, 0], readout.incorrect[:, 0], pos_slice=-1)
    error = (attrs.sum(0) - a.value).abs().max().item()
    check(error < 1e-3, f"logit_attrs of decompose_resid sums to it too (max error {error:.2e})")
    image_share = a.by_source[0].sum((0, 1))[cache.layout.image_token_mask[0]].sum().item()
    print(f"share of the heads' contribution read from image tokens: {image_share:.4f}")
    return check.summary(f"phase 2 decomposition: {check.passed}/{len(check.items)} checks hold; figures in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
