"""LLaVA-OneVision: transformers ``LlavaOnevisionForConditionalGeneration`` (SigLIP + 2-layer MLP projector + Qwen2).

Module tree (transformers 5.x) and where the canonical hooks sit::

    model.vision_tower.embeddings              patch conv + learned positions, no CLS  → vision.hook_embed [tiles, 729, d]
    model.vision_tower.encoder.layers.{i}      layer_norm1, self_attn{q,k,v,out}_proj, layer_norm2, mlp{fc1, fc2}
                                               → vision.blocks.{i}.*  (one batch row per tile)
    model.vision_tower.encoder.layers.{-1}     the feature layer the projector reads   → vision.hook_out
    model.vision_tower.post_layernorm          computed by SigLIP, unused by LLaVA-OneVision (no hook)
    model.multi_modal_projector                linear_1 → act (GELU) → linear_2       → projector.hook_in / hook_pre /
                                                                                         hook_post / hook_out [tiles, 729, d_lm]
    model.pack_image_features  (a method)      per image: base tile, then the unpadded high-res grid (bilinearly
                                               down-scaled under anyres_max_9) with image_newline after every row
                                                                                       → projector.hook_packed [1, image tokens, d_lm]
    model.language_model  (inputs_embeds)      token embeddings with the packed features scattered in
                                                                                       → lm.hook_embed [batch, seq, d_lm]
    model.language_model.layers.{i}            input_layernorm, self_attn{q,k,v,o}_proj (GQA, RoPE),
                                               post_attention_layernorm, mlp{gate,up,down}_proj (SwiGLU) → lm.blocks.{i}.*
    model.language_model.norm                  final RMSNorm                           → lm.ln_final.hook_normalized
    lm_head                                    → the logits this adapter returns

The LLaVA-OneVision ``InputLayout`` (:class:`LlavaOnevisionLayout`) is computed by running the model's own
``pack_image_features`` on tile/patch *indices* instead of features, so it follows the checkpoint's anyres
arithmetic exactly (unpadding, anyres_max down-scaling, newline columns) instead of re-deriving it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from hooked_vlm.adapters.siglip import SIGLIP_BLOCK
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from hooked_vlm.adapter import BlockPaths, HFAdapter, Prepared, TowerInfo, block_hooks, register_adapter
from hooked_vlm.inputs import chat_prompts, check_type, is_pixel_values, is_processor_output, model_keywords, to_model
from hooked_vlm.layout import InputLayout, Kind, TowerLayout, text_tower
from hooked_vlm.taps import InputTap, InstanceOverride, OutputTap, Tap, submodule
from hooked_vlm.widths import output_width

QWEN2_BLOCK = BlockPaths(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="post_attention_layernorm",
    mlp="mlp",
    o="o_proj",
    mlp_in="gate_proj",
    mlp_up="up_proj",
    mlp_out="down_proj",
)

VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LM = "model.language_model"
#: forward keywords that choose which vision features reach the projector
FEATURE_KEYWORDS = ("vision_feature_layer", "vision_feature_select_strategy")

#: the block lists of a composite VLM built as ``model.vision_tower`` + ``model.language_model``
BLOCK_LISTS = {"vision": f"{VISION}.encoder.layers", "lm": f"{LM}.layers"}


def vision_block_hooks(vision: TowerInfo, block: BlockPaths = SIGLIP_BLOCK) -> dict[str, Tap]:
    """Every block of ``model.vision_tower`` (SigLIP in LLaVA-OneVision and Gemma 3, CLIP in LLaVA-1.5 / NeXT)."""
    hooks: dict[str, Tap] = {}
    for i in range(vision.n_layers):
        hooks |= block_hooks(f"vision.blocks.{i}", f"{BLOCK_LISTS['vision']}.{i}", block, vision.d_head)
    return hooks


def siglip_tower_hooks(vision: TowerInfo) -> dict[str, Tap]:
    """``vision.hook_embed`` and every SigLIP block of ``model.vision_tower`` (LLaVA-OneVision, Gemma 3)."""
    return {"vision.hook_embed": OutputTap(f"{VISION}.embeddings")} | vision_block_hooks(vision)


#: the projector runs per tile, like the vision tower; its packed output is a sequence of its own
TOWER_OF_PREFIX = {"projector": "vision", "projector.hook_packed": "packed"}


# ---------------------------------------------------------------------------------------------------------------
# Taps for the two boundaries that are not a module's first input or output.


@dataclass(frozen=True)
class PackedFeaturesTap(Tap):
    """The packed image features, exactly as they are scattered into the LM: ``[1, image tokens, d_lm]``.

    Packing (tile stitching, unpadding, anyres_max interpolation, newline columns) happens in the instance method
    ``LlavaOnevisionModel.pack_image_features``, not in a module, so there is no PyTorch hook to attach. For the
    run we shadow that method on the instance with a wrapper (the class is untouched, other instances unaffected)
    and restore it afterwards. All images of the batch are concatenated in prompt order, which is the order of
    ``input_ids == image_token_id`` over ``[batch, seq]``.
    """

    def install(self, root, hp, run):
        owner = submodule(root, self.module)
        pack = owner.pack_image_features

        def pack_and_fire(*args, **kwargs):
            features, lengths = pack(*args, **kwargs)
            packed = torch.cat(features)[None]
            new = run.fire(hp, packed)
            if new is not packed:
                features = list(new[0].split(lengths.tolist()))
            return features, lengths

        return [InstanceOverride(owner, "pack_image_features", pack_and_fire)]

    def describe(self) -> str:
        return f"{self.module}.pack_image_features → return value (concatenated over images)"


@dataclass(frozen=True)
class KeywordInputTap(Tap):
    """The keyword argument ``keyword`` of ``module`` (the LM is called with keyword arguments only)."""

    keyword: str = "inputs_embeds"

    def install(self, root, hp, run):
        keyword = self.keyword

        def hook(module, args, kwargs):
            x = kwargs[keyword]
            new = run.fire(hp, x)
            if new is not x:
                return args, {**kwargs, keyword: new}
            return None

        return [submodule(root, self.module).register_forward_pre_hook(hook, with_kwargs=True, prepend=True)]

    def describe(self) -> str:
        return f"{self.module} → input {self.keyword}"


# ---------------------------------------------------------------------------------------------------------------
# Layout: where each vision row and LM token of an input came from.


@dataclass
class ImagePacking:
    """How one image becomes vision tiles and LM tokens; the tensors run over its LM tokens in packed order.

    ``source[k]`` is the flat index ``tile_row * tokens + token`` into the projector's ``[tiles, tokens]`` rows
    (tiles counted over the whole input; for LLaVA-OneVision these are the SigLIP tower's ``[tiles, 729]`` rows too)
    of the feature that LM token ``k`` of this image carries, or -1 for newline tokens and for tokens of an
    interpolated (anyres_max down-scaled) grid, which mix several patches.
    """

    image: int  # index over all images of the input, in prompt order
    first_tile: int  # its first row in the vision tower's batch axis
    n_tiles: int  # 1 base tile (whole image, resized) + the anyres grid tiles; 1 in multi-image prompts
    tile_grid: tuple[int, int] | None  # (rows, cols) of anyres tiles; grid tile t ≥ 1 sits at divmod(t - 1, cols)
    patch_grid: tuple[int, int]  # (rows, cols) of patches per tile (27 × 27 at real size)
    unpadded_grid: tuple[int, int] | None  # patch grid of the stitched tiles after removing the letterbox padding
    grid: tuple[int, int] | None  # (rows, cols) of the high-res grid in the LM (before its newline column)
    kind: Int[Tensor, " n_tokens"] = field(repr=False)  # Kind.IMAGE or Kind.NEWLINE
    tile: Int[Tensor, " n_tokens"] = field(repr=False)  # 0: base tile, 1: high-res grid
    row: Int[Tensor, " n_tokens"] = field(repr=False)  # newline tokens: the row they end (-1 after a lone tile)
    col: Int[Tensor, " n_tokens"] = field(repr=False)  # newline tokens: cols of the grid (-1 after a lone tile)
    source: Int[Tensor, " n_tokens"] = field(repr=False)
    batch: int = -1  # the prompt (batch row) the image belongs to
    positions: Int[Tensor, " n_tokens"] | None = field(default=None, repr=False)  # LM positions in row `batch`

    @property
    def n_tokens(self) -> int:
        return len(self.kind)

    @property
    def interpolated(self) -> bool:
        """True if anyres_max down-scaled the high-res grid: its LM tokens are not 1:1 SigLIP patches."""
        return self.grid is not None and self.grid != self.unpadded_grid


@dataclass
class LlavaOnevisionLayout(InputLayout):
    """The :class:`InputLayout` of a LLaVA-OneVision input, with the packing of every image.

    Towers: ``"vision"`` ``[tiles, 729]`` (image, tile, row, col within the tile; tile 0 is the base tile),
    ``"lm"`` ``[batch, seq]`` (text, padding, image tokens with tile 0 = base tile and tile 1 = high-res grid,
    newline tokens with the row they end), and ``"packed"`` ``[1, image tokens]`` for ``projector.hook_packed``.
    """

    images: list[ImagePacking] = field(default_factory=list)

    def image_positions(self, image: int) -> tuple[int, Int[Tensor, " n_tokens"]]:
        """``(batch row, LM positions)`` of every token of ``image`` (base, grid and newlines, in packed order)."""
        packing = self.images[image]
        return packing.batch, packing.positions


def _index_grid(n: int, cols: int) -> tuple[Tensor, Tensor]:
    """``(row, col)`` of ``n`` row-major positions in rows of ``cols``."""
    k = torch.arange(n)
    return k // cols, k % cols


def _place_images(images: list[ImagePacking], image_tokens: Bool[Tensor, "batch seq"], lm: TowerLayout) -> None:
    """Give each image the LM positions it fills (the image tokens, in order, prompt after prompt) and mark them."""
    free = [row.nonzero()[:, 0] for row in image_tokens]
    b = 0
    for packing in images:
        while b < len(free) and not len(free[b]):
            b += 1
        if b == len(free) or len(free[b]) < packing.n_tokens:
            raise ValueError(
                f"image {packing.image} packs to {packing.n_tokens} LM tokens but its prompt has "
                f"{len(free[b]) if b < len(free) else 0} image tokens left; the prompt's <image> placeholders do "
                "not match the images (were they expanded by this checkpoint's processor?)"
            )
        packing.batch, packing.positions, free[b] = b, free[b][: packing.n_tokens], free[b][packing.n_tokens :]
        at = (b, packing.positions)
        lm.kind[at], lm.tile[at], lm.row[at], lm.col[at] = packing.kind, packing.tile, packing.row, packing.col
        lm.image[at] = packing.image
        lm.grids += [packing.patch_grid] + ([packing.grid] if packing.grid else [])
        if packing.interpolated:
            (rows, cols), (to_rows, to_cols) = packing.unpadded_grid, packing.grid
            lm.notes.append(
                f"image {packing.image}: its {rows}×{cols} high-res patch grid was bilinearly down-scaled to "
                f"{to_rows}×{to_cols} (anyres_max); those LM tokens are interpolated, not 1:1 SigLIP patches"
            )
    left = sum(len(f) for f in free)
    if left:
        raise ValueError(f"{left} image tokens in the prompts have no image to fill them")


def _vision_tower(images: list[ImagePacking], n_prefix: int = 0) -> TowerLayout:
    """``[tiles, n_prefix + patches]``: every vision row is one tile of one image, ``n_prefix`` CLS tokens first
    (CLIP towers), then the patches in row-major order."""
    rows, cols = images[0].patch_grid
    n, width = sum(p.n_tiles for p in images), n_prefix + rows * cols
    image = torch.cat([torch.full((p.n_tiles,), p.image) for p in images])
    tile = torch.cat([torch.arange(p.n_tiles) for p in images])
    row, col = (torch.cat([torch.full((n_prefix,), -1), x]) for x in _index_grid(rows * cols, cols))
    kind = torch.full((n, width), int(Kind.PATCH))
    kind[:, :n_prefix] = int(Kind.CLS)
    return TowerLayout(
        kind=kind,
        image=image[:, None].expand(n, width).clone(),
        tile=tile[:, None].expand(n, width).clone(),
        row=row.expand(n, -1).clone(),
        col=col.expand(n, -1).clone(),
        grids=[(rows, cols)] * n,
    )


def _packed_tower(lm: TowerLayout, image_tokens: Bool[Tensor, "batch seq"]) -> TowerLayout:
    """``[1, image tokens]``: the LM's image-token positions, concatenated over the batch (``projector.hook_packed``)."""
    return TowerLayout(
        *(field_[image_tokens][None] for field_ in (lm.kind, lm.image, lm.tile, lm.row, lm.col)),
        grids=list(lm.grids),
        notes=list(lm.notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# The adapter.


@register_adapter
class LlavaOnevisionAdapter(HFAdapter):
    family = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    image_features_method = ("model", "get_image_features")
    #: module names inside one vision block (the LLaVA-1.5 / NeXT adapters put CLIP's here)
    vision_block: BlockPaths = SIGLIP_BLOCK

    # ---- structure --------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def towers(self) -> list[TowerInfo]:
        vision, text = self.config.vision_config, self.config.text_config
        return [
            TowerInfo(
                name="vision",
                n_layers=vision.num_hidden_layers,
                d_model=vision.hidden_size,
                n_heads=vision.num_attention_heads,
                d_head=vision.hidden_size // vision.num_attention_heads,
                d_mlp=vision.intermediate_size,
            ),
            TowerInfo(
                name="lm",
                n_layers=text.num_hidden_layers,
                d_model=text.hidden_size,
                n_heads=text.num_attention_heads,
                d_head=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                n_kv_heads=text.num_key_value_heads,
                d_mlp=text.intermediate_size,
            ),
        ]

    def tower_of_prefix(self) -> dict[str, str]:
        return dict(TOWER_OF_PREFIX)

    def block_list(self, tower: str) -> str:
        if tower not in BLOCK_LISTS:
            raise self.no_block_list(tower)
        return BLOCK_LISTS[tower]

    def hook_map(self) -> dict[str, Tap]:
        vision, lm = self.towers()
        hooks = self._embedding_hooks() | vision_block_hooks(vision, self.vision_block)
        hooks["vision.hook_out"] = self._feature_tap(vision.n_layers)
        hooks["projector.hook_in"] = InputTap(PROJECTOR)
        hooks["projector.hook_pre"] = OutputTap(f"{PROJECTOR}.linear_1")
        hooks["projector.hook_post"] = OutputTap(f"{PROJECTOR}.act")
        hooks["projector.hook_out"] = OutputTap(PROJECTOR)
        hooks["projector.hook_packed"] = PackedFeaturesTap("model")
        hooks["lm.hook_embed"] = KeywordInputTap(LM, keyword="inputs_embeds")
        for i in range(lm.n_layers):
            hooks |= block_hooks(f"lm.blocks.{i}", f"{LM}.layers.{i}", QWEN2_BLOCK, lm.d_head, rotary=True)
        hooks["lm.ln_final.hook_normalized"] = OutputTap(f"{LM}.norm")
        return hooks

    def hook_widths(self) -> dict[str, int | None]:
        # the two family taps: the packed rows are the projector's, the LM input its token embeddings' width
        lm_embeddings = submodule(self.model, f"{LM}.embed_tokens")
        return super().hook_widths() | {
            "projector.hook_packed": output_width(submodule(self.model, PROJECTOR)),
            "lm.hook_embed": output_width(lm_embeddings),
        }

    def _embedding_hooks(self) -> dict[str, Tap]:
        """The vision tower's hooks before its first block."""
        return {"vision.hook_embed": OutputTap(f"{VISION}.embeddings")}

    def _feature_tap(self, n_layers: int) -> Tap:
        """``vision.hook_out``: the hidden state ``vision_feature_layer`` selects; ``hidden_states[i]`` (i ≥ 1) is
        the output of layer ``i - 1`` (an int 0 is no choice: transformers then records no hidden state at all)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):  # several layers concatenated on channels: only the projector sees that
            return InputTap(PROJECTOR)
        return OutputTap(f"{VISION}.encoder.layers.{layer % (n_layers + 1) - 1}")

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        """Inputs from images and prompts (chat-formatted with the checkpoint's processor) or processor outputs.

        ``inputs``: one image, a list of images (all in one prompt, or one per prompt when ``prompt`` is a list of
        the same length), a list of lists (the images of each prompt), or a dict of processor outputs.
        ``prompt``: the user message(s); without one, the image alone is the user turn. ``text``: already
        formatted text with ``<image>`` placeholders, passed to the processor as it is. Prompts of a batch are
        left-padded, as generation needs.
        """
        check_type(inputs)
        if is_processor_output(inputs):
            if text is not None or prompt is not None:
                raise TypeError("processor outputs already hold the text; pass no prompt= or text= with them")
            model_kwargs = dict(inputs)
        else:
            if is_pixel_values(inputs):
                raise TypeError(
                    f"{type(self.model).__name__} needs the processor's image sizes and expanded <image> tokens besides "
                    "pixel_values: pass images, or the processor's outputs as a dict"
                )
            processor = self.require_processor()
            texts, images = chat_prompts(processor, inputs, text, prompt)
            model_kwargs = dict(
                processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
            )
        model_kwargs |= model_keywords(self.model, kwargs)
        # the hook map and the layout were built from the config's feature selection: another one for this run
        # would put vision.hook_out on the wrong layer and mislabel positions
        overridden = [k for k in FEATURE_KEYWORDS if k in model_kwargs and model_kwargs[k] != getattr(self.config, k)]
        if overridden:
            raise ValueError(
                f"{overridden} differ from the model config's; hooks and layout follow the config, so set "
                "model.config.<name> before wrapping the model instead of passing it to one run"
            )
        if "pixel_values_videos" in model_kwargs:
            raise NotImplementedError("video inputs are not supported yet by the LLaVA-OneVision adapter")
        return Prepared(to_model(model_kwargs, self.model), partial(self._layout, model_kwargs))

    # ---- layout -----------------------------------------------------------------------------------------------------
    def image_packing(
        self, image_sizes: Int[Tensor, "images 2"], batch_num_images: Sequence[int] | None = None
    ) -> list[ImagePacking]:
        """How each image of an input is tiled and packed into LM tokens (not yet placed in a prompt).

        ``batch_num_images`` (images per prompt) decides tiling as the model does: only single-image prompts are
        tiled. Runs the model's ``pack_image_features`` on tile/patch indices (float64, exact) instead of features,
        so unpadding, down-scaling and newline placement are the checkpoint's own arithmetic.
        """
        config = self.config
        tile_px, patch_px = config.vision_config.image_size, config.vision_config.patch_size
        side = tile_px // patch_px
        per_tile = side * side
        if batch_num_images is None:
            tiled = [True] * len(image_sizes)
        else:
            tiled = [n == 1 for n in batch_num_images for _ in range(n)]
        n_tiles = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, tile_px) if t else 1
            for size, t in zip(image_sizes.tolist(), tiled, strict=True)
        ]
        starts = [sum(n_tiles[:i]) for i in range(len(n_tiles))]
        indices = [
            torch.arange(start * per_tile, (start + n) * per_tile, dtype=torch.float64).view(n, per_tile, 1)
            for start, n in zip(starts, n_tiles, strict=True)
        ]
        newline = torch.tensor([-1.0], dtype=torch.float64)
        packed = self._pack(indices, image_sizes, newline)
        images = []
        for i, (size, start, n, values) in enumerate(zip(image_sizes.tolist(), starts, n_tiles, packed, strict=True)):
            values = values[:, 0]
            is_newline = values == -1
            kind = torch.where(is_newline, int(Kind.NEWLINE), int(Kind.IMAGE))
            tile = torch.zeros(len(values), dtype=torch.long)
            row, col = torch.full_like(tile, -1), torch.full_like(tile, -1)
            row[:per_tile], col[:per_tile] = _index_grid(per_tile, side)
            source = values.long()
            tile_grid = unpadded_grid = grid = None
            if n > 1:
                rest = values[per_tile:]
                rows = int((rest == -1).sum())
                grid = (rows, len(rest) // rows - 1)
                tile[per_tile:] = 1
                row[per_tile:], col[per_tile:] = _index_grid(len(rest), grid[1] + 1)
                tile_grid = tuple(get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile_px))
                stitched = torch.empty(0, tile_grid[0] * side, tile_grid[1] * side, device="meta")
                unpadded_grid = tuple(unpad_image(stitched, size).shape[1:])
                if grid != unpadded_grid:
                    source[per_tile:] = -1
            source[is_newline] = -1
            images.append(
                ImagePacking(
                    image=i,
                    first_tile=start,
                    n_tiles=n,
                    tile_grid=tile_grid,
                    patch_grid=(side, side),
                    unpadded_grid=unpadded_grid,
                    grid=grid,
                    kind=kind,
                    tile=tile,
                    row=row,
                    col=col,
                    source=source,
                )
            )
        return images

    def _pack(self, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
        """The model's own ``pack_image_features`` on per-image ``[tiles, tokens, d]`` features."""
        packed, _ = self.model.model.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio
        )
        return packed

    def _layout(self, model_kwargs: dict[str, Any]) -> LlavaOnevisionLayout:
        input_ids = model_kwargs["input_ids"].cpu()
        attention_mask = model_kwargs.get("attention_mask")
        lm = text_tower(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        layout = LlavaOnevisionLayout({"lm": lm}, tower_of_prefix=dict(self.tower_of_prefix()))
        if model_kwargs.get("pixel_values") is None:
            return layout
        layout.images = self._image_packings(model_kwargs)
        image_tokens = input_ids == self.config.image_token_id
        _place_images(layout.images, image_tokens, lm)
        layout.towers |= self._image_towers(layout.images, lm, image_tokens)
        return layout

    def _image_packings(self, model_kwargs: dict[str, Any]) -> list[ImagePacking]:
        """The packing of every image of an input, from its processor outputs."""
        if self.config.vision_feature_select_strategy != "full":
            raise NotImplementedError(
                "the LLaVA-OneVision layout assumes vision_feature_select_strategy='full' (all 729 tokens per tile, "
                f"as in the released checkpoints), not {self.config.vision_feature_select_strategy!r}"
            )
        batch_num_images = model_kwargs.get("batch_num_images")
        return self.image_packing(
            model_kwargs["image_sizes"].cpu(), None if batch_num_images is None else batch_num_images.tolist()
        )

    def _image_towers(
        self, images: list[ImagePacking], lm: TowerLayout, image_tokens: Bool[Tensor, "batch seq"]
    ) -> dict[str, TowerLayout]:
        """The layouts of the sequences an input's images run as, besides the LM's."""
        return {"vision": _vision_tower(images), "packed": _packed_tower(lm, image_tokens)}

    # ---- facts for the Phase 0 report -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        config = self.config
        vision, lm = self.towers()
        tile_px, patch_px = config.vision_config.image_size, config.vision_config.patch_size
        side = tile_px // patch_px
        pinpoints = config.image_grid_pinpoints
        max_tiles = max(h * w for h, w in pinpoints) // tile_px**2
        proj = self.model.model.multi_modal_projector
        return {
            "vision tower": f"SigLIP, {vision.n_layers} blocks, d={vision.d_model}, {vision.n_heads} heads × {vision.d_head}",
            "tiles": f"{tile_px}×{tile_px} px, patch {patch_px} px → {side}×{side} = {side * side} tokens per tile, no CLS",
            "anyres": f"1 base tile (whole image) + a grid of up to {max_tiles} tiles chosen from {len(pinpoints)} "
            f"pinpoints; {config.vision_aspect_ratio}",
            "feature layer": f"hidden_states[{config.vision_feature_layer}] (before post_layernorm) → vision.hook_out",
            "projector": f"Linear({proj.linear_1.in_features} → {proj.linear_1.out_features}) → "
            f"{config.projector_hidden_act} → Linear({proj.linear_2.in_features} → {proj.linear_2.out_features})",
            "image tokens": f"{side * side} base + rows × (cols + 1 newline) of the unpadded high-res grid; "
            f"{side * side} + 1 per image in multi-image prompts",
            "language model": f"Qwen2, {lm.n_layers} blocks, d={lm.d_model}, {lm.n_heads} heads / {lm.n_kv_heads} kv-heads "
            f"× {lm.d_head}, SwiGLU {lm.d_mlp}, RoPE",
        }
