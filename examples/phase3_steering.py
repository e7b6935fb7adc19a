"""Phase 3 — steering: vectors and SAE features, in forward passes and during generation, with a ✓ per item.

    python examples/phase3_steering.py                                     # tiny random LLaVA-OneVision, offline
    python examples/phase3_steering.py --model tiny:qwen2_vl
    python examples/phase3_steering.py --model tiny:clip                   # CLIP: probe and tower steering
    python examples/phase3_steering.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --device cuda
    python examples/phase3_steering.py --model openai/clip-vit-large-patch14 --aesthetic sac+logos+ava1-l14-linearMSE.pth
    python examples/phase3_steering.py --model ... --images-a day/ --images-b night/ --sae path/to/sae_folder

1. steering vectors from the difference of means between two image sets (A: drawn daylight scenes, B: the same
   scenes at night, or your own folders), saved and loaded back
2. a position-restricted vector (the top-left patches) and where it lands, as heatmaps
3. a sweep of scales and layers against a readout, plotted (VLMs: vectors in the vision tower and at
   projector.hook_out read in the LM's logits, i.e. cross-component; CLIP: a probe on the image embedding,
   the LAION aesthetic predictor with --aesthetic)
4. VLMs: generation at several scales, texts side by side (every step, and new tokens only)
5. VLMs: an SAE feature clamped in the vision tower (a spliced SAE with its error term), the LM's text
   (a random SAE unless --sae gives a sae_lens SAE folder)

On the tiny random models the texts are noise, but deterministic: what matters is that they change with the
scale and come back when steering is removed. Everything is written to --out (default out/phase3/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageEnhance

from hooked_vlm import HookedVLM
from hooked_vlm.inputs import load_images
from hooked_vlm.plotting import patch_heatmap
from hooked_vlm.readouts import LogitDiff, Probe, fit_linear_probe
from hooked_vlm.steering import FeatureClamp, Patches, SteeringVector, steer, sweep
from hooked_vlm.testing import sample_image

from common import Checklist, load, parser

PROMPT = "Is this picture bright or dark? Answer in one word."
SCALES = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]


def night(image: Image.Image) -> Image.Image:
    """The same scene at night: darker and bluer."""
    dark = ImageEnhance.Brightness(image).enhance(0.3)
    r, g, b = dark.split()
    return Image.merge("RGB", (r.point(lambda v: v * 0.7), g.point(lambda v: v * 0.8), b))


def image_sets(args) -> tuple[list[Image.Image], list[Image.Image]]:
    if args.images_a:
        return load_images(sorted(Path(args.images_a).iterdir())), load_images(sorted(Path(args.images_b).iterdir()))
    days = [sample_image(seed=s) for s in range(args.n_images)]
    return days, [night(day) for day in days]


def first_token(model: HookedVLM, word: str) -> int:
    """The first token of ``word``: readouts compare one token, and on the tiny byte-level tokenizer words are several."""
    return model.processor.tokenizer.encode(word, add_special_tokens=False)[0]


def model_view(model: HookedVLM, image: Image.Image) -> Image.Image:
    """The image as the heatmapped grid covers it: LLaVA-OneVision's base tile is the whole image squeezed to a
    square, CLIP keeps the centre square, Qwen2-VL the whole image at its aspect ratio."""
    side = min(image.size)
    if model.adapter.family == "llava_onevision":
        return image.resize((max(image.size),) * 2)
    if model.adapter.family in ("clip", "open_clip"):
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side))
    return image


def spread(n_layers: int, k: int = 3) -> list[int]:
    # the last vision block's output is what a VLM's projector reads: steer it at projector.hook_in / hook_out
    last = max(n_layers - 2, 0)
    return sorted({round(i * last / (k - 1)) for i in range(k)})


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__, default_model="tiny:llava_onevision", default_out="out/phase3", image=False)
    options.add_argument("--images-a", help="folder of set A images (default: drawn daylight scenes)")
    options.add_argument("--images-b", help="folder of set B images (default: the same scenes at night)")
    options.add_argument("--n-images", type=int, default=4, help="drawn images per set (default 4)")
    options.add_argument("--aesthetic", help="CLIP ViT-L/14: LAION improved-aesthetic-predictor .pth as the probe")
    options.add_argument("--sae", help="VLMs: a sae_lens SAE folder (SAE.load_from_disk) to clamp a feature of")
    options.add_argument("--max-new-tokens", type=int, default=12)
    args = options.parse_args(argv)
    out = args.out
    check = Checklist()  # check(ok, item) prints a ✓/✗ line; check.summary(title) lists them at the end

    model = load(args)
    towers = {tower.name: tower for tower in model.adapter.towers()}
    is_vlm = "lm" in towers
    prompt = PROMPT if is_vlm else None
    set_a, set_b = image_sets(args)
    image = set_a[0]
    print(model, f"\nset A: {len(set_a)} images, set B: {len(set_b)} images")

    # 1. Difference-of-means vectors: a few vision layers (+ the projector output and an LM layer for VLMs).
    vision_hooks = [f"vision.blocks.{i}.hook_resid_post" for i in spread(towers["vision"].n_layers)]
    vectors = [
        SteeringVector.from_mean_difference(model, h, set_a, set_b, prompt=prompt, progress=True) for h in vision_hooks
    ]
    if is_vlm:
        vectors.append(SteeringVector.from_mean_difference(model, "projector.hook_out", set_a, set_b, prompt=prompt))
        lm_hook = f"lm.blocks.{towers['lm'].n_layers // 2}.hook_resid_post"
        # read over the image tokens of the prompt, applied to the tokens the model generates
        lm_vector = SteeringVector.from_mean_difference(
            model, lm_hook, set_a, set_b, prompt=prompt, read_positions="image", positions="generated"
        )
    for vector in vectors:
        print(f"  {vector.hook_name}: ‖A − B‖ = {vector.direction.norm():.3g}")
    saved = vectors[-1].save(out / "vectors" / f"{vectors[-1].hook_name}.safetensors")
    loaded = SteeringVector.load(saved)
    check(torch.equal(loaded.direction, vectors[-1].direction) and loaded.provenance == vectors[-1].provenance,
          f"mean-difference vectors at {', '.join(v.hook_name for v in vectors)}{f', {lm_hook}' if is_vlm else ''}; "
          f"one saved and loaded back: {saved}")

    # 2. A position-restricted vector: only the top-left quarter of the patch grid, seen at its hook and downstream.
    first, later = vision_hooks[0], f"vision.blocks.{towers['vision'].n_layers - 1}.hook_resid_post"
    plain_cache = model.run_with_cache(image, prompt=prompt, names_filter=[first, later])[1]
    rows, cols = plain_cache.layout.tower_for(first).grids[0]
    corner = Patches([(r, c) for r in range(rows // 2) for c in range(cols // 2)], image=0, tile=0)
    local = vectors[0].replace(positions=corner, scale=2.0)
    with steer(model, local):
        steered_cache = model.run_with_cache(image, prompt=prompt, names_filter=[first, later])[1]
    view = model_view(model, image)
    for name, stem in ((first, "local_at_hook"), (later, "local_downstream")):
        change = (steered_cache[name] - plain_cache[name]).norm(dim=-1)
        grid = plain_cache.layout.image_grid(name, change, image=0, tile=0)
        patch_heatmap(view, grid, out / f"{stem}.png", title=f"‖steered − plain‖ at {name}", label="L2 norm")
    changed = plain_cache.layout.image_grid(first, (steered_cache[first] != plain_cache[first]).any(-1), image=0, tile=0)
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    expected[: rows // 2, : cols // 2] = True
    check(torch.equal(changed, expected), f"top-left patches only at {first}: {out / 'local_at_hook.png'}, "
                                          f"spread by attention at {later}: {out / 'local_downstream.png'}")

    # 3. Sweep of scales (and layers) against a readout.
    if is_vlm:
        bright, dark = first_token(model, "Bright"), first_token(model, "Dark")
        readout = LogitDiff(bright, dark)
        what = "vision tower and projector → LM logit difference Bright − Dark (cross-component)"
    else:
        if args.aesthetic:
            readout = Probe.from_laion_aesthetic(args.aesthetic)
            what = "LAION aesthetic score"
        else:
            embeds = [model.run_with_cache(s, names_filter="hook_image_embeds")[1]["hook_image_embeds"] for s in (set_a, set_b)]
            labels = torch.cat([torch.ones(len(set_a)), torch.zeros(len(set_b))])
            readout = fit_linear_probe(torch.cat(embeds), labels, "hook_image_embeds")
            what = "a linear probe A (1) vs B (0) fitted on the image embeddings"
        vectors.append(SteeringVector.from_probe(readout, scale=1.0))
    result = sweep(model, image, vectors, SCALES, readout=readout, prompt=prompt)
    written = result.save(out, "readout_sweep")
    baseline = [row["readout"] for row in result.rows if row["scale"] == 0.0]
    print(result.to_markdown())
    check(len(set(baseline)) == 1 and (out / "readout_sweep.png").exists(),
          f"sweep of {len(vectors)} vectors × {len(SCALES)} scales, readout: {what}; {', '.join(map(str, written))}")

    if not is_vlm:
        return check.summary(f"Phase 3 checklist ({args.model})")

    # 4. Generation at several scales: the projector vector at every step, the LM vector on new tokens only.
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    plain_text = model.generate(image, prompt=prompt, **generate_kwargs).text[0]
    texts = sweep(model, image, [vectors[-1], lm_vector], [0.0, 1.0, 4.0, 16.0], prompt=prompt,
                  generate_kwargs=generate_kwargs)
    texts.save(out, "generation_sweep")
    print(texts.texts_side_by_side())
    unsteered = {row["text"] for row in texts.rows if row["scale"] == 0.0}
    check(unsteered == {plain_text} and len({row["text"] for row in texts.rows}) > 1,
          f"generation side by side (scale 0 = plain generate): {out / 'generation_sweep_texts.md'}")

    # 5. An SAE feature in the vision tower, clamped through a spliced SAE with its error term.
    sae = load_sae(args.sae, vision_hooks[len(vision_hooks) // 2], towers["vision"].d_model)
    with torch.no_grad(), model.saes(sae, use_error_term=True):
        _, cache = model.run_with_cache(image, prompt=prompt, names_filter=f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post")
        acts = cache[f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"].flatten(0, -2)  # [positions, d_sae]
        feature = int(acts.mean(0).argmax())
        top = float(acts[:, feature].max())
        clamps = sweep(model, image, FeatureClamp.from_sae(sae, feature, 0.0), [0.0, top, 4 * top, 16 * top],
                       prompt=prompt, readout=readout, generate_kwargs=generate_kwargs)
        spliced_text = model.generate(image, prompt=prompt, **generate_kwargs).text[0]
    clamps.save(out, "sae_clamp")
    print(f"feature {feature} (most active on the image, max {top:.3g}):\n{clamps.texts_side_by_side()}")
    restored = model.generate(image, prompt=prompt, **generate_kwargs).text[0]
    check(spliced_text == restored == plain_text and len({row["text"] for row in clamps.rows}) > 1,
          f"SAE feature {feature} at {sae.cfg.metadata.hook_name} clamped (0 … 16 × its max): the LM's text changes; "
          f"{out / 'sae_clamp_texts.md'}, {out / 'sae_clamp.png'}")
    return check.summary(f"Phase 3 checklist ({args.model})")


def load_sae(path: str | None, hook_name: str, d_in: int):
    """A sae_lens SAE from a folder, or a random one (4× expansion) at ``hook_name`` to show the mechanics."""
    from sae_lens import SAE, StandardSAE, StandardSAEConfig

    if path:
        return SAE.load_from_disk(path)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4 * d_in))
    sae.cfg.metadata.hook_name = hook_name
    return sae


if __name__ == "__main__":
    sys.exit(main())
