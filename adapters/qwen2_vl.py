"""Qwen2-VL (``Qwen2VLForConditionalGeneration``: Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct, -72B-Instruct).

Module tree (transformers 5.x) and where the canonical hooks sit::

    model.visual.patch_embed            Conv3d over 2 frames × 14 × 14 px patches          → vision.hook_embed
    model.visual.blocks.{i}             norm1, attn{qkv (fused), proj}, norm2, mlp{fc1, act, fc2}
                                        2-D rotary on q/k; attention never crosses images   → vision.blocks.{i}.*
    model.visual.blocks.{-1}            block output                                         → vision.hook_out
    model.visual.merger                 ln_q → view(-1, 4·d): the 2×2 merge → mlp{0, 1, 2}  → projector.*
    model.language_model.layers.{i}     Qwen2 decoder layer (GQA, M-RoPE, SwiGLU)            → lm.blocks.{i}.*
    model.language_model.norm           final RMSNorm                                        → lm.ln_final.hook_normalized
    lm_head                                                                                  → the returned logits

Packing. The processor cuts every image (resized so both sides are multiples of 28 px, with ``min_pixels ≤
H·W ≤ max_pixels``) into 14 px patches and concatenates the patches of all images of the batch into one
``[Σ patches, 1176]`` tensor; the vision tower runs on ``[Σ patches, d]`` with no batch axis. Vision and
projector hooks therefore add a leading axis of 1: ``[1, Σ patches, ...]`` (``[1, Σ patches / 4, ...]``
after the merge). Within an image, patches are in **merge-window order**: each run of 4 consecutive
patches is one 2×2 window, windows in raster order. :class:`Qwen2VLLayout` maps every packed index back to
(image, frame, row, col) in raster terms, and every LM image token to (image, row, col) on the merged grid.

Vision attention. Unless its implementation is flash attention (one varlen call), ``VisionAttention`` calls
the attention function once per image (per frame for video), so no single call holds the whole pattern.
Rather than firing the hook points once per image (a cache would keep only the last image),
:class:`PackedAttentionTap` gives a captured block an implementation that only records each image's q/k/v,
and replays attention for all images at once where ``attn.proj`` is about to run: ``hook_rot_q`` /
``hook_rot_k`` fire once with ``[1, Σ patches, head, d_head]`` and ``hook_attn_scores`` / ``hook_pattern`` once
with the block-diagonal ``[1, head, Σ patches, Σ patches]`` (off-image scores are masked, off-image pattern
entries are 0). Edits anywhere in these tensors are honoured, including cross-image ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformers import AttentionInterface, Qwen2VLForConditionalGeneration

from hooked_vlm.adapter import BlockPaths, HFAdapter, Prepared, TowerInfo, block_hooks, register_adapter
from hooked_vlm.attention import AttentionConfigView, AttentionFunctionTap, additive_mask, original_attention_function
from hooked_vlm.inputs import chat_prompts, check_type, is_pixel_values, is_processor_output, model_keywords, to_model
from hooked_vlm.layout import InputLayout, Kind, TowerLayout, text_tower
from hooked_vlm.taps import IDENTITY, InputTap, InstanceOverride, OutputTap, RemoveEntry, Tap, View, submodule

VISION = "model.visual"
LM = "model.language_model"

# q/k/v name the fused qkv Linear; hook_map replaces their head split by FusedQKV.
VISION_BLOCK = BlockPaths(
    ln1="norm1", attn="attn", ln2="norm2", mlp="mlp", q="qkv", k="qkv", v="qkv", o="proj", mlp_in="fc1", mlp_out="fc2"
)
LM_BLOCK = BlockPaths(
    ln1="input_layernorm", attn="self_attn", ln2="post_attention_layernorm", mlp="mlp", o="o_proj",
    mlp_in="gate_proj", mlp_up="up_proj", mlp_out="down_proj",
)


# ---------------------------------------------------------------------------------------------------------------
# Views for the packed vision tower.


@dataclass(frozen=True)
class Packed(View):
    """``[Σ patches, ...]`` at the boundary, ``[1, Σ patches, ...]`` at the hook point (after ``inner``)."""

    inner: View = IDENTITY

    def to_hook(self, x: Tensor) -> Tensor:
        return self.inner.to_hook(x).unsqueeze(0)

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        return self.inner.from_hook(x, h.squeeze(0))


@dataclass(frozen=True)
class FusedQKV(View):
    """q, k or v (``index`` 0, 1, 2) of the fused ``qkv`` output ``[N, 3 · head · d_head]``, as ``[N, head, d_head]``."""

    index: int
    d_head: int

    def to_hook(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (3, -1, self.d_head))[:, self.index]

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        qkv = x.unflatten(-1, (3, -1, self.d_head)).clone()
        qkv[:, self.index] = h
        return qkv.flatten(-3)


# ---------------------------------------------------------------------------------------------------------------
# Vision attention: record per image, replay for all images at once.

RECORD_IMPLEMENTATION = "hooked_vlm_qwen2_vl_record"  # must not contain "flash": that selects the varlen path
_recordings: dict[nn.Module, list[tuple[Tensor, Tensor, Tensor]]] = {}


def record_segment(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Keep one image's post-RoPE q, k and v; its output is computed by the replay once every image is in."""
    _recordings[module].append((query, key, value))
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


AttentionInterface.register(RECORD_IMPLEMENTATION, record_segment)


@dataclass(frozen=True)
class PackedAttentionTap(AttentionFunctionTap):
    """rot_q, rot_k, scores or pattern of a Qwen2-VL vision attention, over all images of the run at once.

    Each hook point fires once per block call; a cache therefore holds the whole packed run (see the module
    docstring), and the core's per-call completion tracking (``fires_repeatedly``) is not needed.
    """

    @classmethod
    def install_group(cls, root, hook_points, run):
        attn = submodule(root, hook_points[0].tap.module)
        if attn in _recordings:
            raise RuntimeError(f"attention of {hook_points[0].tap.module!r} is already being captured")
        hps = {hp.tap.kind: hp for hp in hook_points}
        config = attn.config
        original = original_attention_function(attn, config._attn_implementation)
        segments = _recordings[attn] = []

        def replay(proj, args):
            lengths = [q.shape[2] for q, _, _ in segments]
            q, k, v = (torch.cat(parts, dim=2) for parts in zip(*segments, strict=True))  # [1, head, Σ patches, d_head]
            segments.clear()
            if "rot_q" in hps:
                q = run.fire(hps["rot_q"], q.transpose(1, 2)).transpose(1, 2)
            if "rot_k" in hps:
                k = run.fire(hps["rot_k"], k.transpose(1, 2)).transpose(1, 2)
            if "scores" in hps or "pattern" in hps:
                scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
                if len(lengths) > 1:
                    scores = scores + _block_diagonal_mask(lengths, scores.dtype, scores.device)
                if "scores" in hps:
                    scores = run.fire(hps["scores"], scores)
                pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                if "pattern" in hps:
                    pattern = run.fire(hps["pattern"], pattern)
                z = torch.matmul(pattern, v).transpose(1, 2)
            else:  # only q/k were hooked: the model's own implementation, image by image, on the edited q/k
                z = torch.cat(
                    [
                        original(attn, *qkv, None, scaling=attn.scaling, dropout=0.0, is_causal=False)[0]
                        for qkv in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
                    ],
                    dim=1,
                )
            return (z.reshape(z.shape[1], -1), *args[1:])

        # prepend: the replayed z must be in place before hook_z (a pre-hook on the same module) sees it
        return [
            InstanceOverride(attn, "config", AttentionConfigView(config, RECORD_IMPLEMENTATION)),
            RemoveEntry(_recordings, attn),
            attn.proj.register_forward_pre_hook(replay, prepend=True),
        ]


def _block_diagonal_mask(lengths: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    image = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    same_image = (image[:, None] == image[None, :])[None, None]
    return additive_mask(same_image, len(image), len(image), False, dtype, device)


def _vision_block(i: int, d_head: int, paths: BlockPaths = VISION_BLOCK) -> dict[str, Tap]:
    """The canonical block set on ``model.visual.blocks.{i}``, with every value seen through the packed axis."""
    hooks = block_hooks(f"vision.blocks.{i}", f"{VISION}.blocks.{i}", paths, d_head, rotary=True)
    packed: dict[str, Tap] = {}
    for name, tap in hooks.items():
        if isinstance(tap, AttentionFunctionTap):
            packed[name] = PackedAttentionTap(tap.module, kind=tap.kind)
        elif tap.module.endswith(".qkv"):
            packed[name] = OutputTap(tap.module, view=Packed(FusedQKV("qkv".index(name[-1]), d_head)))
        else:
            packed[name] = replace(tap, view=Packed(tap.view))
    return packed


# ---------------------------------------------------------------------------------------------------------------
# Layout.


@dataclass
class Qwen2VLLayout(InputLayout):
    """Towers ``vision`` ([1, Σ patches]), ``projector`` ([1, Σ patches / merge²]) and ``lm`` ([batch, seq]).

    In every tower, ``image`` is the index into ``image_grid_thw`` (images of all prompts, in prompt order),
    ``tile`` the frame (0 for images), and ``row``/``col`` raster coordinates: on the patch grid for ``vision``,
    on the merged grid for ``projector`` and the LM's image tokens.
    """

    #: per image ``(t, h, w)`` in 14 px patches (``t`` = 1 for images)
    image_grid_thw: Int[Tensor, "image thw"] | None = None  # noqa: F722 (jaxtyping)
    spatial_merge_size: int = 2

    def to_patch_grid(self, hook_name: str, activation: Tensor) -> Tensor:
        if any(len(row[row >= 0].unique()) > 1 for row in self.tower_for(hook_name).image):
            raise ValueError(
                f"{hook_name!r} holds several images in one sequence (Qwen2-VL packs the images of a run); "
                "take one image's grid with layout.image_grid(name, activation, image=j)"
            )
        return super().to_patch_grid(hook_name, activation)


def window_order(h: int, w: int, merge: int) -> Int[Tensor, "two patches"]:  # noqa: F722 (jaxtyping)
    """Raster (row, col) of each patch of an ``h × w`` grid, in the processor's merge-window order."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    return torch.stack([rows, cols]).reshape(2, h // merge, merge, w // merge, merge).transpose(2, 3).flatten(1)


def _image_tower(grid_thw: Tensor, merge: int, merged: bool) -> TowerLayout:
    """The packed sequence of all images: per patch (``merged=False``) or per 2×2 window (``merged=True``)."""
    image, frame, row, col, grids = [], [], [], [], []
    for j, (t, h, w) in enumerate(grid_thw.tolist()):
        if merged:
            h, w = h // merge, w // merge
            r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        else:
            r, c = window_order(h, w, merge)
        image.append(torch.full((t * h * w,), j))
        frame.append(torch.arange(t).repeat_interleave(h * w))
        row.append(r.repeat(t))
        col.append(c.repeat(t))
        grids.append((h, w))
    image_, frame_, row_, col_ = (torch.cat(x)[None] for x in (image, frame, row, col))
    return TowerLayout(
        kind=torch.full_like(image_, int(Kind.PATCH)), image=image_, tile=frame_, row=row_, col=col_, grids=grids
    )


def _lm_tower(
    input_ids: Tensor, attention_mask: Tensor, image_token_id: int, projector: TowerLayout | None
) -> TowerLayout:
    """The LM sequence; image tokens take, in row-major order over the batch, the projector's rows (as the
    model's ``masked_scatter`` does)."""
    tower = text_tower(attention_mask)
    is_image = input_ids.cpu() == image_token_id
    n_tokens, n_features = int(is_image.sum()), 0 if projector is None else projector.shape[1]
    if n_tokens != n_features:
        raise ValueError(
            f"{n_tokens} image tokens in input_ids but image_grid_thw gives {n_features} merged patches; "
            "build inputs with the checkpoint's processor (it expands each <|image_pad|> to the image's count)"
        )
    if n_tokens:
        tower.kind[is_image] = int(Kind.IMAGE)
        for field in ("image", "tile", "row", "col"):
            getattr(tower, field)[is_image] = getattr(projector, field)[0]
        tower.grids = list(projector.grids)
    return tower


# ---------------------------------------------------------------------------------------------------------------
# The adapter.


@register_adapter
class Qwen2VLAdapter(HFAdapter):
    family = "qwen2_vl"
    packed_vision = True  # all images of a run in one [Σ patches, d] sequence
    processor_keywords = ("min_pixels", "max_pixels")  # load(min_pixels=...) sets the processor's defaults
    image_features_method = ("model", "get_image_features")
    # what Qwen2.5-VL's adapter (a subclass) changes: the model class and the vision block's module names
    model_class = Qwen2VLForConditionalGeneration
    vision_block_paths = VISION_BLOCK

    # ---- structure --------------------------------------------------------------------------------------------------
    def towers(self) -> list[TowerInfo]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        return [
            TowerInfo(
                name="vision", n_layers=vision.depth, d_model=vision.embed_dim, n_heads=vision.num_heads,
                d_head=vision.embed_dim // vision.num_heads, d_mlp=int(vision.embed_dim * vision.mlp_ratio),
            ),
            TowerInfo(
                name="lm", n_layers=text.num_hidden_layers, d_model=text.hidden_size,
                n_heads=text.num_attention_heads, d_head=text.hidden_size // text.num_attention_heads,
                n_kv_heads=text.num_key_value_heads, d_mlp=text.intermediate_size,
            ),
        ]

    def block_list(self, tower: str) -> str:
        paths = {"vision": f"{VISION}.blocks", "lm": f"{LM}.layers"}
        if tower not in paths:
            raise self.no_block_list(tower)
        return paths[tower]

    def hook_map(self) -> dict[str, Tap]:
        vision, lm = self.towers()
        packed = Packed()
        hooks: dict[str, Tap] = {"vision.hook_embed": OutputTap(f"{VISION}.patch_embed", view=packed)}
        for i in range(vision.n_layers):
            hooks |= _vision_block(i, vision.d_head, self.vision_block_paths)
        hooks |= {
            "vision.hook_out": OutputTap(f"{VISION}.blocks.{vision.n_layers - 1}", view=packed),
            "projector.hook_in": InputTap(f"{VISION}.merger", view=packed),
            "projector.ln.hook_normalized": OutputTap(f"{VISION}.merger.ln_q", view=packed),
            # ln_q(x).view(-1, 4·d) has no module boundary; the merged tensor is exactly the mlp's input
            "projector.hook_merged": InputTap(f"{VISION}.merger.mlp", view=packed),
            "projector.hook_pre": OutputTap(f"{VISION}.merger.mlp.0", view=packed),
            "projector.hook_post": OutputTap(f"{VISION}.merger.mlp.1", view=packed),
            "projector.hook_out": OutputTap(f"{VISION}.merger", view=packed),
            # the language model is called with keyword arguments only; its first layer's input is inputs_embeds
            "lm.hook_embed": InputTap(f"{LM}.layers.0"),
        }
        for i in range(lm.n_layers):
            hooks |= block_hooks(f"lm.blocks.{i}", f"{LM}.layers.{i}", LM_BLOCK, lm.d_head, rotary=True)
        hooks["lm.ln_final.hook_normalized"] = OutputTap(f"{LM}.norm")
        return hooks

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def prepare(
        self,
        inputs: Any = None,
        *,
        text: Any = None,
        prompt: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **kwargs,
    ) -> Prepared:
        """Inputs from images and prompts (chat-formatted with the checkpoint's processor) or processor outputs.

        ``inputs``: one image, a list of images (all in one prompt, or one per prompt when ``prompt`` is a list of
        the same length), a list of lists (the images of each prompt), or a dict of processor outputs.
        ``prompt``: the user message(s); without one, the images alone are the user turn. ``text``: already
        formatted text with one ``<|vision_start|><|image_pad|><|vision_end|>`` per image, passed to the
        processor as it is. ``min_pixels`` / ``max_pixels`` override the processor's resize bounds for this call.
        Prompts of a batch are left-padded, as generation needs.
        """
        check_type(inputs)
        if is_processor_output(inputs):
            if text is not None or prompt is not None or min_pixels is not None or max_pixels is not None:
                raise TypeError("processor outputs are already built; pass no prompt=, text= or min/max_pixels with them")
            model_kwargs = dict(inputs)
        else:
            model_kwargs = self._process(inputs, text, prompt, min_pixels, max_pixels)
        model_kwargs |= model_keywords(self.model, kwargs)
        if "pixel_values_videos" in model_kwargs:
            raise NotImplementedError("video inputs are not supported yet by the Qwen2-VL adapter")
        if "input_ids" not in model_kwargs:
            raise ValueError("Qwen2-VL processor outputs need input_ids (the prompt the image tokens sit in)")
        if "image_grid_thw" in model_kwargs and "mm_token_type_ids" not in model_kwargs:
            # 4.x processors did not return it; 5.x models require it (it marks the image tokens for M-RoPE)
            model_kwargs["mm_token_type_ids"] = (model_kwargs["input_ids"] == self.model.config.image_token_id).long()
        return Prepared(to_model(model_kwargs, self.model), lambda: self._layout(model_kwargs))

    def _process(self, inputs, text, prompt, min_pixels, max_pixels) -> dict[str, Any]:
        if is_pixel_values(inputs):
            raise TypeError("Qwen2-VL pixel_values need their image_grid_thw: pass images, or the processor's outputs as a dict")
        texts, images = chat_prompts(self.require_processor(), inputs, text, prompt)
        size = {}
        if min_pixels is not None or max_pixels is not None:
            default = self.processor.image_processor.size
            size["size"] = {
                "shortest_edge": min_pixels if min_pixels is not None else default["shortest_edge"],
                "longest_edge": max_pixels if max_pixels is not None else default["longest_edge"],
            }
        flat = [image for row in images or [] for image in row]
        return dict(
            self.processor(
                text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt", **size
            )
        )

    def _layout(self, model_kwargs: dict[str, Any]) -> Qwen2VLLayout:
        input_ids = model_kwargs["input_ids"]
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grid_thw = model_kwargs.get("image_grid_thw")
        merge = self.model.config.vision_config.spatial_merge_size
        towers: dict[str, TowerLayout] = {}
        if grid_thw is not None:
            grid_thw = grid_thw.cpu()
            towers["vision"] = _image_tower(grid_thw, merge, merged=False)
            towers["projector"] = _image_tower(grid_thw, merge, merged=True)
        towers["lm"] = _lm_tower(input_ids, attention_mask, self.model.config.image_token_id, towers.get("projector"))
        return Qwen2VLLayout(
            towers,
            # the merger's input and norm still run per patch; its later stages per 2×2 window
            tower_of_prefix={"projector.hook_in": "vision", "projector.ln": "vision"},
            image_grid_thw=grid_thw,
            spatial_merge_size=merge,
        )

    # ---- facts for the Phase 0 report -----------------------------------------------------------------------------
    # (Running is HFAdapter's forward / generate. The model keeps the M-RoPE offsets of its last input
    # (``model.model.rope_deltas``) but reads them only when it cannot recompute them: decoding steps on a passed
    # cache, or inputs_embeds without input_ids. Both calls start without a cache and with input_ids, so they
    # recompute, and no run depends on the one before; resetting the offsets would break continuing a generation.)
    def describe(self) -> dict[str, Any]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        facts = {
            "patches": f"{patch}×{patch} px × {vision.temporal_patch_size} frames (an image fills both frames)",
            "merge": f"{merge}×{merge} patches → 1 LM token ({patch * merge}×{patch * merge} px per token)",
            "vision tokens": "all images' patches packed into one sequence; attention block-diagonal per image",
            "projection": (
                f"merger: LayerNorm → {merge}×{merge} merge ({vision.embed_dim}·{merge * merge}) → Linear → GELU → "
                f"Linear(→ {vision.hidden_size})"
            ),
            "positions": f"vision: 2-D rotary (row, col); LM: M-RoPE (t, h, w), sections {text.rope_parameters.get('mrope_section')}",
        }
        if self.processor is not None:
            size = self.processor.image_processor.size
            facts["resolution"] = (
                f"dynamic: sides rounded to multiples of {patch * merge} px, "
                f"{size['shortest_edge']} ≤ H·W ≤ {size['longest_edge']} px (min_pixels / max_pixels)"
            )
        return facts

