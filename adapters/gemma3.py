"""Gemma 3: transformers ``Gemma3ForConditionalGeneration`` (SigLIP + pooling projector + Gemma 3 LM).

Checkpoints: google/gemma-3-4b-it, -12b-it, -27b-it (and the -pt ones). Module tree (transformers 5.x) and where
the canonical hooks sit::

    model.vision_tower.embeddings              patch conv + learned positions, no CLS  → vision.hook_embed [images, 4096, d]
    model.vision_tower.encoder.layers.{i}      SigLIP blocks (as in LLaVA-OneVision)   → vision.blocks.{i}.*
    model.vision_tower.post_layernorm          the tower's last_hidden_state           → vision.hook_out
    model.multi_modal_projector                input                                   → projector.hook_in [images, 4096, d]
      .avg_pool                                the 64×64 patch grid average-pooled 4×4 → projector.hook_pooled [images, 256, d]
      .mm_soft_emb_norm                        RMSNorm                                 → projector.ln.hook_normalized
      (mm_input_projection_weight, a matmul)   output                                  → projector.hook_out [images, 256, d_lm]
    model.language_model  (inputs_embeds)      √d_model-scaled token embeddings, image soft tokens scattered in
                                                                                       → lm.hook_embed [batch, seq, d_lm]
    model.language_model.layers.{i}            input_layernorm → self_attn{q,k,v}_proj → q_norm / k_norm → RoPE →
                                               attention → o_proj → post_attention_layernorm → + residual →
                                               pre_feedforward_layernorm → mlp{gate,up,down}_proj →
                                               post_feedforward_layernorm → + residual  → lm.blocks.{i}.*
    model.language_model.norm                  final RMSNorm                           → lm.ln_final.hook_normalized
    lm_head                                    → the logits this adapter returns (no soft-capping in this class)

What is particular to Gemma 3's LM blocks, and where the hooks sit for it:

* **Sandwich norms.** The attention's and the MLP's outputs are normed again before they join the residual stream,
  so, as in TransformerLens, ``hook_attn_out`` / ``hook_mlp_out`` are the outputs of ``post_attention_layernorm`` /
  ``post_feedforward_layernorm`` (what is added), ``hook_resid_mid = hook_resid_pre + hook_attn_out`` exactly, and
  ``ln2.hook_normalized`` is ``pre_feedforward_layernorm``'s output (the MLP's input). The raw outputs (``o_proj``'s,
  ``down_proj``'s) are ``ln1_post.hook_in`` / ``ln2_post.hook_in``. ``attn.hook_result`` (per head, ``z · W_O``)
  sums to ``ln1_post.hook_in``, not to ``hook_attn_out``: the post-attention norm lies between.
* **QK norm.** ``attn.hook_q`` / ``hook_k`` are the ``q_proj`` / ``k_proj`` outputs per head (TransformerLens's
  ``hook_q``); ``attn.q_norm.hook_normalized`` / ``attn.k_norm.hook_normalized`` (Qwen3-VL's names) are after
  ``q_norm`` / ``k_norm`` (RMSNorm over ``d_head``), before RoPE; ``hook_rot_q`` / ``hook_rot_k`` after RoPE, as
  the scores use them.
* **Sliding and global layers.** ``config.text_config.layer_types`` says which blocks attend within
  ``sliding_window`` tokens (5 of every 6) and which globally; the two kinds have their own RoPE bases. The
  attention hooks read the mask the model built for the block's kind, so ``hook_attn_scores`` / ``hook_pattern``
  show the window.
* **Bidirectional image spans.** From ``token_type_ids`` (1 on image soft tokens; the processor returns them) the
  model lets the tokens of one image attend to each other in both directions, in global and (within the window)
  sliding layers; text stays causal. Processor outputs without ``token_type_ids`` run with causal attention over
  images, as the model itself does then.
* The scores are scaled by ``query_pre_attn_scalar ** -0.5`` (not ``d_head ** -0.5`` in the 27B).

The ``InputLayout`` (:class:`Gemma3Layout`): ``"vision"`` ``[images, patches]`` (row-major patch grid),
``"pooled"`` ``[images, tokens]`` for the projector's pooled grid, and ``"lm"`` ``[batch, seq]`` whose image tokens
carry (image, row, col) on the pooled grid. With pan-and-scan, every crop is an image of its own (a row of
``pixel_values`` and one span of soft tokens), in the processor's order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from hooked_vlm.adapters.llava_onevision import BLOCK_LISTS, LM, PROJECTOR, VISION, KeywordInputTap, siglip_tower_hooks
from jaxtyping import Int
from torch import Tensor
from transformers import Gemma3ForConditionalGeneration

from hooked_vlm.adapter import BlockPaths, HFAdapter, Prepared, TowerInfo, block_hooks, register_adapter
from hooked_vlm.inputs import (
    chat_prompts,
    check_type,
    is_pixel_values,
    is_processor_output,
    model_keywords,
    pixel_tensor,
    to_model,
)
from hooked_vlm.layout import InputLayout, Kind, grid_tower, text_tower
from hooked_vlm.taps import InputTap, OutputTap, ResidualSumTap, Tap, View, submodule
from hooked_vlm.widths import output_width

GEMMA3_BLOCK = BlockPaths(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="pre_feedforward_layernorm",
    mlp="mlp",
    o="o_proj",
    mlp_in="gate_proj",
    mlp_up="up_proj",
    mlp_out="down_proj",
)
ATTN_POST_NORM = "post_attention_layernorm"
MLP_POST_NORM = "post_feedforward_layernorm"

#: the projector reads the vision tower's sequence; its later stages run on the pooled grid
TOWER_OF_PREFIX = {"projector": "pooled", "projector.hook_in": "vision"}


@dataclass(frozen=True)
class HeadsFirst(View):
    """``[batch, head, pos, d_head]`` at the boundary (QK norm runs after the heads are moved forward), the canonical
    ``[batch, pos, head, d_head]`` at the hook point."""

    def to_hook(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        return h.transpose(1, 2)


@dataclass(frozen=True)
class PooledGrid(View):
    """``[images, d, rows, cols]`` at the pooling's output, ``[images, rows · cols, d]`` (row-major) at the hook."""

    def to_hook(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        return h.transpose(1, 2).reshape(x.shape)


def gemma3_block_hooks(prefix: str, block: str, d_head: int) -> dict[str, Tap]:
    """The canonical per-block set of a Gemma 3 decoder layer, in forward order (see the module docstring)."""
    attn = f"{block}.{GEMMA3_BLOCK.attn}"
    attn_post, mlp_post = f"{block}.{ATTN_POST_NORM}", f"{block}.{MLP_POST_NORM}"
    normed = {
        f"{prefix}.attn.q_norm.hook_normalized": OutputTap(f"{attn}.q_norm", view=HeadsFirst()),
        f"{prefix}.attn.k_norm.hook_normalized": OutputTap(f"{attn}.k_norm", view=HeadsFirst()),
    }
    after_attention = {
        f"{prefix}.ln1_post.hook_in": InputTap(attn_post),
        f"{prefix}.hook_attn_out": OutputTap(attn_post),
        f"{prefix}.hook_resid_mid": ResidualSumTap(attn_post, block=block),
    }
    hooks: dict[str, Tap] = {}
    for name, tap in block_hooks(prefix, block, GEMMA3_BLOCK, d_head, rotary=True).items():
        if name == f"{prefix}.hook_attn_out":
            hooks |= after_attention
        elif name == f"{prefix}.hook_resid_mid":
            continue
        elif name == f"{prefix}.hook_mlp_out":
            hooks[f"{prefix}.ln2_post.hook_in"] = InputTap(mlp_post)
            hooks[name] = OutputTap(mlp_post)
        else:
            hooks[name] = tap
        if name == f"{prefix}.attn.hook_v":
            hooks |= normed
    return hooks


# ---------------------------------------------------------------------------------------------------------------
# Layout.


@dataclass
class Gemma3Layout(InputLayout):
    """The :class:`InputLayout` of a Gemma 3 input; ``image_spans[k]`` is ``(batch row, LM positions)`` of image
    ``k``'s soft tokens (the span its tokens attend within bidirectionally)."""

    image_spans: list[tuple[int, Int[Tensor, " tokens"]]] | None = None

    def image_positions(self, image: int) -> tuple[int, Int[Tensor, " tokens"]]:
        """``(batch row, LM positions)`` of every soft token of ``image``, in the order of its pooled grid."""
        if not self.image_spans:
            raise ValueError("this input has no images")
        return self.image_spans[image]


def _image_spans(image_tokens: Tensor, n_images: int, per_image: int) -> list[tuple[int, Tensor]]:
    """Each image's soft-token positions: the model scatters image ``k``'s features into the ``k``-th run of
    ``per_image`` image tokens over ``[batch, seq]`` in row-major order."""
    found = int(image_tokens.sum())
    if found != n_images * per_image:
        raise ValueError(
            f"the prompts hold {found} image soft tokens, but {n_images} image(s) of {per_image} tokens each need "
            f"{n_images * per_image}; the prompt's image placeholders do not match the images (were they expanded "
            "by this checkpoint's processor?)"
        )
    spans = []
    for b, row in enumerate(image_tokens):
        positions = row.nonzero()[:, 0]
        if len(positions) % per_image:
            raise ValueError(
                f"prompt {b} holds {len(positions)} image soft tokens, not a multiple of the {per_image} an image "
                "has; the prompt's image placeholders do not match the images"
            )
        for chunk in positions.split(per_image):
            if int(chunk[-1] - chunk[0]) != per_image - 1:
                raise ValueError(
                    f"prompt {b}: an image's {per_image} soft tokens are not contiguous (positions "
                    f"{chunk.tolist()}); each image is one run of soft tokens"
                )
            spans.append((b, chunk))
    return spans


def _tokenizing(processor: Any, texts: list[str]) -> dict[str, Any]:
    """Tokenizer options for formatted texts: left padding (as generation needs), and no second ``<bos>`` where
    the chat template wrote one."""
    bos = processor.tokenizer.bos_token
    return dict(
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=not all(t.startswith(bos) for t in texts),
    )


# ---------------------------------------------------------------------------------------------------------------
# The adapter.


@register_adapter
class Gemma3Adapter(HFAdapter):
    family = "gemma3"
    model_class = Gemma3ForConditionalGeneration

    @property
    def config(self):
        return self.model.config

    def towers(self) -> list[TowerInfo]:
        return [
            TowerInfo.from_hf_config("vision", self.config.vision_config),
            TowerInfo.from_hf_config("lm", self.config.text_config),
        ]

    def tower_of_prefix(self) -> dict[str, str]:
        return dict(TOWER_OF_PREFIX)

    def block_list(self, tower: str) -> str:
        if tower not in BLOCK_LISTS:
            raise self.no_block_list(tower)
        return BLOCK_LISTS[tower]

    def hook_widths(self) -> dict[str, int | None]:
        # lm.hook_embed is a keyword tap on the LM (inputs_embeds): its width is the token embeddings'; the projector
        # projects with a bare parameter [d_vision, d_lm] after its norm, so its own last child states d_vision
        projection = submodule(self.model, PROJECTOR).mm_input_projection_weight
        return super().hook_widths() | {
            "projector.hook_out": projection.shape[1],
            "lm.hook_embed": output_width(submodule(self.model, f"{LM}.embed_tokens")),
        }

    def hook_map(self) -> dict[str, Tap]:
        vision, lm = self.towers()
        hooks = siglip_tower_hooks(vision)  # the same SigLIP tower, at the same path, as LLaVA-OneVision's
        hooks["vision.hook_out"] = OutputTap(f"{VISION}.post_layernorm")
        hooks["projector.hook_in"] = InputTap(PROJECTOR)
        hooks["projector.hook_pooled"] = OutputTap(f"{PROJECTOR}.avg_pool", view=PooledGrid())
        hooks["projector.ln.hook_normalized"] = OutputTap(f"{PROJECTOR}.mm_soft_emb_norm")
        hooks["projector.hook_out"] = OutputTap(PROJECTOR)
        hooks["lm.hook_embed"] = KeywordInputTap(LM, keyword="inputs_embeds")
        for i in range(lm.n_layers):
            hooks |= gemma3_block_hooks(f"lm.blocks.{i}", f"{LM}.layers.{i}", lm.d_head)
        hooks["lm.ln_final.hook_normalized"] = OutputTap(f"{LM}.norm")
        return hooks

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        """Inputs from images and prompts (chat-formatted with the checkpoint's template) or processor outputs.

        ``inputs``: one image, a list of images (all in one prompt, or one per prompt when ``prompt`` is a list of
        the same length), a list of lists (the images of each prompt), ready ``pixel_values`` ``[n, 3, H, W]`` (one
        prompt per image), or a dict of processor outputs.
        ``prompt``: the user message(s); ``text``: already formatted text with ``<start_of_image>`` placeholders.
        Text that already starts with the template's ``<bos>`` gets no second one. Prompts are left-padded.
        """
        check_type(inputs)
        if is_processor_output(inputs):
            if text is not None or prompt is not None:
                raise TypeError("processor outputs already hold the text; pass no prompt= or text= with them")
            model_kwargs = dict(inputs)
            if model_kwargs.get("pixel_values") is not None and model_kwargs.get("token_type_ids") is None:
                warnings.warn(
                    "processor outputs with pixel_values but no token_type_ids: Gemma 3 then attends causally over "
                    "the image tokens instead of bidirectionally within each image (pass the processor's "
                    "token_type_ids)",
                    stacklevel=3,
                )
        elif is_pixel_values(inputs):
            model_kwargs = self._ready_pixels(pixel_tensor(inputs), text, prompt)
        else:
            processor = self.require_processor()
            texts, images = chat_prompts(processor, inputs, text, prompt)
            model_kwargs = dict(processor(text=texts, images=images, **_tokenizing(processor, texts)))
        model_kwargs |= model_keywords(self.model, kwargs)
        return Prepared(to_model(model_kwargs, self.model), partial(self._layout, model_kwargs))

    def _ready_pixels(self, pixels: Tensor, text: Any, prompt: Any) -> dict[str, Any]:
        """Processor-style inputs for ready ``pixel_values`` ``[n, 3, H, W]``: one prompt per image, each image's
        placeholder expanded into its soft tokens as ``Gemma3Processor`` does (``full_image_sequence``)."""
        processor = self.require_processor()
        n = pixels.shape[0]
        given = text if text is not None else prompt
        given = [given] * n if given is None or isinstance(given, str) else list(given)
        if len(given) != n:
            raise ValueError(f"{len(given)} prompts for {n} images of pixel_values; pass one prompt per image")
        if text is None:
            given = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, *([{"type": "text", "text": p}] if p else [])]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p in given
            ]
        if any(t.count(processor.boi_token) != 1 for t in given):
            raise ValueError(f"each text needs one {processor.boi_token} placeholder for its row of pixel_values")
        expanded = [t.replace(processor.boi_token, processor.full_image_sequence) for t in given]
        tokens = dict(processor.tokenizer(expanded, **_tokenizing(processor, expanded)))
        tokens["token_type_ids"] = (tokens["input_ids"] == self.config.image_token_id).long()
        return tokens | {"pixel_values": pixels}

    def _layout(self, model_kwargs: dict[str, Any]) -> Gemma3Layout:
        config = self.config
        input_ids = model_kwargs["input_ids"].cpu()
        attention_mask = model_kwargs.get("attention_mask")
        lm = text_tower(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        layout = Gemma3Layout({"lm": lm}, tower_of_prefix=dict(TOWER_OF_PREFIX))
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is None:
            return layout
        n_images = pixel_values.shape[0]
        side = config.vision_config.image_size // config.vision_config.patch_size
        pooled = int(config.mm_tokens_per_image**0.5)
        layout.image_spans = _image_spans(input_ids == config.image_token_id, n_images, pooled * pooled)
        rows, cols = (
            torch.arange(pooled * pooled).div(pooled, rounding_mode="floor"),
            torch.arange(pooled * pooled) % pooled,
        )
        for image, (b, positions) in enumerate(layout.image_spans):
            lm.kind[b, positions] = int(Kind.IMAGE)
            lm.image[b, positions] = image
            lm.tile[b, positions] = 0
            lm.row[b, positions], lm.col[b, positions] = rows, cols
        lm.grids = [(pooled, pooled)] * n_images
        layout.towers["vision"] = grid_tower(n_images, side, side, n_prefix=0)
        layout.towers["pooled"] = grid_tower(n_images, pooled, pooled, n_prefix=0)
        return layout

    # ---- facts for the Phase 0 report -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        config = self.config
        vision, lm = self.towers()
        text = config.text_config
        side = config.vision_config.image_size // config.vision_config.patch_size
        pooled = int(config.mm_tokens_per_image**0.5)
        kinds = text.layer_types
        n_global = sum(kind == "full_attention" for kind in kinds)
        return {
            "vision tower": f"SigLIP, {vision.n_layers} blocks, d={vision.d_model}, {vision.n_heads} heads × {vision.d_head}",
            "image": f"{config.vision_config.image_size}×{config.vision_config.image_size} px, patch "
            f"{config.vision_config.patch_size} px → {side}×{side} = {side * side} patches, no CLS",
            "projection": f"{side // pooled}×{side // pooled} average pooling → {pooled}×{pooled} = "
            f"{config.mm_tokens_per_image} tokens → RMSNorm → matmul ({vision.d_model} → {lm.d_model})",
            "image tokens": f"<start_of_image> + {config.mm_tokens_per_image} soft tokens + <end_of_image> per image, "
            "attended bidirectionally within the image",
            "language model": f"Gemma 3, {lm.n_layers} blocks ({lm.n_layers - n_global} sliding-window of "
            f"{text.sliding_window} tokens, {n_global} global), d={lm.d_model}, {lm.n_heads} heads / {lm.n_kv_heads} "
            f"kv-heads × {lm.d_head}, QK norm, sandwich norms, GeGLU {lm.d_mlp}, embeddings × √{lm.d_model}",
        }
