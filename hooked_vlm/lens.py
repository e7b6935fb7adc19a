"""Logit lens over image tokens: what each LM layer's residual at each image token would predict as a next token.

The residual stream after block ``l`` at a position is put through the LM's own final norm and unembedding
(``lm_head``), as if the model ended there (nostalgebraist 2020; on image tokens: Neo et al. 2025, Jiang et al.
2025). :func:`logit_lens` keeps, per layer and position, the top-k tokens and the probability of chosen words;
:meth:`LogitLensResult.grid` arranges a word's probability over the image for heatmaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor, nn

from hooked_vlm.layout import InputLayout
from hooked_vlm.patching import PositionLabel, Positions, on_image_grid, position_labels, position_mask
from hooked_vlm.readouts import TokenLike, resolve_tokenizer, token_id


def unembedding(model: Any) -> tuple[nn.Module, nn.Module]:
    """The LM's final norm and unembedding modules, found through the hook map (``lm.ln_final.hook_normalized``)."""
    if "lm.ln_final.hook_normalized" not in model.hook_dict or model.raw_model.get_output_embeddings() is None:
        raise ValueError(f"the logit lens needs a language model with an unembedding; {model.adapter.family} has none")
    norm = model.raw_model.get_submodule(model.hook_point("lm.ln_final.hook_normalized").tap.module)
    return norm, model.raw_model.get_output_embeddings()


@dataclass
class LogitLensResult:
    """Per layer and position: the top-k next tokens (ids, probabilities) and the probabilities of ``words``."""

    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    word_probs: Float[Tensor, "layer pos word"]
    words: list[str]
    layers: list[int]
    positions: list[PositionLabel]
    layout: InputLayout
    tokenizer: Any = None

    def top_tokens(self, layer: int, position: int) -> list[tuple[str, float]]:
        """``(token, probability)`` of the top-k tokens at block ``layer`` and sequence position ``position``."""
        i, j = self.layers.index(layer), [label.position for label in self.positions].index(position)
        return list(zip(self._tokens(self.top_ids[i, j].tolist()), self.top_probs[i, j].tolist(), strict=True))

    def _tokens(self, ids: list[int]) -> list[str]:
        """Token strings; ids the tokenizer does not know (models pad their vocabulary) as ``<id>``."""
        tokens = self.tokenizer.convert_ids_to_tokens(ids) if self.tokenizer is not None else [None] * len(ids)
        return [token if token is not None else f"<{i}>" for i, token in zip(ids, tokens, strict=True)]

    def grid(self, word: str | int, image: int = 0, tile: int = 0) -> Float[Tensor, "layer rows cols"]:
        """The probability of ``word`` (its text as given, or its index in ``words``) on one image's token grid per
        layer (``NaN`` at cells not in ``positions``). LLaVA-OneVision: tile 0 base, tile 1 high-res grid."""
        w = self.words.index(word) if isinstance(word, str) else word
        return self._on_grid(self.word_probs[..., w], image, tile)

    def top_grid(self, layer: int, image: int = 0, tile: int = 0) -> tuple[list[list[str]], Float[Tensor, "rows cols"]]:
        """The top token and its probability at each cell of one image's grid, at block ``layer``."""
        i = self.layers.index(layer)
        probs = self._on_grid(self.top_probs[:, :, 0], image, tile)[i]
        ids = self._on_grid(self.top_ids[:, :, 0].float(), image, tile)[i]
        tokens = [["" if math.isnan(v) else self._tokens([int(v)])[0] for v in row] for row in ids.tolist()]
        return tokens, probs

    def _on_grid(self, values: Float[Tensor, "layer pos"], image: int, tile: int) -> Float[Tensor, "layer rows cols"]:
        return on_image_grid(self.layout, "lm", self.positions, values, image, tile)

    def plot(self, path: str | Path, image: Any, word: str | int, *, image_index: int = 0, tile: int = 0,
             title: str | None = None) -> Figure:
        """One heatmap per layer of ``word``'s probability over ``image``."""
        from hooked_vlm import plotting

        word_text = self.words[word] if isinstance(word, int) else word
        return plotting.layer_heatmaps(
            image, self.grid(word, image_index, tile), path, [f"layer {layer}" for layer in self.layers],
            title=title or f"logit lens: p({word_text!r}) at each image token", label="probability",
        )

    def plot_top_tokens(self, path: str | Path, image: Any, layer: int, *, image_index: int = 0, tile: int = 0,
                        title: str | None = None) -> Figure:
        """The top token at each image token of block ``layer``, written over a heatmap of its probability."""
        from hooked_vlm import plotting

        tokens, probs = self.top_grid(layer, image_index, tile)
        return plotting.patch_tokens(image, tokens, probs, path, title=title or f"logit lens, layer {layer}: top token",
                                     label="probability of the top token")


def logit_lens(
    model: Any,
    inputs: Any,
    *,
    words: Sequence[TokenLike] = (),
    layers: Sequence[int] | None = None,
    positions: Positions = "image",
    k: int = 5,
    row: int = 0,
    prompt: Any = None,
    chunk: int = 256,
) -> LogitLensResult:
    """The logit lens at ``positions`` (default: every image token) of batch row ``row``, for ``layers`` (default
    all): per layer the residual after the block (``lm.blocks.{l}.hook_resid_post``) through the final norm and
    ``lm_head``, softmaxed. ``words`` are single tokens (words or ids) whose probability is kept everywhere;
    ``chunk`` positions are unembedded at a time (the vocabulary is large)."""
    norm, unembed = unembedding(model)
    n_layers = next(t.n_layers for t in model.adapter.towers() if t.name == "lm")
    layers = list(range(n_layers)) if layers is None else list(layers)
    names = [f"lm.blocks.{layer}.hook_resid_post" for layer in layers]
    prepared = model.prepare_inputs(inputs, prompt=prompt)
    with torch.no_grad():
        _, cache = model.run_with_cache(prepared, names_filter=names)
    picked = position_mask(prepared.layout, names[0], positions)[row].nonzero()[:, 0]
    word_ids = torch.tensor([token_id(w, model) for w in words], dtype=torch.long)
    top_ids, top_probs, word_probs = [], [], []
    with torch.no_grad():
        for name in names:
            resid = cache[name][row, picked.to(cache[name].device)]
            probs = torch.cat([unembed(norm(part)).float().softmax(-1) for part in resid.split(chunk)])
            top = probs.topk(k, dim=-1)
            top_ids.append(top.indices.cpu())
            top_probs.append(top.values.cpu())
            word_probs.append(probs[:, word_ids.to(probs.device)].cpu())
    tokenizer = resolve_tokenizer(model)
    return LogitLensResult(
        torch.stack(top_ids), torch.stack(top_probs), torch.stack(word_probs),
        [w if isinstance(w, str) else str(w) for w in words], layers,
        position_labels(prepared.layout, names[0], torch.stack([torch.full_like(picked, row), picked], 1),
                        prepared.kwargs.get("input_ids"), tokenizer),
        prepared.layout, tokenizer if hasattr(tokenizer, "convert_ids_to_tokens") else None,
    )
