"""Compiled harvesting: the part of one tower a harvest needs, run through ``torch.compile`` with the hooks inside.

An eager forward leaves speed on the table at harvest scale (CLIP ViT-L/14 in HF sdpa runs at about half of
what its matrix work allows on an H100: unfused layer norms, GELUs and residual adds). A harvest only needs
one tower up to its deepest requested block, so :class:`CompiledHarvest`

1. truncates the tower's block list after the deepest requested block (nothing later is computed),
2. installs the taps of the requested hook points once, for its whole lifetime (so ``torch.compile`` traces
   them into the graph instead of meeting new hooks every call), and
3. compiles the tower's forward once; each call returns the captured activations.

It compiles once per input shape: a batch smaller than the first one (the short last batch of a harvest) is
padded to the first one's size by repeating its last image, and the padding rows are dropped from what it
returns, so the end of a harvest costs no recompile (``dynamic=False``: no shape-generic second graph either). The
first call logs what compiling cost (``hooked_vlm.compiled`` logger, INFO; also :attr:`CompiledHarvest.compile_s`):
compiled pays off once ``compile_s`` is made up by the per-batch saving, i.e. for long harvests, not for a few
thousand images.

Use it as a context manager: the model is truncated and tapped only inside the ``with`` block.

>>> with CompiledHarvest(model, ["vision.blocks.22.hook_resid_post"]) as harvest:
...     for images in loader:
...         acts = harvest(images)["vision.blocks.22.hook_resid_post"]
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hooked_vlm.adapter import Prepared
from hooked_vlm.cache import Slicer
from hooked_vlm.layout import Selector
from hooked_vlm.taps import BoundHookPoint, Run, install_taps, remove_all

_BLOCK = re.compile(r"^(?P<tower>[a-z_]+)\.blocks\.(?P<index>\d+)\.")
_log = logging.getLogger(__name__)


class CompiledHarvest:
    """Activations of hook points of one tower from a truncated, compiled forward (see the module docstring).

    ``compile_kwargs`` go to ``torch.compile`` (default ``mode="max-autotune-no-cudagraphs"``: CUDA graphs would
    reuse output buffers between calls, so captured activations would be overwritten; pass
    ``backend="eager"`` to check the plumbing without compiling). ``attention_backends`` orders the
    scaled-dot-product-attention kernels to try (``torch.nn.attention.SDPBackend``; the first that supports the
    inputs runs), for the compiled trace and every call; ``None`` keeps PyTorch's choice.
    """

    def __init__(self, model, names, *, compile_kwargs: dict[str, Any] | None = None,
                 attention_backends: Sequence[SDPBackend] | None = None):
        self.model = model
        self.attention_backends = list(attention_backends) if attention_backends is not None else None
        self.hook_points: list[BoundHookPoint] = model.resolve_names(names)
        towers = {hp.name.split(".", 1)[0] for hp in self.hook_points}
        if len(towers) != 1:
            raise ValueError(f"a compiled harvest reads one tower; these hooks span {sorted(towers)}")
        self.tower = towers.pop()
        self.keep = self._blocks_needed(model)
        self.compile_kwargs = {"mode": "max-autotune-no-cudagraphs", "dynamic": False, **(compile_kwargs or {})}
        #: the batch size compiled for (the first call's), and the first call's seconds (compiling included)
        self.batch: int | None = None
        self.compile_s: float | None = None
        self._store: dict[str, Tensor] = {}
        self._handles: list = []
        self._restore: tuple[nn.Module, str, nn.Module] | None = None
        self._compiled = None

    def _blocks_needed(self, model) -> int | None:
        """How many blocks of the tower the hooks need (``None``: all, for hooks after the blocks)."""
        first_block = model.hook_dict.get(f"{self.tower}.blocks.0.hook_resid_pre")
        needed = 0
        for hp in self.hook_points:
            match = _BLOCK.match(hp.name)
            if match:
                needed = max(needed, int(match["index"]) + 1)
            elif first_block is None or hp.order > first_block.order:  # pooling, projection: after every block
                return None
        return needed

    def __enter__(self) -> CompiledHarvest:
        adapter, raw = self.model.adapter, self.model.raw_model
        if self.keep is not None:
            path = adapter.block_list(self.tower)
            parent_path, _, attribute = path.rpartition(".")
            parent = raw.get_submodule(parent_path) if parent_path else raw
            blocks = getattr(parent, attribute)
            self._restore = (parent, attribute, blocks)
            setattr(parent, attribute, nn.ModuleList(list(blocks)[: self.keep]))
        try:
            run = Run(self.hook_points, stop_early=False, observers=dict.fromkeys(self.hook_points, self._capture))
            self._handles = install_taps(raw, self.hook_points, run)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._compiled = torch.compile(self._tower_forward, **self.compile_kwargs)
        return self

    def _tower_forward(self, prepared: Any) -> Any:
        if self.attention_backends is None:
            return self.model.adapter.tower_forward(self.tower, prepared)
        # inside the compiled function, so that the kernel choice is traced (and guarded) per harvest: compiled
        # code is shared between harvests whose guards pass, and a context around the call would not be seen
        with sdpa_kernel(self.attention_backends, set_priority=True):
            return self.model.adapter.tower_forward(self.tower, prepared)

    def __exit__(self, *exc) -> None:
        remove_all(self._handles)
        self._handles = []
        if self._restore is not None:
            parent, attribute, blocks = self._restore
            setattr(parent, attribute, blocks)
            self._restore = None
        self._compiled = None

    def _padded(self, prepared: Any) -> tuple[Any, int | None]:
        """``prepared`` padded to the compiled batch size (repeating the last image) and its own batch size, or
        ``prepared`` and ``None`` when it needs no padding (or is no plain batch of images: every input tensor's
        first axis the batch)."""
        tensors = [v for v in prepared.kwargs.values() if isinstance(v, Tensor)]
        sizes = {t.shape[0] for t in tensors if t.dim() > 0}
        if len(sizes) != 1:
            return prepared, None
        n = sizes.pop()
        if self.batch is None:
            self.batch = n
        if n >= self.batch:
            return prepared, None
        missing = self.batch - n
        padded = {key: torch.cat([v, v[-1:].expand(missing, *v.shape[1:])]) if isinstance(v, Tensor) else v
                  for key, v in prepared.kwargs.items()}
        return Prepared(padded, lambda: prepared.layout), n

    def _capture(self, tensor: Tensor, hook: BoundHookPoint) -> None:
        self._store[hook.name] = tensor

    @torch.no_grad()
    def __call__(self, inputs: Any, *, positions: Selector | None = None, **kwargs) -> dict[str, Tensor]:
        """The requested activations for ``inputs`` (anything ``run_with_cache`` takes); ``positions`` selects
        positions as in ``run_with_cache``."""
        if self._compiled is None:
            raise RuntimeError("use CompiledHarvest as a context manager: `with CompiledHarvest(...) as harvest:`")
        prepared = self.model.prepare_inputs(inputs, **kwargs)
        run, n = self._padded(prepared)
        self._store.clear()  # the same dict every call: compiled code guards on the objects it writes to
        first = self.compile_s is None
        started = time.perf_counter()
        self._compiled(run)
        if first:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.compile_s = time.perf_counter() - started
            _log.info("compiled harvest of %s (%s blocks, batch %s): first call %.1f s, compiling included; it pays "
                      "off once the per-batch saving over eager has made that up", self.tower,
                      "all" if self.keep is None else self.keep, self.batch, self.compile_s)
        captured = dict(self._store) if n is None else {name: t[:n] for name, t in self._store.items()}
        if positions is None:
            return captured
        sliced = Slicer(prepared, positions, None)
        return {name: sliced(name, tensor) for name, tensor in captured.items()}
