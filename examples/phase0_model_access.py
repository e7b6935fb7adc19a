"""Phase 0 — model access: the team's checklist on CLIP, end to end, with a ✓ per item.

    python examples/phase0_model_access.py                                          # tiny random CLIP, offline
    python examples/phase0_model_access.py --model openai/clip-vit-large-patch14 --device cuda
    python examples/phase0_model_access.py --model open_clip:ViT-L-14/openai --image photo.jpg

1. load the model                       5. hidden-state shapes per layer
2. list the hookable layers             6. attention heads and their hook points
3. the projection structure             7. a one-image hook test: cached residuals against the library's own
4. the image → embedding flow (PNG)        hidden states, CLS → patch attention and patch-norm heatmaps

Everything is written to --out (default out/phase0/).
"""

from __future__ import annotations

import sys

import torch

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.cli import record_shapes
from hooked_vlm.inputs import load_images
from hooked_vlm.plotting import attention_map, flow_diagram, head_grid, patch_heatmap
from hooked_vlm.sae.features import model_view
from hooked_vlm.testing import sample_image

from common import Checklist, load, parser


def library_hidden_states(model: HookedVLM, prepared) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every vision block's output and the image embedding, as the wrapped library computes them itself.

    The reference the hook test compares against: open_clip's ``forward_intermediates``, or Hugging Face's
    ``output_hidden_states`` (``hidden_states[0]`` is the block-0 input, ``[i + 1]`` block i's output). VLMs do
    not return their vision tower's hidden states: there the blocks' outputs are recorded by plain PyTorch hooks
    on the blocks during the wrapped model's own forward (what ``output_hidden_states`` records inside it).
    """
    raw, pixel_values = model.raw_model, prepared.kwargs["pixel_values"]
    with torch.no_grad():
        if hasattr(raw, "visual"):  # open_clip
            out = raw.visual.forward_intermediates(pixel_values, output_fmt="NLC", output_extra_tokens=True)
            prefixes, patches = out["image_intermediates_prefix"], out["image_intermediates"]
            return [torch.cat(parts, dim=1) for parts in zip(prefixes, patches, strict=True)], out["image_features"]
        if model.adapter.has_language_model:
            outputs: list[torch.Tensor] = []
            blocks = raw.get_submodule(model.adapter.block_list("vision"))
            handles = [
                block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
                for block in blocks
            ]
            try:
                model.adapter.forward(prepared)
            finally:
                for handle in handles:
                    handle.remove()
            return outputs, None
        vision = getattr(raw, "vision_model", raw)  # CLIPVisionModel is the vision model itself
        image_inputs = {k: v for k, v in prepared.kwargs.items() if k not in ("input_ids", "attention_mask")}  # SigLIP2: + mask, shapes
        out = vision(**image_inputs, output_hidden_states=True)
        projection = getattr(raw, "visual_projection", None)
        if projection is not None:
            return list(out.hidden_states[1:]), projection(out.pooler_output)
        # SigLIP's image embedding is the pooled output itself (no projection)
        return list(out.hidden_states[1:]), out.pooler_output if "hook_image_embeds" in model.hook_dict else None


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, default_model="tiny:clip", default_out="out/phase0").parse_args(argv)
    out = args.out
    check = Checklist()  # check(ok, item) prints a ✓/✗ line; check.summary(title) lists them at the end

    # 1. Load.
    model = load(args)
    image = load_images(args.image)[0] if args.image else sample_image()
    print(model)
    check(True, f"load: {args.model} → {type(model.raw_model).__name__} ({model.adapter.family} adapter)")

    # 2. Hookable layers: every canonical name, and the escape hatch to any module.
    names = model.hook_names()
    print(f"{len(names)} hook points; tower level: {[n for n in names if '.blocks.' not in n]}")
    print("per block (vision.blocks.0.*):", [n.removeprefix("vision.blocks.0.") for n in model.hook_names("vision.blocks.0.*")])
    check(len(model.hook_names("vision.blocks.*.hook_resid_post")) == model.adapter.towers()[0].n_layers,
          f"hookable layers: {len(names)} hook points, one hook_resid_post per vision block")

    # 3. Projection structure.
    facts = model.adapter.describe()
    for key, value in facts.items():
        print(f"  {key}: {value}")
    check("projection" in facts, f"projection structure: {facts.get('projection', 'not found')}")

    # 4. Image → embedding flow, with the shapes of one run (shapes only: see record_shapes).
    prepared = model.prepare_inputs(image)
    shapes = record_shapes(model, prepared)
    flow_diagram(model, shapes, out / "flow.png", image=image, inputs=prepared.kwargs)
    check((out / "flow.png").stat().st_size > 0, f"image → embedding flow: {out / 'flow.png'}")

    # 5. Hidden-state shapes per layer.
    resid_names = model.hook_names("vision.blocks.*.hook_resid_post")
    for name in resid_names:
        print(f"  {name}: {list(shapes[name].shape)}")
    per_layer = {tuple(shapes[name].shape) for name in resid_names}
    check(len(per_layer) == 1, f"hidden-state shapes per layer: {len(resid_names)} × {list(per_layer.pop())}")

    # 6. Attention heads and their hook points.
    for tower in model.adapter.towers():
        print(f"  {tower.name}: {tower.n_layers} blocks × {tower.n_heads} heads × d_head {tower.d_head}"
              f" ({tower.n_kv_heads or tower.n_heads} kv heads), d_mlp {tower.d_mlp}")
    head_hooks = model.hook_names("vision.blocks.0.attn.*")
    for name in head_hooks:
        print(f"  {name}: {list(shapes[name].shape)}")
    vision = model.adapter.towers()[0]
    check(shapes["vision.blocks.0.attn.hook_z"].shape[-2:] == (vision.n_heads, vision.d_head),
          f"heads and hook points: {vision.n_heads} heads × {vision.d_head} at {len(head_hooks)} attention hooks per block")

    # 7. One-image hook test. Caching residuals alone keeps the stock attention (sdpa), so the cache must equal
    # the library's own hidden states; a float32 run matches to rounding, a half-precision one to ~1e-2.
    tolerance = 1e-5 if prepared.kwargs["pixel_values"].dtype == torch.float32 else 2e-2
    embeds_name = "hook_image_embeds" if "hook_image_embeds" in names else None
    with torch.no_grad():
        _, cache = model.run_with_cache(prepared, names_filter=[*resid_names, *([embeds_name] if embeds_name else [])])
    reference_blocks, reference_embeds = library_hidden_states(model, prepared)
    errors = [  # packed towers (Qwen-VL) add a leading axis of 1 at the hook point
        relative_error(cache[name], ref.reshape(cache[name].shape))
        for name, ref in zip(resid_names, reference_blocks, strict=True)
    ]
    for name, error in zip(resid_names, errors, strict=True):
        print(f"  {name}: max |cache − library| / max |library| = {error:.1e}")
    matches = max(errors) <= tolerance
    if embeds_name and reference_embeds is not None:
        embeds_error = relative_error(cache[embeds_name], reference_embeds)
        print(f"  {embeds_name}: {embeds_error:.1e}")
        matches &= embeds_error <= tolerance
    check(matches, f"hook test: {len(errors)} cached hook_resid_post (+ image embeds) match the library's own outputs "
                   f"(worst relative error {max(errors):.1e} ≤ {tolerance:.0e})")

    # Heatmaps over the part of the image the model sees. The layout maps sequence positions to (row, col).
    view = model_view(model, image)
    last = len(resid_names) - 1
    pattern_names = model.hook_names("vision.blocks.*.attn.hook_pattern")
    with torch.no_grad():
        _, patterns = model.run_with_cache(prepared, names_filter=pattern_names)  # stops after the last block's pattern
    pattern = patterns[pattern_names[last]]  # [batch, head, query, key]
    on_patches = patterns.layout.mask("patches", pattern_names[0])[0]  # [pos] bool
    if (patterns.layout.tower_for(pattern_names[0]).kind == Kind.CLS).any():
        received = pattern[:, :, 0, :].transpose(1, 2)  # CLS row: [batch, key, head]
        what = "CLS → patch attention"
        # [layer, head]: the share of CLS attention on patches
        share = torch.stack([patterns[name][0, :, 0, on_patches].sum(-1) for name in pattern_names])
        share_title, share_label = "share of CLS attention on patches", "share"
    else:  # no CLS token: the attention each patch receives, averaged over the querying patches
        received = pattern.mean(2).transpose(1, 2)
        what = "attention received per patch"
        # [layer, head]: how much a patch attends to itself, on average (a locality measure)
        self_attention = [patterns[name][0].diagonal(dim1=-2, dim2=-1)[:, on_patches] for name in pattern_names]
        share = torch.stack([a.mean(-1) for a in self_attention])
        share_title, share_label = "mean attention of a patch to itself", "attention"
    received_grid = patterns.layout.image_grid(pattern_names[last], received).mean(-1)  # [rows, cols]
    attention_map(view, received_grid, out / "cls_attention.png", title=f"{what}, block {last}, mean over heads")
    patch_norms = cache.layout.image_grid(resid_names[last], cache[resid_names[last]]).norm(dim=-1)
    patch_heatmap(view, patch_norms, out / "patch_norm.png", title=f"‖resid_post‖ per patch, block {last}", label="L2 norm")
    head_grid(share, out / "cls_attention_heads.png", title=share_title, label=share_label)
    pngs = ["cls_attention.png", "patch_norm.png", "cls_attention_heads.png"]
    check(all((out / png).stat().st_size > 0 for png in pngs), f"heatmaps: {', '.join(str(out / png) for png in pngs)}")

    return check.summary(f"Phase 0 checklist ({args.model})")


if __name__ == "__main__":
    sys.exit(main())
