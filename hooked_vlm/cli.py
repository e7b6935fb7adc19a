"""``hooked-vlm``: the command line.

    hooked-vlm inspect [MODEL] [--image PATH] [--out DIR] [--device cpu|cuda] [--dtype ...] [--verbose]
    hooked-vlm hooks [MODEL] [--markdown] [--collapse]

``inspect`` writes the Phase 0 report of a model (hook names and shapes for one image, heads per tower, the
projector / projection structure, an image → embeddings flow diagram) as markdown and PNG. ``hooks`` lists every
canonical hook name with its shape and meaning.

MODEL is a Hugging Face hub id or local folder, ``open_clip:ARCH/PRETRAINED``, or ``tiny:NAME``, a tiny
random-weight model of ``hooked_vlm.testing.TINY_MODELS`` (the default, ``tiny:clip``, runs on a fresh machine
with no downloads). ``hooks`` also takes ``config:NAME``, a shipped checkpoint config built on the meta device:
real-size shapes without weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from hooked_vlm.adapter import Prepared
from hooked_vlm.cache import ActivationCache
from hooked_vlm.inputs import load_images
from hooked_vlm.model import HookedVLM, check_device
from hooked_vlm.names import block_parts, describe_hook
from hooked_vlm.plotting import flow_diagram, flow_stages, positions_summary
from hooked_vlm.taps import current_device
from hooked_vlm.testing import TINY_MODELS, meta_model, sample_image

DEFAULT_MODEL = "tiny:clip"
#: what a VLM is asked, and what a two-tower model's text tower reads, so that one run reaches every hook
DEFAULT_PROMPT = "Describe the image."
DEFAULT_CAPTION = "a photo of the sky over a field"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """A mistake in what was asked for (model, image, device): reported as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Models and example runs (shared with the examples).


def load_model(spec: str | None = None, device: str | None = None, dtype: torch.dtype | None = None) -> HookedVLM:
    """A :class:`HookedVLM` from a model spec: hub id / folder, ``open_clip:ARCH/TAG``, ``tiny:NAME``, ``config:NAME``.

    ``device`` defaults to CUDA when there is one, else the CPU; ``config:`` models live on the meta device.
    """
    spec = spec or DEFAULT_MODEL
    scheme, _, name = spec.partition(":")
    if scheme == "config":
        return HookedVLM.from_hf(meta_model(name))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if scheme == "tiny":
        if name not in TINY_MODELS:
            raise ValueError(f"unknown tiny model {spec!r}; available: {', '.join('tiny:' + n for n in TINY_MODELS)}")
        check_device(device, explicit=True)
        model, processor = TINY_MODELS[name]()
        return HookedVLM.from_hf(model.to(device=device, dtype=dtype), processor)
    # A path that is not there would otherwise be tried as a hub id, after network timeouts when offline.
    if spec.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(spec)):
        raise FileNotFoundError(f"model folder not found: {spec}")
    return HookedVLM.from_pretrained(os.path.expanduser(spec), device=device, dtype=dtype)


def default_text(model: HookedVLM, prompt: str | None = None, caption: str | None = None) -> dict[str, Any]:
    """``prompt=`` for a model with a language model, ``text=`` for one with a text tower (CLIP), so that one
    run on an image reaches every hook point."""
    towers = {info.name for info in model.adapter.towers()}
    text: dict[str, Any] = {}
    if "lm" in towers:
        text["prompt"] = prompt or DEFAULT_PROMPT
    if "text" in towers:
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


def _table(rows: list[dict[str, str]], columns: Sequence[str], markdown: bool) -> str:
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
    return _table(rows, ["tower", "blocks", "d_model", "heads", "kv heads", "d_head", "d_mlp"], markdown=True)


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
    parts += ["", f"## Hook points ({len(model.hook_names())})", "", _table(hook_rows(model, cache), columns, True), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Commands.


def _load(spec: str | None, device: str | None = None, dtype: str | None = None) -> HookedVLM:
    try:
        return load_model(spec, device=device, dtype=DTYPES[dtype] if dtype else None)
    except KeyError as error:  # str() of a KeyError is its repr
        raise CLIError(error.args[0]) from error
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise CLIError(str(error)) from error


def _image(path: str | None) -> Image.Image:
    if path is None:
        return sample_image()
    if not os.path.isfile(path):
        raise CLIError(f"image file not found: {path}")
    try:
        return load_images(path)[0]
    except OSError as error:
        raise CLIError(f"cannot read {path} as an image: {error}") from error


def cmd_inspect(args: argparse.Namespace) -> int:
    spec = args.model or DEFAULT_MODEL
    if spec.startswith("config:"):
        raise CLIError(f"{spec} has no weights (meta device) to run an image through; `hooked-vlm hooks {spec}` lists its shapes")
    image = _image(args.image)  # before the model: a bad path should not wait for a download
    out = Path(args.out)
    with tqdm(total=4, desc="inspect", unit="step", file=sys.stderr) as progress:
        progress.set_postfix_str("load model")
        model = _load(spec, args.device, args.dtype)
        progress.update()
        progress.set_postfix_str("run one image")
        prepared = model.prepare_inputs(image, **default_text(model, args.prompt, args.caption))
        cache = record_shapes(model, prepared)
        progress.update()
        progress.set_postfix_str("flow diagram")
        flow_diagram(model, cache, out / "flow.png", image=image, inputs=prepared.kwargs, title=f"{spec}: image → embeddings")
        progress.update()
        progress.set_postfix_str("report")
        report = inspect_report(model, spec, cache, prepared, image, "flow.png", verbose=args.verbose)
        (out / "report.md").write_text(report)
        progress.update()
    print(report)
    print(f"wrote {out / 'report.md'} and {out / 'flow.png'}", file=sys.stderr)
    return 0


def _meta_shapes(model: HookedVLM) -> ActivationCache | None:
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


def cmd_hooks(args: argparse.Namespace) -> int:
    model = _load(args.model, args.device, args.dtype)
    if args.model and args.model.startswith("config:"):
        cache = _meta_shapes(model)
    else:
        cache = record_shapes(model, model.prepare_inputs(sample_image(), **default_text(model)))
    rows = hook_rows(model, cache, collapse=args.collapse)
    print(_table(rows, ["name", "shape", "convention", "meaning"], markdown=args.markdown))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-vlm", description="Hook points of vision(-language) models.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_model_options(command: argparse.ArgumentParser, model_help: str) -> None:
        command.add_argument("model", nargs="?", default=None, metavar="MODEL", help=model_help)
        command.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
        command.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")

    inspect = commands.add_parser("inspect", help="write the Phase 0 report of a model (markdown + flow diagram PNG)")
    add_model_options(inspect, f"hub id, local folder, open_clip:ARCH/TAG or tiny:NAME (default {DEFAULT_MODEL})")
    inspect.add_argument("--image", help="image file (default: a drawn sample image)")
    inspect.add_argument("--out", default="out/inspect", help="output folder (default: out/inspect)")
    inspect.add_argument("--prompt", help=f"prompt for a VLM (default: {DEFAULT_PROMPT!r})")
    inspect.add_argument("--caption", help=f"caption for CLIP's text tower (default: {DEFAULT_CAPTION!r})")
    inspect.add_argument("--verbose", action="store_true", help="also say which module boundary each hook sits on")
    inspect.set_defaults(run=cmd_inspect)

    hooks = commands.add_parser("hooks", help="list every canonical hook name with its shape and meaning")
    add_model_options(hooks, f"as for inspect, or config:NAME, a shipped config on the meta device (default {DEFAULT_MODEL})")
    hooks.add_argument("--markdown", action="store_true", help="print a markdown table (doc/hook_reference.md)")
    hooks.add_argument("--collapse", action="store_true", help="one row per per-block name: vision.blocks.{0..23}.…")
    hooks.set_defaults(run=cmd_hooks)

    from hooked_vlm.sae.cli import add_commands  # here, not at the top: hooked_vlm.sae.cli imports this module

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CLIError as error:
        print(f"hooked-vlm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
