"""open_clip ``CLIP`` with a ViT image tower (``ViT-L-14`` and its family: ``ViT-B-32``, ``ViT-L-14-336``, ...).

Module tree (open_clip 3.x; the text tower's modules sit directly on the ``CLIP`` object)::

    visual.conv1, class_embedding, positional_embedding, patch_dropout   → vision.hook_embed (input of ln_pre)
    visual.ln_pre                                                         → vision.ln_pre.hook_normalized
    visual.transformer.resblocks.{i}     ResidualAttentionBlock: ln_1, attn (nn.MultiheadAttention, fused
                                         in_proj_weight), ls_1, ln_2, mlp{c_fc, gelu, c_proj}, ls_2
    visual.ln_post                       applied to every token; CLS = token 0    → vision.hook_out  [batch, d]
    visual.proj                          a bare parameter (pooled @ proj)         → hook_image_embeds = visual out
    token_embedding + positional_embedding (input of transformer)                 → text.hook_embed
    transformer.resblocks.{i}            the same block, causal mask (attn_mask buffer, -inf above the diagonal)
    ln_final, text_projection            (pooled at the end-of-text token)        → text.*, hook_text_embeds

``nn.MultiheadAttention`` computes q/k/v, the pattern and z inside one functional call and uses ``out_proj``'s
weight without calling the module, so those values have no module boundary. For the blocks whose
q/k/v/scores/pattern/z hook points are in use, and only for that run, the block's ``attention`` method is
replaced on the instance by an exact recomputation from the same weights that passes each value through its
hook point (:class:`MultiheadAttentionTap`). While it is replaced, ``attn`` itself is not called, so raw
``open_clip.<...>.attn.hook_out`` hooks do not fire for that block.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import parse_model_name
from open_clip.transformer import LayerScale, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from hooked_vlm.adapter import Adapter, Prepared, TowerInfo, register_adapter
from hooked_vlm.inputs import check_type, is_pixel_values, is_processor_output, load_images, pixel_tensor, to_model
from hooked_vlm.layout import InputLayout, grid_tower, text_tower
from hooked_vlm.multihead_attention import ATTENTION_HOOKS, hooked_multihead_attention
from hooked_vlm.taps import (
    BoundHookPoint,
    InputTap,
    InstanceOverride,
    OutputTap,
    ResidualSumTap,
    Run,
    SelectToken,
    Tap,
    submodule,
)


def _block_attention(
    attn: nn.MultiheadAttention,
    hooks: dict[str, BoundHookPoint],
    run: Run,
    q_x: Tensor,
    k_x: Tensor | None = None,
    v_x: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """``ResidualAttentionBlock.attention`` (open_clip calls it with these keywords), recomputed with hook points."""
    return hooked_multihead_attention(attn, hooks, run, q_x, k_x, v_x, attn_mask)


@dataclass(frozen=True)
class MultiheadAttentionTap(Tap):
    """q, k, v, scores, pattern or z (``kind``) of the ``nn.MultiheadAttention`` of the block at ``module``.

    All requested kinds of one block are installed together: the block's ``attention`` method is replaced on
    the instance for the run. SDPA computes the attention unless scores or pattern are requested.
    """

    kind: str = "z"

    def group_key(self) -> object:
        return (MultiheadAttentionTap, self.module)

    @classmethod
    def install_group(cls, root, hook_points, run):
        block = submodule(root, hook_points[0].tap.module)
        hooks = {hp.tap.kind: hp for hp in hook_points}
        return [InstanceOverride(block, "attention", partial(_block_attention, block.attn, hooks, run))]

    def describe(self) -> str:
        return f"{self.module}.attention → recomputed from attn.in_proj_weight ({self.kind})"


@dataclass(frozen=True)
class TextEmbedsTap(Tap):
    """The return value of ``encode_text`` before its optional normalisation (``hook_text_embeds``).

    ``text_projection`` is a bare parameter that ``CLIP.encode_text`` multiplies in after pooling at the
    end-of-text token, so no module boundary carries the text embeddings. For the run, the instance's
    ``encode_text`` is wrapped; ``CLIP.forward`` and ``get_logits`` call it through ``self`` and see the wrapper.
    """

    def install(self, root, hp, run):
        model = submodule(root, self.module)
        encode_text = model.encode_text

        def hooked_encode_text(text: Tensor, normalize: bool = False) -> Tensor:
            embeds = run.fire(hp, encode_text(text))
            return F.normalize(embeds, dim=-1) if normalize else embeds

        return [InstanceOverride(model, "encode_text", hooked_encode_text)]

    def describe(self) -> str:
        return "encode_text → return value (before normalize)"


def _projected_width(projection: Tensor | nn.Linear | None, norm: nn.LayerNorm) -> int:
    """The width after an optional projection (a ``[width, embed]`` parameter or a Linear) of ``norm``'s output."""
    if projection is None:
        return norm.normalized_shape[-1]
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]


def _block_hooks(prefix: str, block: str) -> dict[str, Tap]:
    """The canonical per-block hook set (doc/hook_reference.md) of one ``ResidualAttentionBlock`` (``x + ls_1(attn(ln_1 x))``, ...)."""
    hooks: dict[str, Tap] = {
        f"{prefix}.hook_resid_pre": InputTap(block),
        f"{prefix}.ln1.hook_normalized": OutputTap(f"{block}.ln_1"),
    }
    for kind, leaf in ATTENTION_HOOKS.items():
        hooks[f"{prefix}.attn.{leaf}"] = MultiheadAttentionTap(block, kind=kind)
    return hooks | {
        # ls_1 / ls_2 (LayerScale, identity when absent) produce what the block adds to the residual stream
        f"{prefix}.hook_attn_out": OutputTap(f"{block}.ls_1"),
        f"{prefix}.hook_resid_mid": ResidualSumTap(f"{block}.ls_1", block=block),
        f"{prefix}.ln2.hook_normalized": OutputTap(f"{block}.ln_2"),
        f"{prefix}.mlp.hook_pre": OutputTap(f"{block}.mlp.c_fc"),
        f"{prefix}.mlp.hook_post": InputTap(f"{block}.mlp.c_proj"),
        f"{prefix}.hook_mlp_out": OutputTap(f"{block}.ls_2"),
        f"{prefix}.hook_resid_post": OutputTap(block),
    }


def _unsupported(model: nn.Module) -> list[str]:
    """What in ``model`` breaks the meaning of a canonical hook (empty for the CLIP ViT family)."""
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        return [f"the image tower is a {type(visual).__name__}, not a VisionTransformer"]
    problems = []
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        problems.append("the image tower does not pool the CLS token after ln_post (vision.hook_out)")
    for tower, transformer in (("image", visual.transformer), ("text", model.transformer)):
        kinds = {type(block).__name__ for block in transformer.resblocks if type(block) is not ResidualAttentionBlock}
        if kinds:
            problems.append(f"the {tower} tower has {', '.join(sorted(kinds))} blocks, not ResidualAttentionBlock")
        elif not all(block.attn.batch_first for block in transformer.resblocks):
            problems.append(f"the {tower} tower runs sequence-first (batch_first=False)")
    return problems


def _tower_info(name: str, transformer: nn.Module) -> TowerInfo:
    block = transformer.resblocks[0]
    return TowerInfo(
        name=name,
        n_layers=len(transformer.resblocks),
        d_model=transformer.width,
        n_heads=block.attn.num_heads,
        d_head=block.attn.head_dim,
        d_mlp=block.mlp.c_fc.out_features,
    )


def _split_mapping(inputs: Mapping[str, Any], text: Any) -> tuple[Tensor | None, Any]:
    """``{"pixel_values": ..., "input_ids" or "text": ...}`` → ``(pixel_values, text)``."""
    unknown = set(inputs) - {"pixel_values", "input_ids", "text"}
    if unknown:
        raise TypeError(f"unexpected keys {sorted(unknown)}; open_clip inputs are pixel_values and input_ids / text")
    texts = [inputs[key] for key in ("input_ids", "text") if key in inputs] + ([text] if text is not None else [])
    if len(texts) > 1:
        raise ValueError("text is given twice; pass it once (as input_ids, text, or text=[...])")
    return inputs.get("pixel_values"), next(iter(texts), None)


def _parse_name(name: str) -> tuple[str, str | None]:
    """``(model_name, pretrained)`` for open_clip; an unknown architecture or tag fails here, before any download."""
    spec = name.removeprefix("open_clip:")
    form = (
        "open_clip names are 'open_clip:ARCH/PRETRAINED' (e.g. 'open_clip:ViT-L-14/openai'), "
        "'open_clip:hf-hub:ORG/REPO' or 'open_clip:local-dir:PATH'"
    )
    if parse_model_name(spec)[0] is not None:  # hf-hub: / local-dir: bring their own config and weights
        return spec, None
    arch, _, pretrained = spec.partition("/")
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ValueError(f"could not load {name!r}: {arch!r} is not in open_clip.list_models().{hint} {form}")
    if not open_clip.get_pretrained_cfg(arch, pretrained) and not os.path.isfile(pretrained):
        raise ValueError(
            f"could not load {name!r}: {pretrained!r} is neither a pretrained tag of {arch} "
            f"(open_clip.list_pretrained_tags_by_model: {open_clip.list_pretrained_tags_by_model(arch)}) "
            f"nor a checkpoint file. {form}"
        )
    return arch, pretrained


@register_adapter
class OpenCLIPAdapter(Adapter):
    family = "open_clip"
    raw_prefix = "open_clip"
    centre_crops_images = True  # open_clip's preprocess resizes the short side and centre-crops, as CLIP's

    def __init__(self, model: nn.Module, processor: Any = None):
        problems = _unsupported(model)
        if problems:
            raise ValueError(f"this open_clip CLIP is not supported: {'; '.join(problems)}")
        super().__init__(model, processor)

    @classmethod
    def claimed_classes(cls) -> tuple[type, ...]:
        return (open_clip.CLIP,)

    @classmethod
    def matches_model(cls, model) -> bool:
        return isinstance(model, open_clip.CLIP)

    @classmethod
    def matches_name(cls, name: str) -> bool:
        return name.startswith("open_clip:")

    @classmethod
    def load(cls, name, *, device, dtype, attn_implementation, **open_clip_kwargs):
        """``open_clip:ARCH/PRETRAINED`` (a tag or a checkpoint file), ``open_clip:hf-hub:ORG/REPO`` or ``local-dir:PATH``.

        The processor is ``(preprocess, tokenizer)``. Tags trained with QuickGELU (every ``openai`` tag) are loaded
        with ``force_quick_gelu=True``: the plain configs (``ViT-L-14.json``) build ``nn.GELU`` and open_clip only
        warns about the mismatch. For OpenAI weights from a file, use the ``-quickgelu`` arch or pass
        ``force_quick_gelu=True``. Other keyword arguments go to ``open_clip.create_model_and_transforms``.
        """
        if attn_implementation is not None:
            raise ValueError("attn_implementation is a transformers option; open_clip models run nn.MultiheadAttention")
        if "device_map" in open_clip_kwargs:
            raise ValueError("device_map is a transformers option; open_clip models load on one device (device=)")
        model_name, pretrained = _parse_name(name)
        if pretrained is not None:
            tag = open_clip.get_pretrained_cfg(model_name, pretrained)
            open_clip_kwargs.setdefault("force_quick_gelu", tag.get("quick_gelu", False))
        kwargs = {"pretrained": pretrained, "device": device, **open_clip_kwargs}
        tried = ", ".join([repr(model_name), *(f"{key}={value!r}" for key, value in kwargs.items())])
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, **kwargs)
        except Exception as error:  # offline, missing file, bad checkpoint: say what was tried
            raise OSError(
                f"could not load {name!r}: tried open_clip.create_model_and_transforms({tried}). "
                f"Underlying error: {type(error).__name__}: {error}"
            ) from error
        if dtype is not None:
            model = model.to(dtype)
        return model.eval(), (preprocess, open_clip.get_tokenizer(model_name))

    # ---- structure --------------------------------------------------------------------------------------------------
    def towers(self) -> list[TowerInfo]:
        return [_tower_info("vision", self.model.visual.transformer), _tower_info("text", self.model.transformer)]

    def hook_map(self) -> dict[str, Tap]:
        vision, text = (t.n_layers for t in self.towers())
        hooks: dict[str, Tap] = {
            "vision.hook_embed": InputTap("visual.ln_pre"),
            "vision.ln_pre.hook_normalized": OutputTap("visual.ln_pre"),
        }
        for i in range(vision):
            hooks |= _block_hooks(f"vision.blocks.{i}", f"visual.transformer.resblocks.{i}")
        hooks["vision.hook_out"] = OutputTap("visual.ln_post", view=SelectToken(0))
        hooks["hook_image_embeds"] = OutputTap("visual")
        hooks["text.hook_embed"] = InputTap("transformer")
        for i in range(text):
            hooks |= _block_hooks(f"text.blocks.{i}", f"transformer.resblocks.{i}")
        hooks["text.ln_final.hook_normalized"] = OutputTap("ln_final")
        hooks["hook_text_embeds"] = TextEmbedsTap("")
        return hooks

    def hook_widths(self) -> dict[str, int | None]:
        # both embeddings come out of a bare projection parameter ([width, embed]), which no module states
        return super().hook_widths() | {
            "hook_image_embeds": _projected_width(self.model.visual.proj, self.model.visual.ln_post),
            "hook_text_embeds": _projected_width(self.model.text_projection, self.model.ln_final),
        }

    def image_projection(self) -> Tensor | None:
        return self.model.visual.proj

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        """Images (or ready pixel_values) and/or ``text``: strings, or token ids as open_clip's tokenizer makes them."""
        if prompt is not None:
            raise TypeError("CLIP takes no prompt; pass captions to compare against as text=[...]")
        if kwargs:
            raise TypeError(f"open_clip models take only images and text, not {sorted(kwargs)}")
        check_type(inputs)
        if is_processor_output(inputs):
            inputs, text = _split_mapping(inputs, text)
        model_kwargs: dict[str, Tensor] = {}
        if is_pixel_values(inputs):
            model_kwargs["pixel_values"] = pixel_tensor(inputs)
        elif inputs is not None:
            preprocess = self._processor_part(0, "images")
            model_kwargs["pixel_values"] = torch.stack([preprocess(image) for image in load_images(inputs)])
        if isinstance(text, Tensor):
            model_kwargs["input_ids"] = self._check_token_ids(text)
        elif text is not None:
            model_kwargs["input_ids"] = self._processor_part(1, "text")([text] if isinstance(text, str) else list(text))
        if not model_kwargs:
            raise ValueError("nothing to run: pass images (or pixel_values) and/or text=[...]")
        return Prepared(to_model(model_kwargs, self.model), partial(self._layout, model_kwargs))

    def _processor_part(self, index: int, what: str) -> Any:
        """``preprocess`` (0) or ``tokenizer`` (1) of the ``(preprocess, tokenizer)`` processor; a bare preprocess
        transform (as ``open_clip.create_model_and_transforms`` returns it) is the processor for images alone."""
        processor = self.require_processor(what)
        if isinstance(processor, tuple):
            return processor[index]
        if index == 0:
            return processor
        raise TypeError(
            f"preprocessing {what} needs open_clip's tokenizer, and this model was wrapped with a bare "
            f"{type(processor).__name__}: pass (preprocess, open_clip.get_tokenizer(name)) as the processor"
        )

    def _check_token_ids(self, input_ids: Tensor) -> Tensor:
        # encode_text adds every row of positional_embedding and applies the full-size causal mask
        n = self.model.context_length
        if input_ids.dim() != 2 or input_ids.shape[1] != n or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be integer token ids [batch, {n}] as open_clip's tokenizer makes them, "
                f"got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        return input_ids

    def _layout(self, model_kwargs: dict[str, Any]) -> InputLayout:
        towers = {}
        if "pixel_values" in model_kwargs:
            pixels = model_kwargs["pixel_values"]
            patch_h, patch_w = self.model.visual.patch_size
            towers["vision"] = grid_tower(pixels.shape[0], pixels.shape[-2] // patch_h, pixels.shape[-1] // patch_w)
        if "input_ids" in model_kwargs:
            # open_clip pads with 0 after the end-of-text token: a position is text if a real token is at or after it
            real = model_kwargs["input_ids"] != 0
            towers["text"] = text_tower(real.flip(-1).cumsum(-1).flip(-1) > 0)
        return InputLayout(towers)

    def tower_forward(self, tower: str, prepared: Prepared) -> Any:
        if tower != "vision":
            return super().tower_forward(tower, prepared)
        return self.model.visual(prepared.kwargs["pixel_values"])

    def block_list(self, tower: str) -> str:
        paths = {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"}
        if tower not in paths:
            raise self.no_block_list(tower)
        return paths[tower]

    def attn_layer_scale(self, tower: str, layer: int) -> Tensor | None:
        scale = submodule(self.model, self.block_list(tower))[layer].ls_1
        return scale.gamma if isinstance(scale, LayerScale) else None

    def example_inputs(self) -> dict[str, Any]:
        height, width = self.model.visual.image_size
        return {
            "pixel_values": torch.zeros(1, 3, height, width),
            # token ids [1, context_length], as open_clip's tokenizer pads them (encode_text needs the full length)
            "input_ids": torch.zeros(1, self.model.context_length, dtype=torch.long),
        }

    def forward(self, prepared: Prepared) -> Tensor:
        """Image embeddings, text embeddings, or with both the image-text logits ``[images, texts]``."""
        image, text = prepared.kwargs.get("pixel_values"), prepared.kwargs.get("input_ids")
        if image is not None and text is not None:
            return self.model.get_logits(image, text)[0]
        if image is not None:
            return self.model.encode_image(image)
        return self.model.encode_text(text)

    def describe(self) -> dict[str, Any]:
        visual = self.model.visual
        (height, width), (patch, _), (rows, cols) = visual.image_size, visual.patch_size, visual.grid_size
        d_vision, d_embed = visual.proj.shape
        return {
            "image size": f"{height}×{width} px, patch {patch} px",
            "vision tokens": f"1 CLS + {rows}×{cols} = {rows * cols} patches = {1 + rows * cols}",
            "pooling": "CLS token after ln_post (vision.hook_out)",
            "projection": f"visual.proj: parameter [{d_vision}, {d_embed}] (hook_image_embeds = visual output)",
            "activation": type(visual.transformer.resblocks[0].mlp.gelu).__name__,
        }
