"""The Phase 0 report of a model (``hooked-vlm inspect`` / ``hooked-vlm hooks``): shapes of every hook point for
one input, hook tables, tower and projector facts, as markdown.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from hooked_vlm.adapter import Prepared
from hooked_vlm.cache import ActivationCache
from hooked_vlm.loading import DEFAULT_CAPTION, DEFAULT_PROMPT
from hooked_vlm.model import HookedVLM
from hooked_vlm.names import block_parts, describe_hook
from hooked_vlm.plotting import flow_stages, positions_summary
from hooked_vlm.taps import current_device


def default_text(model: HookedVLM, prompt: str | None = None, caption: str | None = None) -> dict[str, Any]:
    """``prompt=`` for a model with a language model, ``text=`` for one with a text tower (CLIP), so that one
    run on an image reaches every hook point."""
    text: dict[str, Any] = {}
    if model.adapter.has_language_model:
        text["prompt"] = prompt or DEFAULT_PROMPT
    if model.adapter.has_text_tower:
        text["text"] = [caption or DEFAULT_CAPTION]
    return text


def record_shapes(model: HookedVLM, prepared: Prepared) -> ActivationCache:
    """One forward with every hook point attached, keeping only each activation's shape and dtype (meta tensors).

    A report needs shapes, and a full cache of a real VLM (every attention pattern of every layer) would not fit
    in memory; meta tensors keep the :class:`ActivationCache` interface (and its layout) at no cost.
    """
    shapes: dict[str, torch.Tensor] = {}

    def record(tensor: torch.Tensor, hook) -> None:
        shapes[hook.name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    with torch.no_grad():
        model.run_with_hooks(prepared, fwd_hooks=[(lambda name: True, record)])
    return ActivationCache(shapes, prepared.layout)


# ---------------------------------------------------------------------------------------------------------------
# Report pieces.


def _shape(cache: ActivationCache | None, name: str) -> str:
    if cache is None:
        return "?"
    return str(list(cache[name].shape)) if name in cache else "— (not reached by this input)"


def hook_rows(model: HookedVLM, cache: ActivationCache | None, collapse: bool = False) -> list[dict[str, str]]:
    """One row per hook name: ``name``, ``shape``, ``convention``, ``meaning``, ``where`` (its module boundary).

    With ``collapse``, the blocks of a tower share one row per per-block name (``vision.blocks.{0..23}.attn.hook_z``,
    the shapes of all of them, ``where`` left out).
    """
    groups: dict[str, list[str]] = {}
    for name in model.hook_names():
        block = block_parts(name) if collapse else None
        groups.setdefault(f"{block[0]}.blocks.{{i}}.{block[2]}" if block else name, []).append(name)
    rows = []
    for key, names in groups.items():
        convention, meaning = describe_hook(names[0])
        if key != names[0]:  # a collapsed per-block name
            first, last = block_parts(names[0])[1], block_parts(names[-1])[1]
            key, where = key.replace("{i}", f"{{{first}..{last}}}"), "(per block)"
        else:
            where = model.hook_point(key).tap.describe()
        shape = " / ".join(dict.fromkeys(_shape(cache, name) for name in names))
        rows.append({"name": key, "shape": shape, "convention": convention, "meaning": meaning, "where": where})
    return rows


def table(rows: list[dict[str, str]], columns: Sequence[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(f"`{row[c]}`" if c == "name" else row[c] for c in columns) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[c]) for row in rows)) for c in columns[:-1]]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns[:-1], widths, strict=True)) + "  " + columns[-1]]
    lines += ["  ".join(row[c].ljust(w) for c, w in zip(columns[:-1], widths, strict=True)) + "  " + row[columns[-1]]
              for row in rows]
    return "\n".join(lines)


def _model_facts(model: HookedVLM, spec: str) -> list[str]:
    parameters = list(model.raw_model.parameters())
    dtype = next((p.dtype for p in parameters if p.is_floating_point()), None)
    return [
        f"- model: `{spec}`",
        f"- family: {model.adapter.family} (`{type(model.raw_model).__name__}`)",
        f"- device / dtype: {current_device(model.raw_model)} / {str(dtype).removeprefix('torch.')}",
        f"- parameters: {sum(p.numel() for p in parameters):,}",
        f"- hook points: {len(model.hook_names())}",
    ]


def _towers_table(model: HookedVLM) -> str:
    rows = [
        {"tower": t.name, "blocks": str(t.n_layers), "d_model": str(t.d_model), "heads": str(t.n_heads),
         "kv heads": str(t.n_kv_heads or t.n_heads), "d_head": str(t.d_head), "d_mlp": str(t.d_mlp or "—")}
        for t in model.adapter.towers()
    ]
    return table(rows, ["tower", "blocks", "d_model", "heads", "kv heads", "d_head", "d_mlp"], markdown=True)


def inspect_report(
    model: HookedVLM, spec: str, cache: ActivationCache, prepared: Prepared, image: Image.Image, flow_png: str,
    verbose: bool = False,
) -> str:
    """The Phase 0 report of one model, as markdown."""
    parts = [f"# Phase 0 report: {spec}", "", *_model_facts(model, spec), "", "## Inputs", ""]
    parts += [f"- image: {image.width}×{image.height} px"]
    parts += [f"- `{key}`: {list(value.shape)}" for key, value in prepared.kwargs.items() if isinstance(value, torch.Tensor)]
    parts += ["", "## Towers (attention heads)", "", _towers_table(model), "", "## Projector / projection", ""]
    parts += [f"- {key}: {value}" for key, value in model.adapter.describe().items()] or ["- (nothing reported)"]
    parts += ["", "## Token layout", ""]
    parts += [f"- `{key}` {list(tower.shape)}: {positions_summary(tower)}" + "".join(f"; {note}" for note in tower.notes)
              for key, tower in cache.layout.towers.items()]
    parts += ["", "## Image → embeddings", "", f"![flow diagram]({flow_png})", ""]
    parts += [f"{i}. **{stage.title}** — {'; '.join(stage.lines)}"
              for i, stage in enumerate(flow_stages(model, cache, image, prepared.kwargs), start=1)]
    columns = ["name", "shape", "meaning", "where"] if verbose else ["name", "shape", "meaning"]
    parts += ["", f"## Hook points ({len(model.hook_names())})", "", table(hook_rows(model, cache), columns, True), ""]
    return "\n".join(parts)


def meta_shapes(model: HookedVLM) -> ActivationCache | None:
    """Shapes from one forward of a meta-device model on its adapter's example inputs; ``None`` (names and
    meanings are still worth listing) where the adapter builds none or its forward cannot run on meta tensors."""
    inputs = model.adapter.example_inputs()
    if inputs is None:
        print(f"note: the {model.adapter.family} adapter builds no example inputs; shapes are unknown", file=sys.stderr)
        return None
    try:
        return record_shapes(model, model.prepare_inputs(inputs))
    except Exception as error:  # e.g. a forward that reads tensor values, which meta tensors do not have
        print(f"note: no shapes, the forward on the meta device failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None
