# ruff: noqa: F722  (jaxtyping shape strings such as "batch pos" are not Python expressions)
"""Steering: add vectors at hook points and clamp SAE features, in forward passes and during generation.

A :class:`SteeringVector` is a hook name, a direction, a scale and the positions it applies to; it adds
``scale * direction`` to the hook's value at those positions. Vectors are built from a difference of means
between two input sets, a linear probe's weight vector, an SAE feature's decoder row, or a raw tensor, and are
saved to one ``.safetensors`` file whose header holds their JSON metadata. A :class:`FeatureClamp` sets one
feature of an SAE spliced into the model (``model.add_sae(sae, use_error_term=True)``) to a value.

Both are applied by attaching ordinary hooks, so they compose with every entry point::

    with steer(model, [vector, clamp]):                          # any run inside: forward, run_with_cache, generate
        generation = model.generate(image, prompt="Describe the image.", max_new_tokens=20)
    model.run_with_hooks(image, fwd_hooks=steering_hooks(model, [vector]))

Positions use the one vocabulary of :mod:`hooked_vlm.positions` (``"all"``, ``"cls"``, ``"patches"``, ``"image"``,
sequence indices, ``(row, col)`` pairs or :class:`Patches`, a patch mask, a union, a callable), with
``"generated"`` (the tokens ``generate`` adds). Other forms pick prompt positions; ``"all"`` is ``"prompt"``
plus ``"generated"``. They
resolve against the layout of the run in progress (``model.current_inputs``), so one vector serves any input.

:func:`sweep` runs a grid of scales (and hooks) against a readout and/or a generation prompt.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.layout import InputLayout
from hooked_vlm.model import HookedVLM
from hooked_vlm.plotting import _save
from hooked_vlm.positions import (  # noqa: F401  (Patches and Positions: public names of this module)
    ALL,
    GENERATED,
    PROMPT,
    Patches,
    Positions,
    describe,
    from_json,
    normalize,
    resolve,
    to_json,
)

#: the key of the JSON metadata in a saved vector's safetensors header
METADATA_KEY = "hooked_vlm.steering"


# ---------------------------------------------------------------------------------------------------------------
# Positions.


_PROMPT_ONLY, _GENERATED = PROMPT, GENERATED


def _on_generated(positions: Positions) -> bool:
    """Whether ``positions`` also covers the tokens ``generate`` adds (``"all"``, ``"generated"``, a union with one)."""
    if isinstance(positions, tuple):
        return any(_on_generated(p) for p in positions)
    return isinstance(positions, str) and positions in (ALL, GENERATED)


def prompt_positions(layout: InputLayout, hook_name: str, positions: Positions) -> Bool[Tensor, "batch prompt"]:
    """The prompt positions of ``hook_name``'s sequence that ``positions`` picks (``"generated"``: none)."""
    return resolve(layout, hook_name, positions, generated=True)


def steering_mask(
    layout: InputLayout, hook_name: str, positions: Positions, batch: int, seq: int
) -> Bool[Tensor, "batch seq"]:
    """Where ``positions`` applies in a ``[batch, seq, ...]`` value of ``hook_name`` from a run on ``layout``.

    During ``generate`` the LM runs the prompt once (``seq`` = the prompt length) and then one forward per new
    token (``seq`` < the prompt length, with the KV cache; without it, the whole sequence again: ``seq`` >
    the prompt length). Positions past the prompt are generated tokens. ``batch`` may be a multiple of the
    layout's rows (``num_beams`` / ``num_return_sequences`` repeat each prompt).
    """
    tower = layout.tower_for(hook_name)
    rows, n_prompt = tower.shape
    if batch % rows or (seq != n_prompt and tower is not layout.towers.get("lm")):
        raise ValueError(
            f"{hook_name!r} fired with [batch, pos] = {[batch, seq]}, which does not fit its layout {[rows, n_prompt]}"
        )
    on_generated = _on_generated(normalize(positions))
    if seq < n_prompt:  # a decode step: every position is a new token
        return torch.full((batch, seq), on_generated)
    chosen = prompt_positions(layout, hook_name, positions).repeat_interleave(batch // rows, dim=0)
    return torch.cat([chosen, torch.full((batch, seq - n_prompt), on_generated)], dim=1)


#: the label of a position argument (one rule: :func:`hooked_vlm.positions.describe`)
describe_positions = describe
_encode_positions, _decode_positions = to_json, from_json


def _check_positions(hook_name: str, positions: Positions) -> Positions:
    positions = normalize(positions)
    if _on_generated(positions) and positions != ALL and not hook_name.startswith("lm."):
        raise ValueError(f"positions='generated' needs an LM hook (lm.*): {hook_name!r} never sees generated tokens")
    return positions


def _where(model: HookedVLM, hook_name: str, positions: Positions, value: Tensor, n_trailing: int) -> Tensor | bool:
    """Where to edit ``value`` (with ``n_trailing`` feature axes) in the run in progress: a ``[batch, pos, 1, ...]``
    mask, or ``True`` / ``False`` for everywhere / nowhere (decode steps; pooled values, which only ``"all"`` may
    steer), so the common cases skip the masked select."""
    n_leading = value.dim() - n_trailing
    if n_leading == 1:
        if not (isinstance(positions, str) and positions == "all"):
            raise ValueError(f"{hook_name!r} has no position axis (shape {tuple(value.shape)}); use positions='all'")
        return True
    if n_leading != 2:
        raise ValueError(f"cannot steer {hook_name!r} of shape {tuple(value.shape)}: expected [batch, pos, ...]")
    if model.current_inputs is None:
        raise RuntimeError(f"a steering hook on {hook_name!r} fired outside a HookedVLM run, so it has no layout")
    mask = steering_mask(model.current_inputs.layout, hook_name, positions, value.shape[0], value.shape[1])
    if mask.all() or not mask.any():
        return bool(mask.all())
    return mask.to(value.device).view(*mask.shape, *[1] * n_trailing)


# ---------------------------------------------------------------------------------------------------------------
# Steering vectors.


class Intervention(Protocol):
    """What :func:`steer` applies and :func:`sweep` scans: one hook for a model, one strength (``at``)."""

    hook_name: str

    @property
    def label(self) -> str: ...

    def replace(self, **changes: Any) -> Intervention: ...

    def at(self, strength: float) -> Intervention: ...

    def fwd_hook(self, model: HookedVLM) -> tuple[str, Callable]: ...


@dataclass
class SteeringVector:
    """Adds ``scale * direction`` to ``hook_name`` at ``positions``.

    ``direction`` has the shape of the hook's value after its ``[batch, pos]`` axes (``[d]`` for residual
    streams, ``[head, d_head]`` for ``attn.hook_z``); pooled values (``vision.hook_out`` of CLIP,
    ``hook_image_embeds``) have no position axis and take ``positions="all"``. ``provenance`` records how the
    vector was built; it is saved with it.
    """

    hook_name: str
    direction: Float[Tensor, "*d"]
    scale: float = 1.0
    positions: Positions = "all"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.direction = torch.as_tensor(self.direction).detach()
        self.positions = _check_positions(self.hook_name, self.positions)

    @property
    def vector(self) -> Float[Tensor, "*d"]:
        """What is added: ``scale * direction``."""
        return self.scale * self.direction

    @property
    def label(self) -> str:
        return self.hook_name

    def __repr__(self) -> str:
        shape = "×".join(map(str, self.direction.shape))
        return (
            f"SteeringVector({self.hook_name!r}, direction [{shape}] norm {float(self.direction.float().norm()):.4g}, "
            f"scale={self.scale:g}, positions={describe_positions(self.positions)}, "
            f"from {self.provenance.get('method', '?')})"
        )

    def replace(self, **changes: Any) -> SteeringVector:
        """A copy with some fields changed (``vector.replace(scale=4.0, hook_name="lm.blocks.3.hook_resid_post")``)."""
        return dataclasses.replace(self, **changes)

    def at(self, strength: float) -> SteeringVector:
        """The same vector at scale ``strength`` (what :func:`sweep` varies)."""
        return self.replace(scale=float(strength))

    def normalized(self) -> SteeringVector:
        """The same vector with a unit-norm direction (so ``scale`` is the norm of what is added)."""
        norm = self.direction.float().norm()
        return self.replace(direction=self.direction / norm, provenance={**self.provenance, "normalized_from_norm": float(norm)})

    def fwd_hook(self, model: HookedVLM) -> tuple[str, Callable]:
        """``(hook name, hook function)`` for ``run_with_hooks`` / ``hooks()``."""
        vector, positions = self.vector, self.positions
        # A zero vector returns the value itself, so no edit is written back: the run is the unsteered one by
        # construction, whatever arithmetic a tap uses to write edits back (hook_resid_mid: `new - resid_pre`).
        is_zero = not bool(vector.any())
        cast: dict[tuple, Tensor] = {}

        def add(value: Tensor, hook) -> Tensor:
            if is_zero:
                return value
            key = (value.device, value.dtype)
            delta = cast.get(key)
            if delta is None:
                delta = cast[key] = vector.to(device=value.device, dtype=value.dtype)
            if value.shape[value.dim() - delta.dim() :] != delta.shape:
                raise ValueError(
                    f"steering vector of shape {tuple(delta.shape)} does not fit {hook.name!r} of shape "
                    f"{tuple(value.shape)} (its trailing axes must match)"
                )
            where = _where(model, hook.name, positions, value, delta.dim())
            if isinstance(where, bool):
                return value + delta if where else value
            return torch.where(where, value + delta, value)

        return self.hook_name, add

    # ---- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_tensor(
        cls, hook_name: str, direction: Tensor, *, scale: float = 1.0, positions: Positions = "all", **provenance: Any
    ) -> SteeringVector:
        """A vector from a raw tensor; keyword arguments beyond these are kept as provenance."""
        return cls(hook_name, direction, scale, positions, {"method": "tensor", **provenance})

    @classmethod
    def from_mean_difference(
        cls,
        model: HookedVLM,
        hook_name: str,
        positive: Sequence[Any],
        negative: Sequence[Any],
        *,
        prompt: str | None = None,
        read_positions: Positions | None = None,
        positions: Positions = "all",
        scale: float = 1.0,
        batch_size: int = 8,
        progress: bool = False,
    ) -> SteeringVector:
        """``mean(positive) - mean(negative)`` of ``hook_name``'s activations.

        ``positive`` / ``negative`` are images, or ``(image, prompt)`` pairs; ``prompt`` is the prompt of plain
        images (VLMs). Each input's activations are averaged over ``read_positions`` (default: ``positions``
        when that is a layout selector, else ``"all"``), then inputs are averaged, so inputs with more tokens
        (larger images) do not weigh more. Models without a language model (CLIP) run ``batch_size`` images
        per forward; VLMs one input per forward.
        """
        if read_positions is None:
            read_positions = "all" if isinstance(positions, str) and positions in (_PROMPT_ONLY, _GENERATED) else positions
        read_positions = _check_positions(hook_name, read_positions)
        means = [
            _input_means(model, hook_name, items, prompt, read_positions, batch_size, progress).mean(0)
            for items in (positive, negative)
        ]
        provenance = {
            "method": "mean_difference",
            "model": model_name(model),
            "n_positive": len(positive),
            "n_negative": len(negative),
            "read_positions": _encode_positions(read_positions),
            "prompt": prompt,
        }
        return cls(hook_name, means[0] - means[1], scale, positions, provenance)

    @classmethod
    def from_probe(
        cls, probe: Any, *, scale: float = 1.0, positions: Positions | None = None, normalize: bool = True
    ) -> SteeringVector:
        """A linear probe's weight vector (``probe.direction``) at the hook it reads (``probe.hook_names``).

        ``positions`` defaults to those the probe reads (its ``position``: an index or a selector; ``"all"`` for
        pooled hooks). With ``normalize`` (default) the direction has unit norm, so a vector of scale ``s`` moves a
        linear probe's readout by ``s * ‖w‖``; in general by ``scale * (w · direction)``. A probe that
        L2-normalises its input first (the LAION aesthetic predictor) moves along the same direction, but not
        linearly in ``scale``.
        """
        hook_names = tuple(probe.hook_names)
        if len(hook_names) != 1:
            raise ValueError(f"the probe reads {len(hook_names)} hooks {hook_names}; steering needs a one-hook probe")
        direction = getattr(probe, "direction", None)
        if direction is None:
            raise ValueError(f"{type(probe).__name__} has no direction (only a linear probe has a weight vector)")
        direction = torch.as_tensor(direction).detach().float()
        provenance = {"method": "probe", "probe": repr(probe), "weight_norm": float(direction.norm())}
        if positions is None:
            positions = getattr(probe, "position", None)
            positions = "all" if positions is None else positions
        vector = cls(hook_names[0], direction, scale, positions, provenance)
        return vector.normalized() if normalize else vector

    @classmethod
    def from_sae_feature(
        cls, sae: Any, feature: int, *, scale: float = 1.0, positions: Positions = "all"
    ) -> SteeringVector:
        """An SAE feature's decoder row ``sae.W_dec[feature]`` at the SAE's hook (``sae.cfg.metadata.hook_name``; a
        transcoder's output hook, ``hook_name_out``).

        Adding ``scale * W_dec[feature]`` is what raising the feature's activation by ``scale`` adds to the
        SAE's reconstruction, without splicing the SAE in.
        """
        cfg = sae.cfg
        if getattr(cfg, "normalize_activations", "none") == "layer_norm":
            raise ValueError(
                "this SAE layer-normalises its input, so its decoder rows are not directions in the hook's space; "
                "splice it and use FeatureClamp instead"
            )
        from hooked_vlm.sae.splice import output_hook_name

        hook_name = output_hook_name(sae)  # a transcoder's decoder writes into its output hook
        if hook_name is None:
            raise ValueError("the SAE has no cfg.metadata.hook_name, so the hook to steer is unknown")
        provenance = {
            "method": "sae_feature",
            "feature": int(feature),
            "d_sae": int(cfg.d_sae),
            "sae_model": getattr(cfg.metadata, "model_name", None),
            "neuronpedia_id": getattr(cfg.metadata, "neuronpedia_id", None),
        }
        return cls(hook_name, sae.W_dec[feature].detach().clone(), scale, positions, provenance)

    # ---- saving -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the direction and its metadata (hook, scale, positions, provenance) to one ``.safetensors`` file.

        The metadata is JSON in the file's header: ``safetensors.safe_open(path, "pt").metadata()``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "hook_name": self.hook_name,
            "scale": self.scale,
            "positions": _encode_positions(self.positions),
            "provenance": self.provenance,
        }
        save_file({"direction": self.direction.contiguous()}, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SteeringVector:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            if METADATA_KEY not in header:
                raise ValueError(f"{path} is not a saved SteeringVector (no {METADATA_KEY!r} metadata)")
            metadata = json.loads(header[METADATA_KEY])
            direction = f.get_tensor("direction")
        return cls(
            metadata["hook_name"], direction, metadata["scale"], _decode_positions(metadata["positions"]),
            metadata["provenance"],
        )


def model_name(model: HookedVLM) -> str:
    """``model.name``: the same name stores and SAEs use (kept for callers of the old name)."""
    return model.name


@torch.no_grad()
def _input_means(
    model: HookedVLM, hook_name: str, items: Sequence[Any], prompt: str | None, read_positions: Positions,
    batch_size: int, progress: bool,
) -> Float[Tensor, "inputs ..."]:
    """One mean activation of ``hook_name`` per input, over its ``read_positions``."""
    pairs = [item if isinstance(item, tuple) else (item, prompt) for item in items]
    if not pairs:
        raise ValueError("an input set is empty")
    # Without a language model a list of images is a batch; a VLM reads a list as the images of one prompt.
    batched = not model.adapter.has_language_model
    step = batch_size if batched else 1
    means = []
    for start in tqdm(range(0, len(pairs), step), disable=not progress, desc=hook_name):
        images, prompts = zip(*pairs[start : start + step], strict=True)
        inputs, run_prompt = (list(images), None) if batched else (images[0], prompts[0])
        if batched and any(p is not None for p in prompts):
            raise ValueError(f"{model.adapter.family} models take no prompt")
        _, cache = model.run_with_cache(inputs, prompt=run_prompt, names_filter=[hook_name])
        value = cache[hook_name].float()
        if value.dim() == 2:  # pooled: one row per image
            means.append(value if batched else value.mean(0, keepdim=True))
            continue
        mask = prompt_positions(cache.layout, hook_name, read_positions).to(value.device)
        if batched:  # one row per image
            counts = mask.sum(1, keepdim=True)
            if (counts == 0).any():
                raise ValueError(f"read_positions {describe_positions(read_positions)} select nothing in some image")
            means.append(torch.einsum("bp,bp...->b...", mask.float() / counts, value))
        else:  # rows are tiles (LLaVA-OneVision) or one packed sequence (Qwen2-VL): all of them are this input
            means.append(value[mask].mean(0, keepdim=True))
    return torch.cat(means).cpu()


# ---------------------------------------------------------------------------------------------------------------
# SAE feature clamping.


@dataclass
class FeatureClamp:
    """Sets feature ``feature`` of the SAE spliced at ``hook_name`` to ``value`` at ``positions``.

    The SAE must be spliced in with its error term (``model.add_sae(sae, use_error_term=True)``): the spliced
    output is then the original activation plus ``(value - current) * W_dec[feature]`` at the chosen
    positions, and exactly the original everywhere else. The hook sits on ``<hook_name>.hook_sae_acts_post``.
    """

    hook_name: str
    feature: int
    value: float
    positions: Positions = "all"

    def __post_init__(self):
        self.positions = _check_positions(self.hook_name, self.positions)

    @classmethod
    def from_sae(cls, sae: Any, feature: int, value: float, *, positions: Positions = "all") -> FeatureClamp:
        from hooked_vlm.sae.splice import output_hook_name

        return cls(output_hook_name(sae), feature, value, positions)  # a transcoder's features: its output hook

    @property
    def label(self) -> str:
        return f"{self.hook_name} feature {self.feature}"

    def replace(self, **changes: Any) -> FeatureClamp:
        return dataclasses.replace(self, **changes)

    def at(self, strength: float) -> FeatureClamp:
        """The same clamp to value ``strength`` (what :func:`sweep` varies)."""
        return self.replace(value=float(strength))

    def fwd_hook(self, model: HookedVLM) -> tuple[str, Callable]:
        name = f"{self.hook_name}.hook_sae_acts_post"
        if name not in model.hook_dict:
            raise ValueError(
                f"no SAE is spliced at {self.hook_name!r} ({name!r} is not a hook point); splice it first with "
                "model.add_sae(sae, use_error_term=True)"
            )
        feature, value, positions, hook_name = self.feature, self.value, self.positions, self.hook_name

        def clamp(acts: Tensor, hook) -> Tensor:
            where = _where(model, hook_name, positions, acts, 1)
            if where is False:
                return acts
            clamped = acts.clone()
            target = torch.full_like(acts[..., feature], value)
            clamped[..., feature] = target if where is True else torch.where(where[..., 0], target, acts[..., feature])
            return clamped

        return name, clamp


# ---------------------------------------------------------------------------------------------------------------
# Applying.


def steering_hooks(model: HookedVLM, interventions: Intervention | Iterable[Intervention]) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` for ``run_with_hooks`` / ``hooks()`` applying ``interventions`` (in order)."""
    if hasattr(interventions, "fwd_hook"):
        interventions = [interventions]
    return [intervention.fwd_hook(model) for intervention in interventions]


@contextmanager
def steer(model: HookedVLM, interventions: Intervention | Iterable[Intervention]):
    """Apply steering vectors and feature clamps to every run inside the block, ``generate`` included.

    Hooks attached later (e.g. by ``run_with_cache`` inside the block) see the steered values.
    """
    with model.hooks(fwd_hooks=steering_hooks(model, interventions)):
        yield model


# ---------------------------------------------------------------------------------------------------------------
# Sweeps.


@dataclass
class SweepResult:
    """One row per (vector, scale, batch row): ``label``, ``hook_name``, ``scale``, ``batch``, ``readout``, ``text``."""

    rows: list[dict[str, Any]]
    readout_name: str | None = None
    #: what the scale column is: a vector's scale, or the value a feature is clamped to
    scale_name: str = "steering scale"

    def labels(self) -> list[str]:
        return list(dict.fromkeys(row["label"] for row in self.rows))

    def scales(self) -> list[float]:
        return list(dict.fromkeys(row["scale"] for row in self.rows))

    def to_markdown(self) -> str:
        columns = [c for c in ("label", "scale", "batch", "readout", "text") if any(row.get(c) is not None for row in self.rows)]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
        return "\n".join(lines) + "\n"

    def texts_side_by_side(self) -> str:
        """Generated texts as a markdown table: one row per scale, one column per vector (and batch row)."""
        keys = list(dict.fromkeys((row["label"], row["batch"]) for row in self.rows if row.get("text") is not None))
        if not keys:
            raise ValueError("this sweep generated no text (pass generate_kwargs)")
        several = len({b for _, b in keys}) > 1
        header = [f"{label} [{b}]" if several else label for label, b in keys]
        lines = [f"| {self.scale_name} | " + " | ".join(header) + " |", "|---|" + "---|" * len(keys)]
        texts = {(row["label"], row["batch"], row["scale"]): row.get("text") for row in self.rows}
        for scale in self.scales():
            lines.append(f"| {scale:g} | " + " | ".join(_cell(texts.get((*key, scale))) for key in keys) + " |")
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path, stem: str = "sweep") -> list[Path]:
        """Write ``<stem>.md`` (the table), ``<stem>_texts.md`` (texts side by side) and ``<stem>.png`` (the plot)
        where the sweep has them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / f"{stem}.md"]
        written[0].write_text(self.to_markdown())
        if any(row.get("text") is not None for row in self.rows):
            written.append(folder / f"{stem}_texts.md")
            written[-1].write_text(self.texts_side_by_side())
        if any(row.get("readout") is not None for row in self.rows):
            written.append(folder / f"{stem}.png")
            self.plot(written[-1])
        return written

    def plot(self, path: str | Path, title: str | None = None) -> Figure:
        """Readout against scale, one line per vector (the mean over batch rows; the band spans their range)."""
        fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        for label in self.labels():
            rows = [row for row in self.rows if row["label"] == label and row.get("readout") is not None]
            scales = sorted({row["scale"] for row in rows})
            values = [[row["readout"] for row in rows if row["scale"] == s] for s in scales]
            means = [sum(v) / len(v) for v in values]
            (line,) = ax.plot(scales, means, marker="o", label=label)
            if any(len(v) > 1 for v in values):
                ax.fill_between(scales, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
        ax.set_xlabel(self.scale_name)
        ax.set_ylabel(self.readout_name or "readout")
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or f"{self.readout_name or 'readout'} vs {self.scale_name}")
        return _save(fig, path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", "⏎")


def sweep(
    model: HookedVLM,
    inputs: Any,
    vectors: Intervention | Sequence[Intervention],
    scales: Sequence[float],
    *,
    hook_names: Sequence[str] | None = None,
    readout: Any = None,
    prompt: Any = None,
    text: Any = None,
    generate_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every vector at every scale on ``inputs`` and record a readout and/or generated text.

    ``vectors`` are steering vectors (``scales`` set their scale) or feature clamps (``scales`` are the values
    the feature is clamped to). ``hook_names`` re-targets each vector to each of those hooks (a layer sweep
    of one direction); without it, pass one vector per layer (e.g. a mean difference computed at each
    layer). ``readout`` is a :mod:`hooked_vlm.readouts` readout (``readout(output, cache) -> [batch]``,
    reading ``readout.hook_names``); ``generate_kwargs`` (e.g. ``{"max_new_tokens": 20}``) also generates from
    the prompt at every grid point. Include scale 0 for the unsteered baseline (a zero vector leaves the run
    bit-identical). Runs without gradients.
    """
    if readout is None and generate_kwargs is None:
        raise ValueError("nothing to record: pass readout= and/or generate_kwargs=")
    vectors = [vectors] if hasattr(vectors, "fwd_hook") else list(vectors)
    if hook_names is not None:
        vectors = [v.replace(hook_name=h) for v in vectors for h in hook_names]
    labels = [v.label for v in vectors]
    if len(set(labels)) < len(labels):  # several vectors at one hook: number them
        labels = [f"{i}: {label}" for i, label in enumerate(labels)]
    prepared = model.prepare_inputs(inputs, prompt=prompt, text=text)
    names = list(getattr(readout, "hook_names", ()))
    rows = []
    grid = [(label, v, s) for label, v in zip(labels, vectors, strict=True) for s in scales]
    for label, vector, scale in tqdm(grid, disable=not progress, desc="steering sweep"):
        values, texts = None, None
        with torch.no_grad(), steer(model, vector.at(scale)):
            if readout is not None:
                output, cache = model.run_with_cache(prepared, names_filter=names, stop_early=False)
                values = readout(output, cache).detach().float().cpu().tolist()
            if generate_kwargs is not None:
                texts = model.generate(prepared, **generate_kwargs).text
        n = len(values if values is not None else texts)
        for b in range(n):
            rows.append(
                {
                    "label": label, "hook_name": vector.hook_name, "scale": float(scale), "batch": b,
                    "readout": None if values is None else values[b], "text": None if texts is None else texts[b],
                }
            )
    name = None if readout is None else repr(readout)
    clamps = all(isinstance(v, FeatureClamp) for v in vectors)
    return SweepResult(rows, name, "clamped feature value" if clamps else "steering scale")
