"""Phase 1 — which SAE units carry an aesthetic judgement: association, causal effect, ranked answer, with a ✓ per item.

    python examples/phase1_aesthetic_features.py                     # tiny random CLIP, drawn images, CPU, ~1 min
    python examples/phase1_aesthetic_features.py --model openai/clip-vit-large-patch14 --device cuda \\
        --dataset ava_saved/ --score-column mean_score --readout laion --laion-path sac+logos+ava1-l14-linearMSE.pth \\
        --sae models/checkpoints/saes/clip-vit-large-patch14/block22 --hook vision.blocks.22.hook_resid_post

By default a score is planted in drawn images: each image is tinted warm (red-orange) or cold (blue) by a random
amount, and its score is that warmth. The images go to a folder with a ``scores.csv`` beside it (file name →
score, the way AVA / AADB / LAION-Aesthetics ship ratings), a store of one vision block is harvested, an SAE is
trained on it, and then:

1. association from the store alone: the top feature's image-level activation follows the planted warmth
   (Spearman ρ, Cohen's d, q-value from a permutation test with BH control), and its top images are warm ones
2. causal evidence: a linear probe of warmth on CLIP's embedding is the readout; the top features are ablated
   through the spliced SAE (error term on) and the first-order estimates agree with the exact effects
3. the ranked table (CSV), scatter plots, galleries, the JSON summary, and steering vectors / clamps built from
   it with one call

With ``--dataset`` (saved with ``save_to_disk``; ``--score-column``) or ``--images`` + ``--scores`` (CSV), real
images and ratings are used; ``--sae`` loads a trained SAE instead of training one; ``--readout`` (clip, laion,
vlm) is the causal readout. Everything is written to ``--out`` (default out/phase1_aesthetic/).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hooked_vlm.readouts import fit_linear_probe
from hooked_vlm.sae import harvest_to_store, image_source, train_sae
from hooked_vlm.sae.aesthetic import (
    AESTHETIC_QUESTION,
    aesthetic_features,
    aesthetic_readout,
    evaluate_readout,
    steering_from_summary,
)
from hooked_vlm.sae.harvesting import has_language_model, model_inputs
from hooked_vlm.steering import steer
from hooked_vlm.testing import sample_image

from common import Checklist, load, mark, parser

TINY_TRAINING = dict(expansion_factor=4, k=8, batch_size=256, buffer_batches=8, n_batches_for_norm_estimate=4,
                     lr=3e-3, training_samples=120_000)


def tinted(image: Image.Image, warmth: float) -> Image.Image:
    """``warmth`` in [-1, 1]: > 0 pushes red up and blue down (warm), < 0 the reverse (cold)."""
    array = np.asarray(image).astype(np.float32)
    array[..., 0] += 90 * warmth
    array[..., 2] -= 90 * warmth
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def planted_folder(folder, n: int, seed: int = 0) -> dict[str, float]:
    """``n`` drawn images with a random warmth each, saved as PNG, and ``scores.csv`` beside them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scores = {}
    for i in range(n):
        warmth = float(rng.uniform(-1, 1))
        name = f"image_{i:03d}.png"
        tinted(sample_image(width=64 + 16 * (i % 4), height=64 + 8 * (i % 3), seed=seed + i), warmth).save(folder / name)
        scores[name] = warmth
    with (folder.parent / "scores.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "score"])
        writer.writerows(scores.items())
    return scores


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__, default_model="tiny:clip", default_out="out/phase1_aesthetic", image=False)
    options.add_argument("--hook", help="hook (default: a middle vision block's hook_resid_post)")
    options.add_argument("--positions", default="patches")
    options.add_argument("--dataset", help="a Hugging Face dataset saved with save_to_disk (its Image column)")
    options.add_argument("--score-column", help="the dataset's score column (with --dataset)")
    options.add_argument("--images", help="a folder of images (with --scores)")
    options.add_argument("--scores", help="CSV file → score beside --images, or split:POS,NEG")
    options.add_argument("--sae", help="a trained SAE folder (default: train one on the store)")
    options.add_argument("--readout", choices=["clip", "laion", "vlm"], help="causal readout (default tiny: warmth probe)")
    options.add_argument("--laion-path", help="LAION aesthetic predictor weights (--readout laion)")
    options.add_argument("--n-images", type=int, default=160, help="drawn images (default 160)")
    options.add_argument("--n-permutations", type=int, default=1000)
    args = options.parse_args(argv)
    out = args.out
    check = Checklist()
    model = load(args)
    vlm = has_language_model(model)
    prompt = AESTHETIC_QUESTION if vlm else None
    blocks = model.hook_names("vision.blocks.*.hook_resid_post")
    hook = args.hook or blocks[(len(blocks) - 1) // 2]

    # 0. Images and scores.
    planted = None
    if args.dataset:
        from datasets import load_from_disk

        images, scores, column = load_from_disk(args.dataset), args.dataset, args.score_column
    elif args.images:
        images, scores, column = args.images, args.scores, None
    else:
        planted = planted_folder(out / "images", args.n_images)
        images, scores, column = str(out / "images"), str(out / "scores.csv"), None
    source = image_source(images)
    store = harvest_to_store(model, source, hook, out / "store", positions=args.positions, prompt=prompt,
                             batch_size=16, overwrite=True)
    check(store.complete, f"store: {store.n_rows[hook]} rows of {hook} ({args.positions}) from {len(source)} images")

    from sae_lens import SAE

    if args.sae:
        sae = SAE.load_from_disk(args.sae)
    else:
        sae = train_sae(store, hook, output_path=out / "sae", **TINY_TRAINING).sae
    device = str(next(model.raw_model.parameters()).device)
    sae = sae.to(device)

    # the causal readout: for the planted score, a ridge probe of warmth on the image embedding (what the model
    # "judges"); for real data, an aesthetic readout
    if args.readout:
        readout = aesthetic_readout(model, args.readout, path=args.laion_path)
    elif planted is not None and not vlm:
        with torch.no_grad():
            embeds = torch.cat([model.run_with_cache(**model_inputs(model, source.load(i, i + 32), None),
                                                     names_filter="hook_image_embeds")[1]["hook_image_embeds"]
                                for i in range(0, len(source), 32)])
        labels = torch.tensor([planted[name] for name in source.ids])
        readout = fit_linear_probe(embeds.float().cpu(), labels, "hook_image_embeds")
    else:
        readout = aesthetic_readout(model, "vlm" if vlm else "clip")

    # 1–3. The ranked answer.
    result = aesthetic_features(store, sae, scores, model=model, images=source, readout=readout, column=column,
                                out_dir=out / "aesthetic", n_permutations=args.n_permutations, n_causal=16,
                                n_causal_images=32, prompt=prompt)
    best = result.rows[0]
    check(best["q_value"] < 0.01 and abs(best["spearman"]) > (0.5 if planted is not None else 0.0),
          f"association: feature {best['feature']} first, ρ {best['spearman']:+.3f}, d {best['cohens_d']:+.2f}, "
          f"q {best['q_value']:.2g}, density {best['density']:.1%}; {result.summary['n_significant']} features "
          f"with q ≤ 0.05 of {len(result.rows)}")
    if planted is not None:
        tops = [planted[entry["image_id"]] for entry in best["top_images"]]
        sign = best["direction"]
        check(all(sign * t > 0 for t in tops[:4]), f"provenance: feature {best['feature']}'s top images "
              f"{[e['image_id'] for e in best['top_images'][:4]]} have warmth {[round(t, 2) for t in tops[:4]]} "
              f"(peaks at patches {[(e['row'], e['col']) for e in best['top_images'][:4]]})")
    causal = result.summary["causal"]
    check(causal is not None and (causal["agreement_pearson"] or 0) >= 0.9,
          f"causal: {causal['n_features']} features ablated through the spliced SAE on {causal['n_images']} images; "
          f"first-order estimates vs exact effects: Pearson r {causal['agreement_pearson']}")
    summary = json.loads((out / "aesthetic" / "summary.json").read_text())
    files = [out / "aesthetic" / "features.csv", *map(str, result.files.get("gallery", [])), *result.files["scatter"]]
    check(all(Path(f).exists() for f in files),
          f"files: {out / 'aesthetic'}/features.csv, summary.json, {len(result.files['scatter'])} scatter plots, "
          f"{len(result.files.get('gallery', []))} galleries")

    direction = best["direction"] or 1
    vectors = steering_from_summary(summary, sae, n=2, direction=direction, strength=4.0)
    example = source.load(0, 8)
    with torch.no_grad():
        clean = evaluate_readout(model, model.prepare_inputs(**model_inputs(model, example, prompt)), readout)
        with steer(model, vectors):
            steered = evaluate_readout(model, model.prepare_inputs(**model_inputs(model, example, prompt)), readout)
    shift = float((steered - clean).mean())
    check(len(vectors) >= 1, f"steering: {[v.label for v in vectors]} from summary.json; mean readout shift "
                             f"{shift:+.3g} on 8 images (direction {direction:+d})")

    print("\n".join(f"{mark(ok)} {item.splitlines()[0][:110]}" for ok, item in check.items))
    return check.exit_code


if __name__ == "__main__":
    sys.exit(main())
