"""Phase 0 — model access on LLaVA-OneVision (and LLaVA-1.5 / LLaVA-NeXT): the team's checklist, with a ✓ per item.

    python examples/phase0_llava_onevision.py                       # tiny random LLaVA-OneVision, offline
    python examples/phase0_llava_onevision.py --model tiny:llava    # tiny LLaVA-1.5 (tiny:llava_next: LLaVA-NeXT)
    python examples/phase0_llava_onevision.py --model llava-hf/llava-v1.6-mistral-7b-hf --dtype bfloat16 --device cuda
    python examples/phase0_llava_onevision.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --device cuda
    python examples/phase0_llava_onevision.py --model llava-hf/llava-onevision-qwen2-7b-ov-hf --dtype bfloat16 \\
        --image photo.jpg --prompt "Is this photo beautiful?"

1. load the model                        6. attention heads and their hook points (SigLIP or CLIP; the LM's GQA)
2. list the hookable layers              7. a one-image hook test: cached activations against HF's own hidden
3. the projection structure                 states, projector and packed features; logits against the unwrapped
4. the image → vision tokens → projector    model; heatmaps over the image (vision tile, LM image tokens, attention)
   → packed LM tokens flow (two PNGs)    8. token layout: counts for square / wide / tall / down-scaled /
5. hidden-state shapes per layer            multi-image inputs, against the processor's own arithmetic
                                         9. early stop: vision-only requests never run the language model

Everything is written to --out (default out/phase0_llava_onevision/).
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

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.cli import record_shapes
from hooked_vlm.inputs import load_images
from hooked_vlm.plotting import attention_map, flow_diagram, patch_heatmap
from hooked_vlm.sae.features import model_view
from hooked_vlm.testing import sample_image

from common import Checklist, load, parser

PROMPT = "Describe the picture."
FAMILIES = ("llava_onevision", "llava", "llava_next")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def tiles_of(prepared) -> torch.Tensor:
    """The tiles the vision tower runs on, cut out of the padded ``pixel_values`` as ``get_image_features`` does
    (LLaVA-1.5: one untiled row per image)."""
    pixels = prepared.kwargs["pixel_values"]
    if pixels.dim() == 4:
        return pixels
    return torch.cat([pixels[p.image, : p.n_tiles] for p in prepared.layout.images])


def tile_pictures(model: HookedVLM, tiles: torch.Tensor) -> np.ndarray:
    """``[tiles, H, W, 3]`` in [0, 1]: the tiles as the model sees them (normalisation undone)."""
    processor = model.processor.image_processor
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (tiles.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def stitch(tiles: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Tiles ``[gh·gw, h, w, ...]`` in row-major order → one ``[gh·h, gw·w, ...]`` map."""
    gh, gw = grid
    h, w = tiles.shape[1:3]
    return tiles.reshape(gh, gw, h, w, *tiles.shape[3:]).swapaxes(1, 2).reshape(gh * h, gw * w, *tiles.shape[3:])


def beside(base: np.ndarray, grid: np.ndarray | None, fill: float, gap: int) -> tuple[np.ndarray, int]:
    """The base tile's map and the high-res grid's map side by side at the same scale; returns the grid's x offset."""
    if grid is None:
        return base, 0
    height = max(base.shape[0], grid.shape[0])
    canvas = np.full((height, base.shape[1] + gap + grid.shape[1], *base.shape[2:]), fill, dtype=float)
    canvas[: base.shape[0], : base.shape[1]] = base
    canvas[: grid.shape[0], base.shape[1] + gap :] = grid
    return canvas, base.shape[1] + gap


def tower_names(model: HookedVLM) -> tuple[str, str]:
    """The vision tower's and the language model's architecture names, for labels."""
    config = model.raw_model.config
    vision = "CLIP" if config.vision_config.model_type.startswith("clip") else "SigLIP"
    return vision, config.text_config.model_type.capitalize()


def packing_diagram(model: HookedVLM, image: Image.Image, prepared, cache, path: Path) -> None:
    """image → anyres tiles → vision tokens → projector (per tile) → packed LM tokens, for image 0 of ``prepared``.

    Each stage shows the base tile (left) and the high-res grid (right) at the same scale.
    """
    layout = prepared.layout
    packing = layout.images[0]
    side = packing.patch_grid[0]
    tiles = slice(packing.first_tile, packing.first_tile + packing.n_tiles)
    pictures = tile_pictures(model, tiles_of(prepared)[tiles])
    projected = cache["projector.hook_out"][tiles].float().norm(dim=-1).view(-1, side, side).cpu().numpy()
    embeds = cache["lm.hook_embed"][packing.batch].float().norm(dim=-1).cpu()
    tile_px = pictures.shape[1]

    fig = Figure(figsize=(20, 5.4), layout="constrained")
    axes = fig.subplots(1, 5, width_ratios=[0.8, 1.3, 1.3, 1.4, 0.8])
    axes[0].imshow(image)
    axes[0].set_title(f"input image\n{image.width}×{image.height} px")

    tiled = packing.tile_grid is not None
    grid_pictures = stitch(pictures[1:], packing.tile_grid) if tiled else None
    canvas, x0 = beside(pictures[0], grid_pictures, fill=1.0, gap=tile_px // 4)
    axes[1].imshow(canvas)
    grid_maps = stitch(projected[1:], packing.tile_grid) if tiled else None
    heat, x1 = beside(projected[0], grid_maps, fill=np.nan, gap=1)
    shown = axes[2].imshow(heat, cmap="magma")
    fig.colorbar(shown, ax=axes[2], shrink=0.7, location="bottom", label="L2 norm")
    if tiled:
        gh, gw = packing.tile_grid
        for ax, size, x in ((axes[1], tile_px, x0), (axes[2], side, x1)):
            for k in range(1, gh):
                ax.plot([x - 0.5, x + gw * size - 0.5], [k * size - 0.5] * 2, color="white", lw=1.5)
            for k in range(1, gw):
                ax.plot([x + k * size - 0.5] * 2, [-0.5, gh * size - 0.5], color="white", lw=1.5)
        # the letterbox the LM never sees: the unpadded grid is centred in the stitched one
        rows, cols = packing.unpadded_grid
        top, left = (gh * side - rows) // 2, (gw * side - cols) // 2
        axes[2].add_patch(Rectangle((x1 + left - 0.5, top - 0.5), cols, rows, fill=False, ec="cyan", lw=2, ls="--"))
        tiles_note = f"base tile (whole image) + {gh}×{gw} grid tiles"
    else:
        tiles_note = "one tile per image (no anyres grid)"
    vision_name = tower_names(model)[0]
    dropped = layout["vision"].shape[1] > layout.tower_for("projector.hook_out").shape[1]
    cls_note = "CLS dropped" if dropped else "no CLS"
    axes[1].set_title(
        f"tiles → {vision_name}\n{tiles_note}\n{side}×{side} = {side * side} patch tokens per tile, {cls_note}"
    )
    axes[2].set_title(
        f"projector, per tile: ‖projector.hook_out‖\n[{packing.n_tiles} tiles, {side * side}, d_lm]"
        + ("\ncyan: kept after unpadding" if tiled else "")
    )

    base_tokens = embeds[packing.positions[: side * side]].view(side, side).numpy()
    if tiled:
        rows, cols = packing.grid
        packed = embeds[packing.positions[side * side :]].view(rows, cols + 1).numpy().copy()
        packed[:, -1] = np.nan  # the newline column is one learned vector: drawn in its own colour
        heat, x = beside(base_tokens, packed, fill=np.nan, gap=1)
        newlines = np.full(heat.shape, np.nan)
        newlines[:rows, x + cols] = 1.0
        shown = axes[3].imshow(heat, cmap="magma")
        axes[3].imshow(newlines, cmap=ListedColormap(["#2ca02c"]))
        note = (
            f"down-scaled {packing.unpadded_grid[0]}×{packing.unpadded_grid[1]} → {rows}×{cols} (anyres_max): "
            "tokens interpolated"
            if packing.interpolated
            else f"unpadded {rows}×{cols}: 1 token per SigLIP patch"
        )
        counts = f"{side}×{side} base + {rows}×({cols} + 1 newline) = {packing.n_tokens} tokens"
    else:
        shown = axes[3].imshow(base_tokens, cmap="magma")
        newline = " + 1 newline" if packing.n_tokens > side * side else ""
        note, counts = "", f"{side}×{side}{newline} = {packing.n_tokens} tokens"
    fig.colorbar(shown, ax=axes[3], shrink=0.7, location="bottom", label="L2 norm")
    newlines_note = ", newlines in green" if (packing.kind == Kind.NEWLINE).any() else ""
    axes[3].set_title(f"packed into the LM\n‖lm.hook_embed‖{newlines_note}\n{counts}\n{note}")

    lm = layout["lm"]
    kind, tile = lm.kind[packing.batch].numpy(), lm.tile[packing.batch].numpy()
    labels = ["pad", "text", "base tile", "high-res grid", "newline"]
    colors = ["#ffffff", "#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c"]
    codes = np.select(
        [kind == Kind.TEXT, (kind == Kind.IMAGE) & (tile == 0), (kind == Kind.IMAGE) & (tile == 1), kind == Kind.NEWLINE],
        [1, 2, 3, 4], 0,
    )  # fmt: skip
    width = int(np.ceil(np.sqrt(len(codes))))
    strip = np.full(width * width, np.nan)
    strip[: len(codes)] = codes
    axes[4].imshow(strip.reshape(width, width), cmap=ListedColormap(colors), vmin=-0.5, vmax=4.5)
    axes[4].legend(
        handles=[Patch(color=c, label=f"{label}: {int((codes == k).sum())}") for k, (label, c) in
                 enumerate(zip(labels, colors, strict=True)) if (codes == k).any()],
        loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, ncol=2, frameon=False,
    )  # fmt: skip
    axes[4].set_title(f"the LM sequence, row-major\n{len(codes)} positions")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.title.set_fontsize(9.5)
    fig.suptitle(f"{model.adapter.family}: image → {vision_name} tokens → projector → packed LM tokens", fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    options = parser(
        __doc__,
        default_model="tiny:llava_onevision",
        default_out="out/phase0_llava_onevision",
        model_help="hub id / folder or tiny:llava_onevision",
    )
    options.add_argument("--prompt", default=PROMPT)
    args = options.parse_args(argv)
    out = args.out
    check = Checklist()  # check(ok, item) prints a ✓/✗ line; check.summary(title) lists them at the end

    # 1. Load.
    model = load(args)
    raw = model.raw_model
    tile_px = raw.config.vision_config.image_size
    image = load_images(args.image)[0] if args.image else sample_image(int(2.6 * tile_px), int(1.5 * tile_px))
    print(model)
    check(model.adapter.family in FAMILIES, f"load: {args.model} → {type(raw).__name__}")
    vision_name, lm_name = tower_names(model)

    # 2. Hookable layers.
    names = model.hook_names()
    vision, lm = model.adapter.towers()
    print(f"{len(names)} hook points; tower level: {[n for n in names if '.blocks.' not in n]}")
    print("per LM block:", [n.removeprefix("lm.blocks.0.") for n in model.hook_names("lm.blocks.0.*")])
    check(
        len(model.hook_names("vision.blocks.*.hook_resid_post")) == vision.n_layers
        and len(model.hook_names("lm.blocks.*.hook_resid_post")) == lm.n_layers,
        f"hookable layers: {len(names)} hook points ({vision.n_layers} {vision_name} + {lm.n_layers} {lm_name} blocks)",
    )

    # 3. Projection structure.
    facts = model.adapter.describe()
    for key, value in facts.items():
        print(f"  {key}: {value}")
    check("projector" in facts, f"projection structure: {facts['projector']}")

    # 4. Flow: the shapes of one run (meta tensors), then the packing of the image with real activations.
    prepared = model.prepare_inputs(image, prompt=args.prompt)
    shapes = record_shapes(model, prepared)
    flow_diagram(model, shapes, out / "flow.png", image=image, inputs=prepared.kwargs)
    # LLaVA-1.5 packs nothing: its image tokens take the features in order
    packs = "projector.hook_packed" in model.hook_dict
    with torch.no_grad():
        _, cache = model.run_with_cache(
            prepared,
            names_filter=["vision.hook_embed", "vision.hook_out", "projector.hook_in", "projector.hook_out",
                          *(["projector.hook_packed"] if packs else []), "lm.hook_embed",
                          *model.hook_names("*.hook_resid_post")],
        )  # fmt: skip
    packing_diagram(model, image, prepared, cache, out / "packing.png")
    check((out / "packing.png").stat().st_size > 0, f"image → tokens flow: {out / 'flow.png'}, {out / 'packing.png'}")

    # 5. Hidden-state shapes per layer: the vision tower runs one batch row per tile, the LM one per prompt.
    for name in ("vision.blocks.0.hook_resid_post", "vision.hook_out", "projector.hook_out", "projector.hook_packed",
                 "lm.hook_embed", "lm.blocks.0.hook_resid_post"):  # fmt: skip
        if name not in shapes:
            continue
        print(f"  {name}: {list(shapes[name].shape)}")
    n_tiles = sum(p.n_tiles for p in prepared.layout.images)
    check(
        tuple(shapes["vision.blocks.0.hook_resid_post"].shape[:2]) == prepared.layout["vision"].shape
        and shapes["vision.blocks.0.hook_resid_post"].shape[0] == n_tiles,
        f"hidden-state shapes: vision [{n_tiles} tiles, {prepared.layout['vision'].shape[1]}, {vision.d_model}], "
        f"LM {list(shapes['lm.blocks.0.hook_resid_post'].shape)}",
    )

    # 6. Attention heads.
    for name in [*model.hook_names("vision.blocks.0.attn.*"), *model.hook_names("lm.blocks.0.attn.*")]:
        print(f"  {name}: {list(shapes[name].shape)}")
    check(
        shapes["lm.blocks.0.attn.hook_k"].shape[-2:] == (lm.n_kv_heads, lm.d_head)
        and shapes["lm.blocks.0.attn.hook_q"].shape[-2:] == (lm.n_heads, lm.d_head),
        f"heads: {vision_name} {vision.n_heads} × {vision.d_head}; {lm_name} {lm.n_heads} query heads / {lm.n_kv_heads} kv-heads"
        f" × {lm.d_head} (rot_q / rot_k after RoPE)",
    )

    # 7. Hook test against HF's own outputs (caching residuals keeps sdpa: float32 matches to rounding).
    tolerance = 1e-5 if prepared.kwargs["pixel_values"].dtype == torch.float32 else 3e-2
    with torch.no_grad():
        vision_states = raw.model.vision_tower(tiles_of(prepared), output_hidden_states=True).hidden_states
        out_hf = raw(**prepared.kwargs, output_hidden_states=True)
        per_image = {k: prepared.kwargs[k] for k in ("image_sizes", "batch_num_images") if k in prepared.kwargs}
        packed = raw.model.get_image_features(prepared.kwargs["pixel_values"], **per_image).pooler_output
        # what the projector reads: the configured layer(s), CLS dropped under strategy "default"
        layers = raw.config.vision_feature_layer
        drop = int(raw.config.vision_feature_select_strategy == "default")
        layers = layers if isinstance(layers, list) else [layers]
        selected = torch.cat([vision_states[i][:, drop:] for i in layers], -1)
        projected = raw.model.multi_modal_projector(selected)
        logits = model(prepared)
    errors = {f"vision.blocks.{i}.hook_resid_post": relative_error(cache[f"vision.blocks.{i}.hook_resid_post"], s)
              for i, s in enumerate(vision_states[1:])}  # fmt: skip
    errors |= {f"lm.blocks.{i}.hook_resid_post": relative_error(cache[f"lm.blocks.{i}.hook_resid_post"], s)
               for i, s in enumerate(out_hf.hidden_states[1:-1])}  # the last HF state is after the final norm  # fmt: skip
    errors["vision.hook_out"] = relative_error(cache["vision.hook_out"], selected)
    errors["projector.hook_out"] = relative_error(cache["projector.hook_out"], projected)
    image_tokens = prepared.kwargs["input_ids"] == raw.config.image_token_id
    errors["lm.hook_embed (image tokens)"] = relative_error(cache["lm.hook_embed"][image_tokens], torch.cat(packed))
    if packs:
        errors["projector.hook_packed"] = relative_error(cache["projector.hook_packed"][0], torch.cat(packed))
    errors["logits"] = relative_error(logits, out_hf.logits)
    for name, error in errors.items():
        print(f"  {name}: max |ours − HF| / max |HF| = {error:.1e}")
    same_mask = torch.equal(prepared.layout.image_token_mask.to(image_tokens.device), image_tokens)
    check(max(errors.values()) <= tolerance and same_mask,
          f"hook test: {len(errors)} activations and the logits match HF (worst {max(errors.values()):.1e} ≤ "
          f"{tolerance:.0e}); layout.image_token_mask == (input_ids == image_token_id)")  # fmt: skip

    layout = prepared.layout
    last_vision = f"vision.blocks.{vision.n_layers - 1}.hook_resid_post"
    base_norms = layout.image_grid(last_vision, cache[last_vision], image=0, tile=0).norm(dim=-1)
    patch_heatmap(model_view(model, image).resize((tile_px, tile_px)), base_norms, out / "vision_base_tile_norm.png",
                  title=f"‖{last_vision}‖, base tile", label="L2 norm")  # fmt: skip
    pngs = ["vision_base_tile_norm.png"]
    packing = layout.images[0]
    if packing.grid is not None:
        last_lm = f"lm.blocks.{lm.n_layers - 1}.hook_resid_post"
        grid_norms = layout.image_grid(last_lm, cache[last_lm], image=0, tile=1).norm(dim=-1)
        patch_heatmap(image, grid_norms, out / "lm_image_tokens_norm.png",
                      title=f"‖{last_lm}‖ on the high-res grid tokens", label="L2 norm")  # fmt: skip
        # attention from the last prompt token to the grid tokens, caching one query row only (positions=)
        pattern_name = f"lm.blocks.{lm.n_layers - 1}.attn.hook_pattern"
        last_token = torch.zeros(layout["lm"].shape, dtype=torch.bool)
        last_token[:, -1] = True
        with torch.no_grad():
            _, patterns = model.run_with_cache(prepared, names_filter=pattern_name, positions=lambda _: last_token)
        from_last = patterns[pattern_name][0, :, 0].mean(0)  # [key]
        _, positions = layout["lm"].grid_index(0, tile=1)
        attention_map(image, from_last[positions.to(from_last.device)], out / "lm_attention_to_image.png",
                      title=f"last token → high-res image tokens, LM block {lm.n_layers - 1}, mean over heads")  # fmt: skip
        pngs += ["lm_image_tokens_norm.png", "lm_attention_to_image.png"]
    check(all((out / png).stat().st_size > 0 for png in pngs), f"heatmaps: {', '.join(str(out / p) for p in pngs)}")

    # 8. Token layout of several image shapes, against the processor's own count.
    processor = model.processor
    side = tile_px // raw.config.vision_config.patch_size
    shapes_px = {"square": (2 * tile_px, 2 * tile_px), "wide": (4 * tile_px, tile_px), "tall": (tile_px, 3 * tile_px),
                 "down-scaled": (6 * tile_px, 6 * tile_px)}  # fmt: skip
    agree = True
    for label, (w, h) in shapes_px.items():
        (p,) = model.prepare_inputs(sample_image(w, h), prompt=args.prompt).layout.images
        (expected,) = processor._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"]
        agree &= p.n_tokens == expected
        print(f"  {label:12} {w}×{h}: {p.n_tiles} tiles ({p.tile_grid}), grid {p.grid}"
              f"{' interpolated from ' + str(p.unpadded_grid) if p.interpolated else ''} → {p.n_tokens} LM tokens "
              f"(processor: {expected})")  # fmt: skip
    pair = list(shapes_px.values())[:2]
    two = model.prepare_inputs([sample_image(w, h) for w, h in pair], prompt=args.prompt)
    counts = [p.n_tokens for p in two.layout.images]
    if model.adapter.family == "llava_onevision":  # only a single-image prompt is tiled
        expected_counts, how = [side * side + 1] * 2, "base tile + newline each, no anyres grid"
    else:  # LLaVA-1.5 / NeXT treat each image as if it were alone
        sizes = [[h, w] for w, h in pair]
        expected_counts, how = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"], "as alone"
    agree &= counts == expected_counts
    print(f"  two images in one prompt: {counts} LM tokens ({how})")
    check(
        agree, "token layout: layout counts equal the processor's for square / wide / tall / down-scaled / multi-image"
    )

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
