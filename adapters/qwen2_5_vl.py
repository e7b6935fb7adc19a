"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct, -72B-Instruct).

A Qwen2-VL (:mod:`hooked_vlm.adapters.qwen2_vl`, whose adapter this one extends) with three changes that matter
for hooks:

* **Vision blocks** are RMSNorm/SwiGLU: ``norm1``, ``attn{qkv, proj}``, ``norm2``, ``mlp{gate_proj, up_proj,
  act_fn, down_proj}``. ``mlp.hook_pre`` is the gate's pre-activation (``gate_proj`` output),
  ``mlp.hook_pre_linear`` the up projection, ``mlp.hook_post`` ``act(gate) · up`` (``down_proj``'s input), as in
  the LM's SwiGLU blocks.
* **Windowed attention.** Blocks not listed in ``vision_config.fullatt_block_indexes`` attend within windows of
  ``window_size`` px (112 px = 8×8 patches at real size; the last window of a row or column is smaller), the
  listed ones over the whole image. The attention hooks replay all segments of a call at once, as for Qwen2-VL:
  ``hook_pattern`` is ``[1, head, Σ patches, Σ patches]``, block-diagonal per window in windowed blocks and per
  image in full blocks.
* **Window order.** Right after ``patch_embed`` the tower reorders the merge units (2×2 patches) so that each
  window is contiguous (``window_index``), runs every block and the merger in that order, and undoes it only
  after the merger (``merged[argsort(window_index)]``). So ``vision.blocks.*`` (after ``hook_embed``) and every
  ``projector.*`` hook except the LM's view see the packed sequence in window order; :class:`Qwen2_5_VLLayout`
  maps each packed index back to (image, frame, row, col) in raster terms through the model's own
  ``window_index``, so selectors, ``to_patch_grid`` and ``image_grid`` are the same as for every family.
  ``vision.hook_embed`` (``patch_embed``'s output) is still in the processor's merge-window order.

The LM is Qwen2 with M-RoPE, with the same module names as Qwen2-VL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hooked_vlm.adapters.qwen2_vl import Qwen2VLAdapter, Qwen2VLLayout, _image_tower, _lm_tower
from jaxtyping import Int
from torch import Tensor
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from hooked_vlm.adapter import BlockPaths, TowerInfo, register_adapter
from hooked_vlm.layout import TowerLayout

VISION_BLOCK = BlockPaths(
    ln1="norm1", attn="attn", ln2="norm2", mlp="mlp", q="qkv", k="qkv", v="qkv", o="proj",
    mlp_in="gate_proj", mlp_up="up_proj", mlp_out="down_proj",
)


@dataclass
class Qwen2_5_VLLayout(Qwen2VLLayout):
    """:class:`~hooked_vlm.adapters.qwen2_vl.Qwen2VLLayout` with the vision blocks and merger in window order.

    ``window_index[m]`` is the merge unit (in the processor's order, over all images) at window-ordered merged
    position ``m``; ``window_bounds`` the packed patch offsets where the attention windows start and end.
    """

    window_index: Int[Tensor, " merged"] | None = None  # noqa: F722 (jaxtyping)
    window_bounds: list[int] | None = None
    fullatt_block_indexes: tuple[int, ...] = ()

    def attention_segments(self, block: int) -> list[int]:
        """Packed patch offsets bounding the attention segments of vision block ``block`` (windows or images)."""
        if self.image_grid_thw is None:
            raise ValueError("this input has no images, so the vision tower does not run")
        if block in self.fullatt_block_indexes:
            sizes = self.image_grid_thw.prod(-1)
            return [0, *sizes.cumsum(0).tolist()]
        return list(self.window_bounds)


def _reordered(tower: TowerLayout, order: Tensor) -> TowerLayout:
    return TowerLayout(
        kind=tower.kind[:, order], image=tower.image[:, order], tile=tower.tile[:, order], row=tower.row[:, order],
        col=tower.col[:, order], grids=list(tower.grids), notes=list(tower.notes),
    )


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    vision_block_paths = VISION_BLOCK

    def towers(self) -> list[TowerInfo]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        return [
            TowerInfo(
                name="vision", n_layers=vision.depth, d_model=vision.hidden_size, n_heads=vision.num_heads,
                d_head=vision.hidden_size // vision.num_heads, d_mlp=vision.intermediate_size,
            ),
            TowerInfo(
                name="lm", n_layers=text.num_hidden_layers, d_model=text.hidden_size,
                n_heads=text.num_attention_heads, d_head=text.hidden_size // text.num_attention_heads,
                n_kv_heads=text.num_key_value_heads, d_mlp=text.intermediate_size,
            ),
        ]

    def _layout(self, model_kwargs: dict[str, Any]) -> Qwen2_5_VLLayout:
        input_ids = model_kwargs["input_ids"]
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision = self.model.config.vision_config
        merge = vision.spatial_merge_size
        grid_thw = model_kwargs.get("image_grid_thw")
        towers: dict[str, TowerLayout] = {}
        window_index = bounds = None
        if grid_thw is not None:
            grid_thw = grid_thw.cpu()
            # the model's own function, so the layout follows whatever order the tower runs in
            window_index, cu_window = get_vision_window_index(
                grid_thw, spatial_merge_size=merge, window_size=vision.window_size, patch_size=vision.patch_size
            )
            unit = merge * merge
            patches = (window_index[:, None] * unit + torch.arange(unit)).flatten()
            processor_order = _image_tower(grid_thw, merge, merged=False)
            merged = _image_tower(grid_thw, merge, merged=True)
            towers["embed"] = processor_order
            towers["vision"] = _reordered(processor_order, patches)
            towers["projector"] = _reordered(merged, window_index)
            bounds = cu_window.tolist()
        # the LM receives the merger's rows after the model undoes the window order: raster per image
        towers["lm"] = _lm_tower(
            input_ids, attention_mask, self.model.config.image_token_id,
            None if grid_thw is None else _image_tower(grid_thw, merge, merged=True),
        )
        return Qwen2_5_VLLayout(
            towers,
            tower_of_prefix={"vision.hook_embed": "embed", "projector.hook_in": "vision", "projector.ln": "vision"},
            image_grid_thw=grid_thw,
            spatial_merge_size=merge,
            window_index=window_index,
            window_bounds=bounds,
            fullatt_block_indexes=tuple(vision.fullatt_block_indexes),
        )

    def describe(self) -> dict[str, Any]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        side = vision.window_size // patch
        facts = {
            "patches": f"{patch}×{patch} px × {vision.temporal_patch_size} frames (an image fills both frames)",
            "merge": f"{merge}×{merge} patches → 1 LM token ({patch * merge}×{patch * merge} px per token)",
            "positions": (
                f"vision: 2-D rotary (row, col); LM: M-RoPE (t, h, w), sections "
                f"{text.rope_parameters.get('mrope_section')}"
            ),
        }
        if self.processor is not None:
            size = self.processor.image_processor.size
            facts["resolution"] = (
                f"dynamic: sides rounded to multiples of {patch * merge} px, "
                f"{size['shortest_edge']} ≤ H·W ≤ {size['longest_edge']} px (min_pixels / max_pixels)"
            )
        facts["vision tokens"] = (
            f"all images' patches packed into one sequence, reordered by window; blocks "
            f"{list(vision.fullatt_block_indexes)} attend per image, the others per {vision.window_size} px window "
            f"({side}×{side} patches)"
        )
        facts["vision blocks"] = "RMSNorm, fused qkv with 2-D rotary, SwiGLU MLP (gate_proj, up_proj, down_proj)"
        facts["projection"] = (
            f"merger: RMSNorm → {merge}×{merge} merge ({vision.hidden_size}·{merge * merge}) → Linear → GELU → "
            f"Linear(→ {vision.out_hidden_size}), then the window order is undone"
        )
        return facts
