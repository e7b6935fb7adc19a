"""Phase 0 — model access on Qwen2-VL: the team's checklist, end to end, with a ✓ per item.

    python examples/phase0_qwen2_vl.py                                  # tiny random Qwen2-VL, offline
    python examples/phase0_qwen2_vl.py --model Qwen/Qwen2-VL-2B-Instruct --device cuda
    python examples/phase0_qwen2_vl.py --model Qwen/Qwen2-VL-7B-Instruct --dtype bfloat16 \\
        --image photo.jpg --prompt "Is this photo beautiful?"

1. load the model                          6. attention heads and their hook points (fused qkv and 2-D RoPE
2. list the hookable layers                   in the ViT, block-diagonal over the images of a run; GQA and
3. the projection structure (patch merger)    M-RoPE in the LM)
4. the image → patches → merged tokens     7. a hook test on two images: cached activations against HF's own
   → LM flow (two PNGs)                       hidden states, block outputs and merger; logits against the
5. hidden-state shapes per layer              unwrapped model; heatmaps over the image
   (vision hooks packed: [1, all patches]) 8. dynamic resolution: patches and LM tokens for several image sizes
                                              and pixel bounds, against the processor's own count
                                           9. early stop: vision-only requests never run the language model

Everything is written to --out (default out/phase0_qwen2_vl/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.cli import record_shapes
from hooked_vlm.inputs import load_images
from hooked_vlm.plotting import flow_diagram, patch_heatmap
from hooked_vlm.testing import half_and_half_image, sample_image

from common import Checklist, load, parser

PROMPT = "Describe the picture."
#: (label, width, height) for the token-count table
SIZES = [("square", 448, 448), ("photo 4:3", 640, 480), ("HD landscape", 1920, 1080), ("HD portrait", 1080, 1920),
         ("panorama", 2000, 300), ("thumbnail", 64, 64)]  # fmt: skip


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def model_view(model: HookedVLM, prepared, image: int) -> np.ndarray:
    """``[H, W, 3]`` in [0, 1]: one image as the ViT sees it, rebuilt from the packed patches with the layout."""
    vision = prepared.layout["vision"]
    processor = model.processor.image_processor
    patch, temporal = processor.patch_size, processor.temporal_patch_size
    pixels = prepared.kwargs["pixel_values"].float().cpu().view(-1, 3, temporal, patch, patch)[:, :, 0]
    pixels = pixels * torch.tensor(processor.image_std).view(1, 3, 1, 1) + torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    _, positions = vision.grid_index(image)
    grid = pixels[positions]  # [rows, cols, 3, patch, patch]
    rows, cols = positions.shape
    return grid.permute(0, 3, 1, 4, 2).reshape(rows * patch, cols * patch, 3).clamp(0, 1).numpy()


def packing_diagram(model: HookedVLM, image: Image.Image, prepared, cache, path: Path) -> None:
    """image → resized → patches in merge-window order → ViT output → 2×2 merge → LM sequence, for image 0."""
    layout = prepared.layout
    merge = layout.spatial_merge_size
    picture = model_view(model, prepared, 0)
    _, packed = layout["vision"].grid_index(0)  # packed index of every patch, as a [rows, cols] grid
    rows, cols = packed.shape
    patch_px = picture.shape[0] // rows
    vision_norm = layout.image_grid("vision.hook_out", cache["vision.hook_out"], image=0).float().norm(dim=-1)
    merged_norm = layout.image_grid("projector.hook_out", cache["projector.hook_out"], image=0).float().norm(dim=-1)

    fig = Figure(figsize=(24, 6.2), layout="constrained")
    axes = fig.subplots(1, 6, width_ratios=[1, 1, 1.1, 1, 1, 0.8])
    axes[0].imshow(image)
    axes[0].set_title(f"input image\n{image.width}×{image.height} px", fontsize=10)
    axes[1].imshow(picture)
    for k in range(1, rows):
        axes[1].axhline(k * patch_px - 0.5, color="white", lw=0.5 if k % merge else 1.6)
    for k in range(1, cols):
        axes[1].axvline(k * patch_px - 0.5, color="white", lw=0.5 if k % merge else 1.6)
    axes[1].set_title(
        f"resized to {cols * patch_px}×{rows * patch_px} px\n(sides multiples of {patch_px * merge} px)\n"
        f"{rows}×{cols} patches of {patch_px} px\nthick lines: {merge}×{merge} merge windows"
    )
    axes[2].imshow(packed.numpy(), cmap="viridis")
    for (r, c), index in np.ndenumerate(packed.numpy()):
        if rows * cols <= 256:
            axes[2].text(c, r, str(index), ha="center", va="center", fontsize=6, color="white")
    for k in range(1, rows // merge):
        axes[2].axhline(k * merge - 0.5, color="white", lw=1.6)
    for k in range(1, cols // merge):
        axes[2].axvline(k * merge - 0.5, color="white", lw=1.6)
    axes[2].set_title("packed index of each patch\n(position in vision.* hooks)\nmerge-window order:\n4 consecutive = one window")
    shown = axes[3].imshow(vision_norm.cpu().numpy(), cmap="magma")
    fig.colorbar(shown, ax=axes[3], shrink=0.7, location="bottom", label="L2 norm")
    axes[3].set_title(f"‖vision.hook_out‖\non the patch grid\n[1, {layout['vision'].shape[1]} packed patches, d]")
    shown = axes[4].imshow(merged_norm.cpu().numpy(), cmap="magma")
    fig.colorbar(shown, ax=axes[4], shrink=0.7, location="bottom", label="L2 norm")
    axes[4].set_title(
        f"‖projector.hook_out‖\non the merged grid\n{rows // merge}×{cols // merge} = {(rows // merge) * (cols // merge)} "
        f"LM tokens\n({patch_px * merge}×{patch_px * merge} px each)"
    )

    lm = layout["lm"]
    kind, owner = lm.kind[0].numpy(), lm.image[0].numpy()
    codes = np.select([kind == Kind.TEXT, (kind == Kind.IMAGE) & (owner == 0), kind == Kind.IMAGE], [1, 2, 3], 0)
    labels, colors = ["pad", "text", "image 0 tokens", "other images' tokens"], ["#ffffff", "#9e9e9e", "#ff7f0e", "#1f77b4"]
    width = int(np.ceil(np.sqrt(len(codes))))
    strip = np.full(width * width, np.nan)
    strip[: len(codes)] = codes
    axes[5].imshow(strip.reshape(width, width), cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5)
    axes[5].legend(
        handles=[Patch(color=c, label=f"{label}: {int((codes == k).sum())}") for k, (label, c) in
                 enumerate(zip(labels, colors, strict=True)) if (codes == k).any()],
        loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, ncol=1, frameon=False,
    )  # fmt: skip
    axes[5].set_title(f"LM sequence of prompt 0\nrow-major, {len(codes)} positions")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{model.adapter.family}: image → patches → ViT → 2×2 merge → LM tokens", fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def block_diagonal_figure(pattern: torch.Tensor, bounds: list[int], path: Path, title: str) -> None:
    """The packed vision pattern (mean over heads) with the image segments outlined."""
    fig = Figure(figsize=(6, 5.4), layout="constrained")
    ax = fig.add_subplot()
    shown = ax.imshow(pattern.float().cpu().numpy(), cmap="viridis", interpolation="nearest")
    for start, end in zip(bounds, bounds[1:], strict=False):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("key (packed patch index)")
    ax.set_ylabel("query (packed patch index)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, shrink=0.85, label="attention weight")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def token_table(model: HookedVLM, prompt: str) -> tuple[str, bool]:
    """Patches and LM tokens per image size under the processor's bounds and two others; counts from the layout
    of a real prepare, checked against the processor's own arithmetic."""
    image_processor = model.processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    bounds = {"processor": (size["shortest_edge"], size["longest_edge"])}
    bounds |= {f"max {n}·28²": (size["shortest_edge"], n * 28 * 28) for n in (64, 256)}
    lines = ["| image | size | pixel bounds | resized | patch grid | patches | LM tokens |", "|---|---|---|---|---|---|---|"]
    agree = True
    for label, w, h in SIZES:
        for name, (low, high) in bounds.items():
            prepared = model.prepare_inputs(sample_image(w, h), prompt=prompt, min_pixels=low, max_pixels=high)
            tokens = int((prepared.layout["lm"].kind == Kind.IMAGE).sum())
            _, gh, gw = prepared.layout.image_grid_thw[0].tolist()
            expected = image_processor.get_number_of_image_patches(h, w, {"min_pixels": low, "max_pixels": high})
            rh, rw = smart_resize(h, w, factor, min_pixels=low, max_pixels=high)
            agree &= gh * gw == expected and tokens == expected // 4 and (rh, rw) == (gh * 14, gw * 14)
            lines.append(f"| {label} | {w}×{h} | {name} | {rw}×{rh} | {gh}×{gw} | {gh * gw} | {tokens} |")
    return "\n".join(lines), agree


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__, default_model="tiny:qwen2_vl", default_out="out/phase0_qwen2_vl",
                     model_help="hub id / folder or tiny:qwen2_vl", image="image file (default: a drawn 448×336 sample image)")
    options.add_argument("--prompt", default=PROMPT)
    args = options.parse_args(argv)
    out = args.out
    check = Checklist()  # check(ok, item) prints a ✓/✗ line; check.summary(title) lists them at the end

    # 1. Load.
    model = load(args)
    raw = model.raw_model
    image = load_images(args.image)[0] if args.image else sample_image(448, 336)
    second = half_and_half_image(448, 224)  # a second image: the vision tower packs both into one sequence
    print(model)
    check(model.adapter.family in ("qwen2_vl", "qwen2_5_vl"), f"load: {args.model} → {type(raw).__name__}")

    # 2. Hookable layers.
    names = model.hook_names()
    vision, lm = model.adapter.towers()
    print(f"{len(names)} hook points; tower level: {[n for n in names if '.blocks.' not in n]}")
    print("per vision block:", [n.removeprefix("vision.blocks.0.") for n in model.hook_names("vision.blocks.0.*")])
    check(
        len(model.hook_names("vision.blocks.*.hook_resid_post")) == vision.n_layers
        and len(model.hook_names("lm.blocks.*.hook_resid_post")) == lm.n_layers,
        f"hookable layers: {len(names)} hook points ({vision.n_layers} ViT + {lm.n_layers} Qwen2 blocks)",
    )

    # 3. Projection structure.
    facts = model.adapter.describe()
    for key, value in facts.items():
        print(f"  {key}: {value}")
    merger = raw.model.visual.merger
    check(
        merger.mlp[0].in_features == 4 * vision.d_model and merger.mlp[2].out_features == lm.d_model,
        f"projection structure: {facts['projection']}",
    )

    # 4. Flow: the shapes of one run (meta tensors), then the packing of the image with real activations.
    prepared = model.prepare_inputs([image, second], prompt=args.prompt)
    shapes = record_shapes(model, prepared)
    flow_diagram(model, shapes, out / "flow.png", image=image, inputs=prepared.kwargs)
    last_vision = f"vision.blocks.{vision.n_layers - 1}"
    with torch.no_grad():
        _, cache = model.run_with_cache(
            prepared,
            names_filter=["vision.hook_embed", "vision.hook_out", "projector.hook_merged", "projector.hook_out",
                          "lm.hook_embed", *model.hook_names("*.hook_resid_post"), f"{last_vision}.attn.hook_pattern"],
        )  # fmt: skip
    packing_diagram(model, image, prepared, cache, out / "packing.png")
    check((out / "packing.png").stat().st_size > 0, f"image → tokens flow: {out / 'flow.png'}, {out / 'packing.png'}")

    # 5. Hidden-state shapes: the ViT runs on all patches of all images at once (packed), the LM per prompt.
    layout = prepared.layout
    for name in ("vision.hook_embed", "vision.blocks.0.hook_resid_post", "vision.hook_out", "projector.hook_merged",
                 "projector.hook_out", "lm.hook_embed", "lm.blocks.0.hook_resid_post"):  # fmt: skip
        print(f"  {name}: {list(shapes[name].shape)}")
    grids = layout.image_grid_thw.tolist()
    n_patches = sum(t * h * w for t, h, w in grids)
    check(
        tuple(shapes["vision.blocks.0.hook_resid_post"].shape) == (1, n_patches, vision.d_model)
        and tuple(shapes["projector.hook_out"].shape) == (1, n_patches // 4, lm.d_model),
        f"hidden-state shapes: vision [1, {n_patches} packed patches of images {grids}, {vision.d_model}], "
        f"projector [1, {n_patches // 4}, {lm.d_model}], LM {list(shapes['lm.blocks.0.hook_resid_post'].shape)}",
    )

    # 6. Attention heads; the packed vision pattern is block-diagonal over the images.
    for name in [*model.hook_names("vision.blocks.0.attn.*"), *model.hook_names("lm.blocks.0.attn.*")]:
        print(f"  {name}: {list(shapes[name].shape)}")
    pattern = cache[f"{last_vision}.attn.hook_pattern"][0].mean(0)
    bounds = np.cumsum([0] + [t * h * w for t, h, w in grids]).tolist()
    outside = torch.ones_like(pattern, dtype=torch.bool)
    for start, end in zip(bounds, bounds[1:], strict=False):
        outside[start:end, start:end] = False
    block_diagonal_figure(pattern, bounds, out / "vision_attention_blocks.png",
                          f"{last_vision}.attn.hook_pattern, mean over heads\nred: one image each (block-diagonal)")  # fmt: skip
    check(
        shapes["lm.blocks.0.attn.hook_k"].shape[-2:] == (lm.n_kv_heads, lm.d_head)
        and shapes["vision.blocks.0.attn.hook_q"].shape[-2:] == (vision.n_heads, vision.d_head)
        and bool((pattern[outside] == 0).all()),
        f"heads: ViT {vision.n_heads} × {vision.d_head} (q/k/v split from the fused qkv; rot_q/rot_k after 2-D RoPE; "
        f"pattern [1, heads, {n_patches}, {n_patches}] block-diagonal per image); Qwen2 {lm.n_heads} query / "
        f"{lm.n_kv_heads} kv heads × {lm.d_head} (M-RoPE)",
    )

    # 7. Hook test against HF (caching residuals keeps sdpa: float32 matches to rounding).
    tolerance = 1e-5 if raw.dtype == torch.float32 else 3e-2
    blocks: dict[int, torch.Tensor] = {}
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: blocks.__setitem__(i, o))
               for i, blk in enumerate(raw.model.visual.blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            out_hf = raw(**prepared.kwargs, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        features = raw.model.get_image_features(prepared.kwargs["pixel_values"], prepared.kwargs["image_grid_thw"])
        logits = model(prepared)
    errors = {f"vision.blocks.{i}.hook_resid_post": relative_error(cache[f"vision.blocks.{i}.hook_resid_post"][0], s)
              for i, s in blocks.items()}  # fmt: skip
    errors |= {f"lm.blocks.{i}.hook_resid_post": relative_error(cache[f"lm.blocks.{i}.hook_resid_post"], s)
               for i, s in enumerate(out_hf.hidden_states[1:-1])}  # the last HF state is after the final norm  # fmt: skip
    merged = cache["projector.hook_out"][0]
    if getattr(layout, "window_index", None) is not None:  # Qwen2.5-VL: the merger runs in window order
        merged = merged[torch.argsort(layout.window_index)]
    errors["projector.hook_out"] = relative_error(merged, torch.cat(features.pooler_output))
    errors["logits"] = relative_error(logits, out_hf.logits)
    for name, error in errors.items():
        print(f"  {name}: max |ours − HF| / max |HF| = {error:.1e}")
    check(max(errors.values()) <= tolerance,
          f"hook test: {len(errors)} activations and the logits match HF (worst {max(errors.values()):.1e} ≤ {tolerance:.0e})")  # fmt: skip

    seen = Image.fromarray((model_view(model, prepared, 0) * 255).astype(np.uint8))
    last_lm = f"lm.blocks.{lm.n_layers - 1}.hook_resid_post"
    patch_heatmap(seen, layout.image_grid(f"{last_vision}.hook_resid_post", cache[f"{last_vision}.hook_resid_post"]).norm(dim=-1),
                  out / "vision_norm.png", title=f"‖ViT block {vision.n_layers - 1} resid_post‖, image 0", label="L2 norm")  # fmt: skip
    patch_heatmap(seen, layout.image_grid(last_lm, cache[last_lm]).norm(dim=-1), out / "lm_image_tokens_norm.png",
                  title=f"‖LM block {lm.n_layers - 1} resid_post‖, image 0's tokens", label="L2 norm")  # fmt: skip
    pngs = ["vision_norm.png", "lm_image_tokens_norm.png", "vision_attention_blocks.png"]
    check(all((out / png).stat().st_size > 0 for png in pngs), f"heatmaps: {', '.join(str(out / p) for p in pngs)}")

    # 8. Dynamic resolution: token counts per image size and pixel bounds.
    table, agree = token_table(model, args.prompt)
    print(table)
    (out / "token_counts.md").write_text(table + "\n")
    per_image = [int(((layout["lm"].kind == Kind.IMAGE) & (layout["lm"].image == j)).sum()) for j in range(len(grids))]
    agree &= per_image == [t * h * w // 4 for t, h, w in grids]
    print(f"  two images in one prompt: {per_image} LM tokens, grids {grids}")
    check(agree, f"token layout: layout counts equal the processor's for {len(SIZES)} sizes × 3 bounds and a "
                 f"two-image prompt ({out / 'token_counts.md'})")  # fmt: skip

    # 9. Early stop across towers.
    calls = []
    handle = raw.model.language_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            result, vision_only = model.run_with_cache(prepared, names_filter=["vision.hook_out", "projector.hook_out"])
    finally:
        handle.remove()
    check(result is None and not calls and len(vision_only) == 2,
          "early stop: vision / projector hooks only → the language model never ran")  # fmt: skip

    return check.summary(f"Phase 0 checklist ({args.model})")


if __name__ == "__main__":
    sys.exit(main())
