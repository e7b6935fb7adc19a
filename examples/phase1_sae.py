"""Phase 1 — SAEs on vision(-language) activations through sae_lens, end to end, with a ✓ per item.

    python examples/phase1_sae.py                                      # tiny random CLIP, offline, CPU, ~1 min
    python examples/phase1_sae.py --model tiny:llava_onevision --hook lm.blocks.1.hook_resid_post --positions image
    python examples/phase1_sae.py --model openai/clip-vit-large-patch14 --device cuda --images photos/ \\
        --hook vision.blocks.22.hook_resid_post --held-out held_out/ --real

0. a sanity check of the training setup: an SAE trained on synthetic activations with planted sparse features
   recovers them (fraction and cosine)
1. harvest activations of the images into a resumable store (sharded safetensors + manifest), and trace one
   stored row back to its image and patch against run_with_cache
2. train an SAE on the store through sae_lens (TopK by default), save it in sae_lens's format, reload it with
   sae_lens.SAE.load_from_disk and compare reconstructions
3. splice it into the model: with the error term the output is unchanged, without it the output moves
4. evaluate it on held-out images: explained variance, L0, dead/dense features, downstream cost (report.md)
5. feature analysis: galleries of the top images of a few features with per-patch heatmaps, the density
   histogram and a feature table (CSV)
6. a feature dashboard: one HTML page for the SAE (top images with heatmaps, activation histograms, logits for LM
   hooks, the aesthetic readout's change when each feature is ablated) and an index, openable from disk

Without --real the SAE sizes suit the tiny models (expansion 4, k 8, small batches); with it, the defaults of
hooked_vlm.sae.SAETrainingConfig (expansion 16, k 32, batch 4096) are used. Everything is written to --out
(default out/phase1/).
"""

from __future__ import annotations

import sys

import torch
from PIL import Image, ImageEnhance

from hooked_vlm.sae import (
    aesthetic_readout,
    density_histogram,
    evaluate_sae,
    feature_dashboard,
    feature_gallery,
    feature_table,
    harvest_to_store,
    image_source,
    planted_features,
    recovery,
    scan_features,
    train_sae,
)
from hooked_vlm.sae.harvesting import has_language_model
from hooked_vlm.testing import sample_image

from common import Checklist, load, mark, parser

TINY_TRAINING = dict(expansion_factor=4, k=8, batch_size=256, buffer_batches=8, n_batches_for_norm_estimate=4,
                     lr=3e-3)


def drawn_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Drawn scenes of several sizes, some darker: enough variety for a tiny model's features to differ."""
    images = []
    for i in range(n):
        image = sample_image(width=64 + 16 * (i % 4), height=64 + 8 * (i % 3), seed=seed + i)
        images.append(ImageEnhance.Brightness(image).enhance(0.4 + 0.3 * (i % 3)))
    return images


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__, default_model="tiny:clip", default_out="out/phase1", image=False)
    options.add_argument("--hook", help="hook to train on (default: a middle vision block's hook_resid_post)")
    options.add_argument("--positions", default="patches", help="position selector (default patches)")
    options.add_argument("--prompt", help="what a VLM is asked about each image (default: for VLMs, 'Describe the image.')")
    options.add_argument("--images", help="folder of training images (default: drawn images)")
    options.add_argument("--held-out", help="folder of held-out images (default: other drawn images)")
    options.add_argument("--n-images", type=int, default=96, help="drawn training images (default 96)")
    options.add_argument("--architecture", default="topk")
    options.add_argument("--training-samples", type=int, help="rows to train on (default: tiny 150k, real one pass)")
    options.add_argument("--real", action="store_true", help="SAE sizes for real checkpoints (SAETrainingConfig defaults)")
    args = options.parse_args(argv)
    out = args.out
    check = Checklist()  # check(ok, item) prints a ✓/✗ line; check.summary(title) lists them at the end

    # 0. The training setup finds planted features.
    planted = planted_features(d_in=32, n_features=64, active_per_row=3)
    synthetic = train_sae(planted.batches(256), "synthetic", d_sae=128, k=4, lr=1e-2, batch_size=256,
                          training_samples=256 * 600, n_batches_for_norm_estimate=4, buffer_batches=4,
                          output_path=out / "synthetic_sae")
    found = recovery(synthetic.sae, planted.directions)
    check(found["recovered"] >= 0.9, f"planted features: {found['recovered']:.0%} of 64 recovered (cosine ≥ 0.9), "
                                     f"mean best cosine {found['mean_max_cosine']:.3f}")

    # 1. Harvest into a store.
    model = load(args)
    vlm = has_language_model(model)
    prompt = args.prompt or ("Describe the image." if vlm else None)
    blocks = model.hook_names("vision.blocks.*.hook_resid_post")
    # a middle block: CLIP's embedding reads only the CLS token of the last one, so patches spliced there do nothing
    hook = args.hook or blocks[(len(blocks) - 1) // 2]
    train_images = image_source(args.images) if args.images else image_source(drawn_images(args.n_images))
    held_out = image_source(args.held_out) if args.held_out else image_source(drawn_images(16, seed=1000))
    store = harvest_to_store(model, train_images, hook, out / "store", positions=args.positions, prompt=prompt,
                             batch_size=16, shard_mb=64 if args.real else 0.05)
    row = store.n_rows[hook] // 2
    trace = store.trace(hook, row)
    first = trace["image"] - trace["image"] % 16
    batch = train_images.load(first, first + 16)
    inputs = {"inputs": [[image] for image in batch], "prompt": [prompt] * len(batch)} if vlm else {"inputs": batch}
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=[hook])
    same = torch.equal(store.read(hook)[row], cache[hook][trace["batch_row"], trace["position"]].flatten().cpu())
    check(same and store.complete, f"harvest: {store.n_rows[hook]} rows of {hook} ({args.positions}) in "
                                   f"{store.n_shards} shards at {store.path}; row {row} is image {trace['image_id']!r}, "
                                   f"tile {trace['tile']} patch ({trace['row']}, {trace['col']}), equal to run_with_cache")

    # 2. Train on the store, save, reload with sae_lens.
    from sae_lens import SAE

    settings = {} if args.real else TINY_TRAINING | {"training_samples": args.training_samples or 150_000}
    if args.real and args.training_samples:
        settings["training_samples"] = args.training_samples
    trained = train_sae(store, hook, architecture=args.architecture, output_path=out / "sae", **settings)
    reloaded = SAE.load_from_disk(trained.path)
    rows = store.read(hook)[:512].float()
    with torch.no_grad():
        same = torch.allclose(reloaded.decode(reloaded.encode(rows)), trained.sae.decode(trained.sae.encode(rows)))
    first_loss, last_loss = trained.losses[:20].mean(), trained.losses[-20:].mean()
    check(same and last_loss < first_loss,
          f"train: {type(reloaded).__name__} d_sae {reloaded.cfg.d_sae}, loss {first_loss:.3g} → {last_loss:.3g} over "
          f"{len(trained.losses)} steps; saved to {trained.path}, SAE.load_from_disk gives the same reconstruction; "
          f"metadata hook {reloaded.cfg.metadata.hook_name!r}, positions {reloaded.cfg.metadata.positions!r}")

    # 3. Splice.
    device = str(next(model.raw_model.parameters()).device)
    sae = reloaded.to(device)
    example = held_out.load(0, 4)
    inputs = {"inputs": [[image] for image in example], "prompt": [prompt] * 4} if vlm else {"inputs": example}
    with torch.no_grad():
        clean = model(**inputs)
        kept = model.run_with_saes(**inputs, saes=[sae], use_error_term=True, sae_positions=args.positions)
        moved = model.run_with_saes(**inputs, saes=[sae], sae_positions=args.positions)
        _, spliced_cache = model.run_with_cache_with_saes(**inputs, saes=[sae], names_filter=[f"{hook}.hook_sae_acts_post"])
    kept_diff, moved_diff = float((kept - clean).abs().max()), float((moved - clean).abs().max())
    check(kept_diff <= 1e-3 * max(1.0, float(clean.abs().max())),
          f"splice on {device}: with the error term max |Δ output| = {kept_diff:.2e}; without it {moved_diff:.3g}; "
          f"cache holds {hook}.hook_sae_acts_post {list(spliced_cache[f'{hook}.hook_sae_acts_post'].shape)}")

    # 4. Evaluate on held-out images.
    report = evaluate_sae(model, sae, held_out, prompt=prompt)
    written = report.save(out / "report")
    print(report.to_markdown())
    check(report.n_rows > 0, f"evaluate: explained variance {report.explained_variance:.3f}, L0 {report.l0:.1f}, "
                             f"dead {report.dead_fraction:.1%}, dense {report.dense_fraction:.1%} → {written}")

    # 5. Features.
    scan = scan_features(model, sae, train_images, prompt=prompt)
    density = scan.density
    candidates = ((density > 0.01) & (density < 0.5)).nonzero()[:, 0]
    features = candidates[density[candidates].argsort(descending=True)][:3].tolist() or [int(density.argmax())]
    tile = 1 if model.adapter.family == "llava_onevision" and hook.startswith("lm.") else 0
    galleries = [feature_gallery(model, sae, scan, f, out / "features" / f"feature_{f}.png", tile=tile) for f in features]
    histogram = density_histogram(scan, out / "features" / "density.png")
    table = feature_table(scan, out / "features" / "features.csv")
    check(all(p.exists() for p in [*galleries, histogram, table]),
          f"features: galleries of features {features} ({', '.join(str(p) for p in galleries)}), {histogram}, {table}")

    # 6. A dashboard of the strongest features, from the same scan. CLIP's readout is its beauty contrast; a VLM's
    # aesthetic readout (Yes vs No) answers another prompt than the SAE's, so VLM cards show logits instead.
    readouts = () if vlm else aesthetic_readout(model, "clip")
    dashboard = feature_dashboard(model, sae, out_dir=out / "dashboard", scan=scan, max_features=16, tile=tile,
                                  readouts=readouts, n_effect_images=8)
    pictures = [dashboard.page, dashboard.index, *dashboard.files]
    shows = [f"readout {readouts!r}"] if readouts else []
    shows += ["logits of each decoder direction"] if dashboard.logits else []
    check(all(p.exists() for p in pictures) and len(dashboard.features) > 0,
          f"dashboard: {len(dashboard.features)} features on {dashboard.page} (open {dashboard.index} in a browser); "
          f"{', '.join(shows) or 'top images and histograms'}")

    print("\n".join(f"{mark(ok)} {item.splitlines()[0][:110]}" for ok, item in check.items))
    return check.exit_code


if __name__ == "__main__":
    sys.exit(main())
