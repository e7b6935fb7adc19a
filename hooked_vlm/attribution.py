"""Direct attribution of a readout to every head, MLP and source position (Gandelsman et al., ICLR 2024).

A readout that is linear in one position of a tower's last residual stream (with the norm's scale, and any
L2 normalisation of the embedding, frozen at their values in the run) splits exactly into the direct
contributions of the residual components (:func:`hooked_vlm.decomposition.get_full_resid_decomposition`):

- CLIP: ``hook_image_embeds = P · norm(resid[CLS])``; a :class:`~hooked_vlm.readouts.ClipSimilarity` (cosine with a
  text embedding) or a linear :class:`~hooked_vlm.readouts.Probe` on the (normalised) embedding (the LAION
  aesthetic predictor is affine: it is attributed exactly) is ``w · norm(resid[CLS]) + b``;
- a VLM's :class:`~hooked_vlm.readouts.LogitDiff` is ``(W_U[correct] - W_U[wrong]) · ln_final(resid[-1])``;
- a non-linear probe is **not** linear: its first linear layer's unit ``unit`` (a pre-activation) is attributed
  instead, and :attr:`DirectAttribution.note` says so.

``values.sum(0) == value - bias``: the components are the heads ``L{l}H{h}``, the MLPs ``{l}_mlp_out``,
``embed``, the attention output biases ``bias`` and the final norm's own bias ``ln_bias``; ``bias`` of the result
is the readout's constant (a probe's bias). Each head's share is further split by source position: with
``pattern`` and ``v`` cached, ``result[q] = Σ_k pattern[q, k] · v[k] @ W_O`` (``by_source``), so a head's
contribution is mapped onto the image patches it reads from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vlm.decomposition import Tower, get_full_resid_decomposition, unembedding
from hooked_vlm.readouts import ClipSimilarity, LogitDiff, Probe
from hooked_vlm.taps import submodule


@dataclass
class DirectAttribution:
    """Direct contributions of every residual component to one readout, per batch row."""

    values: Float[Tensor, "component batch"]
    labels: list[str]
    value: Float[Tensor, " batch"]  # the readout (or, for a non-linear probe, the attributed unit) in this run
    bias: Float[Tensor, " batch"]  # its constant part: values.sum(0) == value - bias
    tower: str
    position: int  # the residual-stream position the readout reads (CLS = 0, the last token = -1)
    n_layers: int
    n_heads: int
    note: str = ""
    #: ``[batch, layer, head, source position]``: each head's contribution by the position its value came from
    by_source: Tensor | None = None
    layout: Any = None
    source_hook: str = ""  # a hook of the tower's sequence, to map source positions onto patches with the layout
    extra: dict = field(default_factory=dict)

    def heads(self) -> Float[Tensor, "batch layer head"]:
        """The heads' contributions as a ``[batch, layer, head]`` grid."""
        return self.values[: self.n_layers * self.n_heads].T.unflatten(1, (self.n_layers, self.n_heads))

    def mlps(self) -> Float[Tensor, "batch layer"]:
        return torch.stack([self.values[self.labels.index(f"{i}_mlp_out")] for i in range(self.n_layers)], 1)

    def component(self, label: str) -> Float[Tensor, " batch"]:
        return self.values[self.labels.index(label)]

    def top(self, k: int = 10, batch: int = 0) -> list[tuple[str, float]]:
        """The ``k`` components of largest absolute contribution in batch row ``batch``."""
        order = self.values[:, batch].abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(self.values[i, batch])) for i in order]

    def patch_map(self, head: tuple[int, int] | None = None, batch: int = 0, image: int | None = None, tile: int = 0) -> Tensor:
        """``[rows, cols]`` over the patches of ``image``: one head's ``(layer, head)`` contribution by source
        patch, or (``head=None``) summed over every head of every layer."""
        if self.by_source is None:
            raise ValueError("no per-source attribution: cache the tower's hook_pattern and hook_v (attribute(..., by_source=True))")
        src = self.by_source[batch] if head is None else self.by_source[batch, head[0], head[1]][None, None]
        per_position = src.sum((0, 1))  # [pos]
        if self.layout is None:
            raise ValueError("this attribution has no input layout, so positions cannot be put on the patch grid")
        sequence = self.layout.tower_for(self.source_hook)
        if image is None:  # the first image in this batch row
            images = sequence.image[batch]
            image = int(images[images >= 0][0])
        row = torch.zeros(sequence.shape, dtype=per_position.dtype)
        row[batch] = per_position.cpu()
        grid = self.layout.image_grid(self.source_hook, row, image=image, tile=tile)
        return grid

    def plot_heads(self, path, batch: int = 0, title: str | None = None):
        from hooked_vlm.plotting import head_grid

        return head_grid(self.heads()[batch], path, title=title or f"direct attribution per head ({self.tower})",
                         label="contribution", signed=True)

    def plot_patches(self, image_pil, path, head: tuple[int, int] | None = None, batch: int = 0, image: int | None = None,
                     title: str | None = None):
        """The per-patch map beside the image (never blended), diverging colours centred on 0."""
        from hooked_vlm.plotting import patch_heatmap

        grid = self.patch_map(head, batch=batch, image=image)
        what = "all heads" if head is None else f"L{head[0]}H{head[1]}"
        return patch_heatmap(image_pil, grid, path, title=title or f"direct attribution by source patch, {what}",
                             label="contribution", signed=True)


# ---------------------------------------------------------------------------------------------------------------
# Readouts as directions on a tower's normed last residual stream.


def _image_projection(model) -> Float[Tensor, "d_model d_embed"]:
    projection = model.adapter.image_projection()
    if projection is not None:
        return projection
    raise ValueError(f"this {model.adapter.family} model has no image projection (hook_image_embeds)")


@dataclass
class _Linear:
    tower: str
    position: int
    weight: Float[Tensor, "batch d_model"]  # on the normed residual stream
    bias: Float[Tensor, " batch"]
    note: str


def _on_embedding(model, cache, hook: str, w: Tensor, b: Tensor, normalize: bool, note: str) -> _Linear:
    """A linear map ``w · f + b`` of the feature ``hook`` (``hook_image_embeds`` or ``vision.hook_out``)."""
    feature = cache[hook].float()
    batch = feature.shape[0]
    w = w.float().expand(batch, -1)
    if normalize:  # L2 normalisation with the norm frozen at its value in the run
        w = w / feature.norm(dim=-1, keepdim=True)
    if hook == "hook_image_embeds":
        w = w @ _image_projection(model).float().T.to(w.device)
    elif hook != "vision.hook_out":
        raise NotImplementedError(f"direct attribution of a readout on {hook!r}: supported are hook_image_embeds and vision.hook_out")
    elif not isinstance(submodule(model.raw_model, model.hook_dict[hook].tap.module), nn.LayerNorm):
        # e.g. SigLIP's attention-pooling head: the pooled feature is not a norm of one residual position
        raise NotImplementedError(
            f"direct attribution through {hook!r}: this {model.adapter.family} model's pooled feature is not a norm "
            "of one residual position, so it is not linear in the residual stream's components"
        )
    return _Linear("vision", 0, w, b.float().expand(batch), note)


def linear_readout(model, cache, readout: Any, output: Any = None, unit: int | None = None) -> _Linear:
    """The readout as ``weight · normed_resid[position] + bias``, with a note on any linearisation."""
    if isinstance(readout, ClipSimilarity):
        if readout.softmax:
            raise ValueError("ClipSimilarity(softmax=True) is not linear in the embedding; attribute the cosine (softmax=False)")
        t = readout.text_embeds[readout.target]
        return _on_embedding(model, cache, "hook_image_embeds", t, torch.zeros(()), True,
                             "cosine with the text embedding, the image embedding's norm frozen at its value")
    if isinstance(readout, Probe):
        if readout.position is not None:
            raise NotImplementedError("direct attribution of a probe reading a position of a hook; use a pooled hook")
        if readout.linear:
            w, b, note = readout.direction, readout.bias, "affine probe: attributed exactly"
        else:
            first = next(m for m in readout.module.modules() if isinstance(m, nn.Linear))
            if unit is None:
                raise ValueError(
                    "this probe is non-linear, so only its first linear layer can be attributed: pass unit= (one of "
                    f"its {first.out_features} outputs)"
                )
            w, b = first.weight[unit].detach(), first.bias[unit].detach() if first.bias is not None else torch.zeros(())
            note = f"non-linear probe: attributed is its first linear layer's unit {unit} (a pre-activation), not the probe's output"
        if readout.normalize:
            note += "; the feature's L2 norm frozen at its value"
        return _on_embedding(model, cache, readout.hook_name, w, b, readout.normalize, note)
    if isinstance(readout, LogitDiff):
        w_u = unembedding(model).float()
        correct = readout.correct[:, 0]
        wrong = readout.incorrect
        note = "logit difference through ln_final with its scale frozen"
        if wrong.shape[1] == 1:
            direction = w_u[correct] - w_u[wrong[:, 0]]
        elif readout.reduce == "mean":
            direction = w_u[correct] - w_u[wrong].mean(1)
        else:
            if output is None:
                raise ValueError(f"LogitDiff(reduce={readout.reduce!r}) with several wrong answers needs the run's output")
            logits = output[:, readout.position].float()
            wrong_logits = logits.gather(1, wrong.to(logits.device).expand(logits.shape[0], -1))
            if readout.reduce == "max":
                pick = wrong.to(logits.device).expand(logits.shape[0], -1).gather(1, wrong_logits.argmax(1, keepdim=True))
                direction = w_u[correct.to(w_u.device)] - w_u[pick[:, 0].to(w_u.device)]
                note += "; the strongest wrong answer of this run"
            else:  # logsumexp: its gradient, the softmax over the wrong answers, is exact to first order only
                weights = wrong_logits.softmax(1)
                direction = w_u[correct.to(w_u.device)] - (weights[..., None] * w_u[wrong.to(w_u.device)]).sum(1)
                note += "; logsumexp of the wrong answers linearised (softmax weights of this run)"
        batch = cache["lm.blocks.0.hook_resid_pre"].shape[0]
        return _Linear("lm", readout.position, direction.expand(batch, -1), torch.zeros(batch), note)
    if isinstance(readout, Tensor):
        raise TypeError("for a raw direction call direct_attribution(cache, direction, tower=..., position=...)")
    raise TypeError(f"direct attribution of {type(readout).__name__}: supported are ClipSimilarity, Probe and LogitDiff")


# ---------------------------------------------------------------------------------------------------------------


def _effective(norm, weight: Tensor, scale: Tensor) -> Tensor:
    """The direction ``u`` with ``u · c == weight · apply_ln(c)`` for any component ``c`` at one position."""
    u = weight * (norm.weight.float().to(weight.device) if norm.weight is not None else 1)
    if norm.kind == "LN":
        u = u - u.mean(-1, keepdim=True)
    return u / scale.float()


@torch.no_grad()
def direct_attribution(
    cache,
    direction: Float[Tensor, "batch d_model"] | Float[Tensor, " d_model"],
    *,
    tower: str | None = None,
    position: int = -1,
    bias: Tensor | float = 0.0,
    note: str = "",
    by_source: bool = True,
) -> DirectAttribution:
    """Attribute ``direction · final_norm(resid[position]) + bias`` to every component of ``tower``."""
    model = cache.model_or_raise()
    t = Tower(model, tower)
    norm = t.final_norm()
    stack, labels = get_full_resid_decomposition(cache, pos_slice=position, return_labels=True, tower=t.name)
    stack = stack.float()  # [component, batch, d]
    batch = stack.shape[1]
    weight = direction.float().to(stack.device).expand(batch, -1)
    final = cache[norm.reads][:, position].float()
    scale = norm.scale(final)  # [batch, 1]
    u = _effective(norm, weight, scale)
    values = (stack * u).sum(-1)
    ln_bias = (norm.bias.float().to(weight.device) * weight).sum(-1) if norm.bias is not None else torch.zeros(batch)
    values = torch.cat([values, ln_bias[None].to(values.device)])
    labels = [*labels, "ln_bias"]
    bias = torch.as_tensor(bias, dtype=torch.float32).expand(batch).to(values.device)
    # the value from the model's own normed output, not from the components
    value = (weight * norm.module(cache[norm.reads][:, position]).float()).sum(-1) + bias
    sources = _by_source(cache, t, position, u) if by_source else None
    return DirectAttribution(
        values, labels, value, bias, t.name, position, t.n_layers, t.n_heads, note, sources, cache.layout,
        t.hook(0, "hook_resid_pre"),
    )


def _by_source(cache, t: Tower, position: int, u: Tensor) -> Tensor | None:
    """``[batch, layer, head, key]``: ``pattern[q, k] · (v[k] @ W_O[head]) · u`` at the query ``position``."""
    rows = []
    for layer in range(t.n_layers):
        pattern_name, v_name = t.hook(layer, "attn.hook_pattern"), t.hook(layer, "attn.hook_v")
        if pattern_name not in cache.cache_dict or v_name not in cache.cache_dict:
            return None
        pattern = cache.cache_dict[pattern_name][:, :, position].float()  # [batch, head, key]
        v = cache.cache_dict[v_name].float()  # [batch, key, kv_head, d_head]
        weight = t.out_proj(layer)[0].float().to(u.device)  # [d_model, head · d_head]
        n_heads = pattern.shape[1]
        w_o = weight.T.unflatten(0, (n_heads, -1))  # [head, d_head, d_model]
        readout_per_head = torch.einsum("hdm,bm->bhd", w_o, u)  # [batch, head, d_head]
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)  # grouped-query attention: kv head of each head
        rows.append(pattern * torch.einsum("bkhd,bhd->bhk", v, readout_per_head))
    return torch.stack(rows, 1)


@torch.no_grad()
def attribute(cache, readout: Any, output: Any = None, *, unit: int | None = None, by_source: bool = True) -> DirectAttribution:
    """Direct attribution of ``readout`` (``ClipSimilarity``, ``Probe``, ``LogitDiff``) in the cached run.

    The cache needs the tower's residual decomposition hooks and the readout's own hook; for ``by_source`` also
    ``hook_pattern`` and ``hook_v`` (:func:`attribution_names` lists them all)."""
    model = cache.model_or_raise()
    lin = linear_readout(model, cache, readout, output, unit)
    result = direct_attribution(cache, lin.weight, tower=lin.tower, position=lin.position, bias=lin.bias,
                                note=lin.note, by_source=by_source)
    if isinstance(readout, Probe) and not readout.linear:  # the attributed unit, from the probe's own layer
        first = next(m for m in readout.module.modules() if isinstance(m, nn.Linear))
        features = readout.features(cache).to(first.weight.device, first.weight.dtype)
        result.value = first(features)[:, unit].float().to(result.values.device)
    else:  # the readout itself, as a patching run reads it
        result.value = readout(output, cache).float().to(result.values.device)
    return result


def attribution_names(tower: str, by_source: bool = True, model: Any = None) -> list[str]:
    """Glob patterns of every hook :func:`attribute` reads in ``tower`` (plus the readout's own hooks); with
    ``model``, only the readout hooks it has (a vision tower alone, DINOv2, has no ``hook_image_embeds``)."""
    leaves = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_result"]
    if by_source:
        leaves += ["attn.hook_pattern", "attn.hook_v"]
    names = [f"{tower}.blocks.*.{leaf}" for leaf in leaves]
    readouts = {"vision": ["vision.hook_out", "hook_image_embeds"], "lm": ["lm.ln_final.hook_normalized"]}.get(tower, [])
    return names + [name for name in readouts if model is None or name in model.hook_dict]
