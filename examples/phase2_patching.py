"""Phase 2 — patching: which layers, heads and image regions cause a judgement, with a ✓ per item.

    python examples/phase2_patching.py                                    # tiny random LLaVA-OneVision, offline
    python examples/phase2_patching.py --model tiny:qwen2_vl
    python examples/phase2_patching.py --model tiny:clip                  # CLIP: caption similarity as the readout
    python examples/phase2_patching.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --device cuda \\
        --clean sunny.jpg --corrupted overcast.jpg --prompt "Is it sunny? Answer Yes or No." --answer Yes --wrong No
    python examples/phase2_patching.py --model openai/clip-vit-large-patch14 --aesthetic sac+logos+ava1-l14-linearMSE.pth

1. the readout on the clean and the corrupted input (VLMs: logit difference answer − wrong at the last token;
   CLIP: caption similarity contrast, or the LAION aesthetic score with --aesthetic)
2. activation patching (denoising) of the residual stream, layers × positions: a grid, and heatmaps over the
   image (VLMs: the LM's image tokens; CLIP: the vision patches)
3. attribution patching of the same sweep from one forward and one backward, its Pearson r against the exact
   sweep, and integrated gradients
4. heads: attribution over layers × heads (attn.hook_z), the strongest head checked by exact patching
5. VLMs: attention knockout (image → last token) over windows of layers, and the logit lens over image tokens
6. ablation: mean-ablating each quadrant of the image's tokens

The corrupted image is resized to the clean one's size, so both have the same token layout. On the tiny random
models the numbers are noise, but every check holds. Everything is written to --out (default out/phase2/).
"""

from __future__ import annotations

import sys

import torch

from hooked_vlm.inputs import load_images
from hooked_vlm.lens import logit_lens
from hooked_vlm.patching import ablation, activation_patching, attention_knockout, attribution_patching
from hooked_vlm.readouts import ClipSimilarity, LogitDiff, Probe
from hooked_vlm.sae.features import model_view
from hooked_vlm.testing import sample_image

from common import Checklist, load, parser

TINY = dict(prompt="Is the sun on the left? Answer A or B.", answer="A", wrong="B")
REAL = dict(prompt="Is the sun on the left of the picture? Answer Yes or No.", answer="Yes", wrong="No")
CAPTIONS = ["a picture with the sun on the left", "a picture with the sun on the right"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def quadrants(layout_grid: tuple[int, int], tile: int):
    """Four selectors: the image tokens of each quadrant of one tile's grid (callables over the layout)."""
    rows, cols = layout_grid

    def quadrant(top: bool, left: bool):
        def select(layout):
            tower = layout.towers["lm"] if "lm" in layout.towers else layout.towers["vision"]
            on_grid = (tower.row >= 0) & (tower.tile == tile)
            vertical = tower.row < rows // 2 if top else tower.row >= rows // 2
            horizontal = tower.col < cols // 2 if left else tower.col >= cols // 2
            return on_grid & vertical & horizontal & (tower.image == 0)

        return select

    return {
        f"{'top' if top else 'bottom'} {'left' if left else 'right'}": quadrant(top, left)
        for top in (True, False)
        for left in (True, False)
    }


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__, default_model="tiny:llava_onevision", default_out="out/phase2", image=False)
    options.add_argument("--clean", help="clean image (default: a drawn scene, sun on the left)")
    options.add_argument("--corrupted", help="corrupted image (default: the drawn scene with the sun elsewhere)")
    options.add_argument("--prompt", help="VLMs: the question (default suits --answer / --wrong)")
    options.add_argument("--answer", help="VLMs: the clean answer, one token (tiny: A, real: Yes)")
    options.add_argument("--wrong", help="VLMs: the wrong answer, one token (tiny: B, real: No)")
    options.add_argument("--aesthetic", help="CLIP ViT-L/14: LAION improved-aesthetic-predictor .pth as the readout")
    options.add_argument("--batch-size", type=int, default=16, help="patches per forward (default 16)")
    args = options.parse_args(argv)
    out = args.out
    check = Checklist()  # check(ok, item) prints a ✓/✗ line; check.summary(title) lists them at the end

    model = load(args)
    towers = {tower.name: tower for tower in model.adapter.towers()}
    is_vlm = "lm" in towers
    tiny = args.model.startswith("tiny:")
    # tiny models: images that give a few dozen image tokens (Qwen2-VL's tiny processor allows up to 4 × 4)
    size = {"llava_onevision": (32, 32), "qwen2_vl": (112, 112)}.get(model.adapter.family, (96, 96)) if tiny else (336, 336)
    clean = load_images(args.clean)[0] if args.clean else sample_image(*size, seed=0)
    corrupted = load_images(args.corrupted)[0] if args.corrupted else sample_image(*size, seed=3)
    corrupted = corrupted.resize(clean.size)
    print(model)

    # 1. The readout.
    if is_vlm:
        words = {k: getattr(args, k) or (TINY if tiny else REAL)[k] for k in ("prompt", "answer", "wrong")}
        prompt = words["prompt"]
        readout = LogitDiff(words["answer"], words["wrong"], tokenizer=model)
        family, positions, tower = "lm.blocks.*.hook_resid_post", "all", "lm"
    else:
        prompt = None
        if args.aesthetic:
            readout = Probe.from_laion_aesthetic(args.aesthetic)
        else:
            readout = ClipSimilarity.from_texts(model, CAPTIONS, 0) - ClipSimilarity.from_texts(model, CAPTIONS, 1)
        family, positions, tower = "vision.blocks.*.hook_resid_post", "all", "vision"
    kwargs = dict(prompt=prompt, batch_size=args.batch_size)
    exact = activation_patching(model, clean, corrupted, readout, family, positions=positions, **kwargs)
    gap = exact.clean_value - exact.corrupted_value
    check(abs(gap) > 0, f"readout {readout!r}: clean {exact.clean_value:.4g}, corrupted {exact.corrupted_value:.4g}")

    # 2. Activation patching, layers × positions; on the image.
    exact.plot(out / "patching_layers_positions.png", what="normalized")
    view = clean if is_vlm else model_view(model, clean)
    tile = 1 if model.adapter.family == "llava_onevision" else 0  # LLaVA-OneVision: the high-res grid
    image_positions = "image" if is_vlm else "patches"
    on_image = activation_patching(model, clean, corrupted, readout, family, positions=image_positions, **kwargs)
    on_image.plot(out / "patching_over_image.png", view, what="normalized", tile=tile)
    layer, position = divmod(int(on_image.effect().abs().argmax()), on_image.values.shape[1])
    check(bool(torch.isfinite(on_image.grid(tile=tile)).any()),
          f"activation patching of {family}: {out / 'patching_layers_positions.png'}, {out / 'patching_over_image.png'}; "
          f"strongest image position: block {layer}, {on_image.labels['position'][position]}")

    # 3. Attribution patching and integrated gradients against the exact sweep.
    estimate = attribution_patching(model, clean, corrupted, readout, family, positions=image_positions, **kwargs)
    ig = attribution_patching(model, clean, corrupted, readout, family, positions=image_positions, ig_steps=8, **kwargs)
    estimate.plot(out / "attribution_over_image.png", view, what="normalized", tile=tile)
    r, r_ig = pearson(estimate.effect(), on_image.effect()), pearson(ig.effect(), on_image.effect())
    check(all(t.shape == on_image.values.shape for t in (estimate.values, ig.values)),
          f"attribution patching: Pearson r = {r:.3f} with exact patching (integrated gradients, 8 steps: {r_ig:.3f}); "
          f"{out / 'attribution_over_image.png'}")

    # 4. Heads: attribution over layers × heads, the strongest head checked exactly.
    z = f"{tower}.blocks.*.attn.hook_z"
    heads = attribution_patching(model, clean, corrupted, readout, z, heads="each", **kwargs)
    heads.plot(out / "heads.png")
    layer, head = divmod(int(heads.effect().abs().argmax()), heads.values.shape[1])
    exact_head = activation_patching(model, clean, corrupted, readout, f"{tower}.blocks.{layer}.attn.hook_z",
                                     heads=[head], **kwargs)
    check(True, f"head attribution: {out / 'heads.png'}; strongest L{layer}H{head}: estimated change "
                f"{float(heads.effect()[layer, head]):+.4g}, exact {float(exact_head.effect()[0, 0]):+.4g}")

    if is_vlm:
        # 5. Attention knockout image → last token, and the logit lens over the image tokens.
        source = ("image", "newline") if model.adapter.family == "llava_onevision" else "image"
        window = max(1, towers["lm"].n_layers // 4)
        knockout = attention_knockout(model, clean, readout, source=source, target=-1, window=window, **kwargs)
        knockout.plot(out / "knockout.png")
        strongest = int(knockout.relative_change().abs().argmax())
        check(len(knockout.values) == towers["lm"].n_layers,
              f"attention knockout image → last token, windows of {window} layers: {out / 'knockout.png'}; "
              f"largest change {float(knockout.relative_change()[strongest]):+.1%} around layer {knockout.layers[strongest]}")
        lens = logit_lens(model, clean, prompt=prompt, words=[words["answer"], words["wrong"]])
        lens.plot(out / "logit_lens.png", view, words["answer"], tile=tile)
        lens.plot_top_tokens(out / "logit_lens_top_tokens.png", view, lens.layers[-1], tile=tile)
        check(lens.word_probs.shape[:2] == (len(lens.layers), len(lens.positions)),
              f"logit lens over {len(lens.positions)} image tokens × {len(lens.layers)} layers: "
              f"{out / 'logit_lens.png'}, {out / 'logit_lens_top_tokens.png'}")

    # 6. Mean-ablating each quadrant of the image (LM image tokens, or vision patches) at the first block's input.
    grid = on_image.layout.tower_for(family.replace("*", "0")).grids[tile if is_vlm else 0]
    first = f"{tower}.blocks.0.hook_resid_pre"
    ablated = ablation(model, clean, readout, first, groups=quadrants(grid, tile), value="mean", **kwargs)
    ablated.plot(out / "ablation_quadrants.png")
    effects = ", ".join(f"{g} {float(e):+.3g}" for g, e in zip(ablated.labels["group"], ablated.effect()[0], strict=True))
    check(ablated.values.shape == (1, 4), f"mean ablation of image quadrants at {first}: {effects}")
    print(f"{args.model}: {check.passed}/{len(check.items)} checks passed")
    return check.exit_code


if __name__ == "__main__":
    sys.exit(main())

