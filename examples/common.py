"""The plumbing every example shares: the standard options, loading the model they name, and the ✓/✗ checklist.

    from common import Checklist, load, parser   # works when a script runs: its own folder is on sys.path

Only plumbing lives here; each script's steps stay in the script, to be read top to bottom.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hooked_vlm import HookedVLM
from hooked_vlm.cli import DTYPES, load_model


def parser(doc: str, default_model: str, default_out: str, image: bool | str = True,
           model_help: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """``--model``, ``--image`` (a string is its help; False leaves it out), ``--device``, ``--dtype`` and ``--out``
    (parsed to a :class:`Path`); the description is the first paragraph of ``doc``, the script's docstring.
    A script adds its own options to what this returns."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default=default_model,
                        help=model_help or f"hub id, open_clip:ARCH/TAG or tiny:NAME (default {default_model})")  # fmt: skip
    if image:
        image_help = image if isinstance(image, str) else "image file (default: a drawn sample image)"
        parser.add_argument("--image", help=image_help)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    return parser


def load(args: argparse.Namespace) -> HookedVLM:
    """The model ``--model`` names, on ``--device`` in ``--dtype``, through :func:`hooked_vlm.cli.load_model`."""
    return load_model(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


class Checklist:
    """The items a run checks: calling it (or :meth:`check`) records one and prints it as a ✓/✗ line,
    :meth:`summary` lists them all at the end. The scripts name it ``check``: ``check(ok, "what was checked")``."""

    def __init__(self) -> None:
        self.items: list[tuple[bool, str]] = []

    def check(self, ok: bool, item: str) -> None:
        self.items.append((ok, item))
        print(f"{mark(ok)} {item}\n")

    __call__ = check

    @property
    def passed(self) -> int:
        return sum(ok for ok, _ in self.items)

    @property
    def exit_code(self) -> int:
        """0 when every item holds, else 1."""
        return 0 if all(ok for ok, _ in self.items) else 1

    def summary(self, title: str) -> int:
        """Print ``title`` and every item under it; returns :attr:`exit_code`."""
        print(title)
        for ok, item in self.items:
            print(f"  {mark(ok)} {item}")
        return self.exit_code
