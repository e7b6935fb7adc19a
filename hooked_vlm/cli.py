"""``hooked-vlm``: the command line.

    hooked-vlm inspect [MODEL] [--image PATH] [--out DIR] [--device cpu|cuda] [--dtype ...] [--verbose]
    hooked-vlm hooks [MODEL] [--markdown] [--collapse]
    hooked-vlm harvest | train-sae | aesthetic-features ...   (Phase 1, :mod:`hooked_vlm.sae.cli`)

``inspect`` writes the Phase 0 report of a model (hook names and shapes for one image, heads per tower, the
projector / projection structure, an image → embeddings flow diagram) as markdown and PNG. ``hooks`` lists every
canonical hook name with its shape and meaning.

MODEL is a Hugging Face hub id or local folder, ``open_clip:ARCH/PRETRAINED``, or ``tiny:NAME``, a tiny
random-weight model of ``hooked_vlm.testing.TINY_MODELS`` (the default, ``tiny:clip``, runs on a fresh machine
with no downloads). ``hooks`` also takes ``config:NAME``, a shipped checkpoint config built on the meta device:
real-size shapes without weights.
"""

from __future__ import annotations

# Nothing heavy at import time: `hooked-vlm --help` must answer in about a second, so torch, transformers, PIL,
# matplotlib and the model code are imported inside the command functions.
import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any

from hooked_vlm.loading import DEFAULT_CAPTION, DEFAULT_MODEL, DEFAULT_PROMPT, load_model

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from hooked_vlm.model import HookedVLM


class _DTypes(Mapping):
    """``--dtype`` names → torch dtypes, resolved on first lookup (the names alone build the parser)."""

    _names = ("bfloat16", "float16", "float32")

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in self._names:
            raise KeyError(f"unknown dtype {name!r}; choose one of {', '.join(self._names)}")
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


DTYPES = _DTypes()


class CLIError(Exception):
    """A mistake in what was asked for (model, image, device): reported as one line, without a traceback."""


#: library names that lived here before hooked_vlm.report / hooked_vlm.loading (kept importable from here)
_MOVED = {
    name: "hooked_vlm.report"
    for name in (
        "default_text",
        "record_shapes",
        "hook_rows",
        "inspect_report",
        "meta_shapes",
        "table",
    )
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Commands.


def load_for_command(spec: str | None, device: str | None = None, dtype: str | None = None) -> HookedVLM:
    """The model a command names (``--dtype`` as a name), with loading mistakes as a one-line :class:`CLIError`."""
    try:
        return load_model(spec, device=device, dtype=DTYPES[dtype] if dtype else None)
    except KeyError as error:  # str() of a KeyError is its repr
        raise CLIError(error.args[0]) from error
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise CLIError(str(error)) from error


def _image(path: str | None) -> Image.Image:
    from hooked_vlm.inputs import load_images
    from hooked_vlm.testing import sample_image

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
        raise CLIError(
            f"{spec} has no weights (meta device) to run an image through; `hooked-vlm hooks {spec}` lists its shapes"
        )
    from pathlib import Path

    from tqdm import tqdm

    from hooked_vlm.plotting import flow_diagram
    from hooked_vlm.report import default_text, inspect_report, record_shapes

    image = _image(args.image)  # before the model: a bad path should not wait for a download
    out = Path(args.out)
    with tqdm(total=4, desc="inspect", unit="step", file=sys.stderr) as progress:
        progress.set_postfix_str("load model")
        model = load_for_command(spec, args.device, args.dtype)
        progress.update()
        progress.set_postfix_str("run one image")
        prepared = model.prepare_inputs(image, **default_text(model, args.prompt, args.caption))
        cache = record_shapes(model, prepared)
        progress.update()
        progress.set_postfix_str("flow diagram")
        flow_diagram(
            model, cache, out / "flow.png", image=image, inputs=prepared.kwargs, title=f"{spec}: image → embeddings"
        )
        progress.update()
        progress.set_postfix_str("report")
        report = inspect_report(model, spec, cache, prepared, image, "flow.png", verbose=args.verbose)
        (out / "report.md").write_text(report)
        progress.update()
    print(report)
    print(f"wrote {out / 'report.md'} and {out / 'flow.png'}", file=sys.stderr)
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from hooked_vlm.report import default_text, hook_rows, meta_shapes, record_shapes, table
    from hooked_vlm.testing import sample_image

    model = load_for_command(args.model, args.device, args.dtype)
    if args.model and args.model.startswith("config:"):
        cache = meta_shapes(model)
    else:
        cache = record_shapes(model, model.prepare_inputs(sample_image(), **default_text(model)))
    rows = hook_rows(model, cache, collapse=args.collapse)
    print(table(rows, ["name", "shape", "convention", "meaning"], markdown=args.markdown))
    return 0


def build_parser(prog: str = "hooked-vlm") -> argparse.ArgumentParser:
    """The parser of every command: ``inspect`` and ``hooks`` here, the Phase 1 commands from
    :func:`hooked_vlm.sae.cli.add_commands` (each module adds its own sub-commands)."""
    parser = argparse.ArgumentParser(prog=prog, description="Hook points of vision(-language) models.")
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
    add_model_options(
        hooks, f"as for inspect, or config:NAME, a shipped config on the meta device (default {DEFAULT_MODEL})"
    )
    hooks.add_argument("--markdown", action="store_true", help="print a markdown table (doc/hook_reference.md)")
    hooks.add_argument("--collapse", action="store_true", help="one row per per-block name: vision.blocks.{0..23}.…")
    hooks.set_defaults(run=cmd_hooks)

    from hooked_vlm.sae.cli import add_commands  # here, not at the top: hooked_vlm.sae.cli imports this module

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "hooked-vlm") -> int:
    """The one entry point: ``hooked-vlm`` and ``python -m hooked_vlm.sae`` (``prog`` names it in help and usage)."""
    args = build_parser(prog).parse_args(argv)
    try:
        return args.run(args)
    except CLIError as error:
        print(f"hooked-vlm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
