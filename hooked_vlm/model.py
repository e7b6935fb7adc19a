"""HookedVLM: a TransformerLens ``HookedRootModule`` around an unmodified Hugging Face / open_clip model."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import operator
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from hooked_vlm.adapter import Adapter, Prepared
from hooked_vlm.cache import QUERY_HEAD_HOOKS, ActivationCache, HostCopies, Slicer, leaf, stash
from hooked_vlm.head_results import with_head_results
from hooked_vlm.layout import Selector
from hooked_vlm.names import block_parts
from hooked_vlm.sae_hooks import SAEHooksMixin
from hooked_vlm.taps import (
    BoundHookPoint,
    InputTap,
    Observer,
    OutputTap,
    Run,
    RunGuard,
    StopForward,
    guard_for,
    install_taps,
    remove_all,
)
from hooked_vlm.widths import block_hook_width, stated_width

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None

_UNSET: Any = object()


class UnknownHookError(KeyError):
    """A hook name that is neither canonical nor a module path of the wrapped model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass
class Generation:
    """What :meth:`HookedVLM.generate` returns."""

    sequences: Tensor  # [batch, prompt + new] token ids, as the wrapped model's generate returns them
    new_tokens: Tensor  # [batch, new]
    text: list[str] | None  # the new tokens decoded by the checkpoint's processor (None without one)
    step_cache: dict[str, list[Tensor]] = field(default_factory=dict)  # hook name → one tensor per forward step
    layout: Any = None  # the prompt's InputLayout


class _Namespace(nn.Module):
    """A node of the hook-name tree (``vision``, ``vision.blocks``, ``vision.blocks.3``, ...)."""


def check_device(device: Any, explicit: bool) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        asked = f"device={str(device)!r} was asked for" if explicit else "the default device is CUDA"
        raise RuntimeError(f"CUDA is not available on this machine and {asked}; pass device='cpu' to run on the CPU")


class HookedVLM(SAEHooksMixin, HookedRootModule):
    """A vision(-language) model whose every part exposes transformer_lens ``HookPoint``s under canonical names.

    The wrapped model runs unmodified; hook points are bound to its module boundaries and installed as PyTorch
    hooks only while they have hooks attached, for the duration of a run.

    Examples:
        >>> model = HookedVLM.from_pretrained("openai/clip-vit-large-patch14")
        >>> embeds, cache = model.run_with_cache(image, names_filter="vision.blocks.3.attn.hook_z")
    """

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.adapter = adapter
        self.processor = adapter.processor
        self.add_module(adapter.raw_prefix, adapter.model)
        self._armed: set[BoundHookPoint] = set()
        self._n_hook_points = 0
        #: the prepared inputs of the run in progress (None between runs): hooks that act on chosen positions
        #: (steering) resolve their selectors against its layout
        self.current_inputs: Prepared | None = None
        self._hook_widths: dict[str, int | None] | None = None  # the adapter's, on first use (hook_width)
        # attn.hook_result derived from each hook_z on a Linear's input (hooked_vlm.head_results)
        for name, tap in with_head_results(adapter.hook_map(), adapter.model).items():
            self._place(name, self._new_hook_point(tap))
        self.setup()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: nn.Module, processor: Any = None) -> HookedVLM:
        """Wrap an already-built model of a supported family (random or pretrained) and, optionally, its processor.

        A model spread over several devices by accelerate (``accelerate.dispatch_model``,
        :func:`hooked_vlm.testing.dispatch`) is wrapped as it is; see :meth:`from_pretrained` for what changes.
        """
        from hooked_vlm.loading import adapter_for_model

        return cls(adapter_for_model(model, processor))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = _UNSET,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        **hf_kwargs: Any,
    ) -> HookedVLM:
        """Load a checkpoint and its own processor, picking the adapter from the checkpoint's config.

        ``name_or_path`` is a Hugging Face hub id or local folder, ``open_clip:ARCH/PRETRAINED``, ``tiny:NAME`` (a
        tiny random-weight model, offline) or ``config:NAME`` (a shipped config on the meta device); see
        :mod:`hooked_vlm.loading`. The default device is CUDA; without CUDA pass ``device="cpu"``.

        Several GPUs: pass ``device_map`` (``"auto"``: even over the visible GPUs; ``"sequential"``;
        ``"balanced_low_0"``; or a dict module path → device), with ``max_memory`` (``{0: "40GiB", 1: "40GiB"}``)
        and ``offload_folder`` as transformers takes them: accelerate places the weights and moves activations
        between devices, and ``device`` is not used. Inputs then go to the device accelerate runs the model's
        forward on, and its output comes back there; every hook sees its value on the device of the module it
        sits at (a block's ``hook_resid_pre`` on the previous block's), and hooks that add or replace values
        (steering, patching, SAEs, ablation) move what they add to that device. ``run_with_cache(device=...)``
        gathers a cache on one device or the CPU.
        """
        from hooked_vlm.loading import load_adapter

        explicit = device is not _UNSET
        device = device if explicit else "cuda"
        if "device_map" not in hf_kwargs and not name_or_path.startswith("config:"):
            check_device(device, explicit)
        return cls(
            load_adapter(name_or_path, device=device, dtype=dtype, attn_implementation=attn_implementation, **hf_kwargs)
        )

    # ---- the hook-name tree ---------------------------------------------------------------------------------------
    def _new_hook_point(self, tap) -> BoundHookPoint:
        self._n_hook_points += 1
        return BoundHookPoint(tap, self._armed, order=self._n_hook_points)

    def _place(self, name: str, hook_point: BoundHookPoint) -> None:
        *parents, leaf = name.split(".")
        node: nn.Module = self
        for part in parents:
            child = node._modules.get(part)
            if child is None:
                child = _Namespace()
                node.add_module(part, child)
            node = child
        node.add_module(leaf, hook_point)

    def setup(self) -> None:
        """Index the hook-name tree (not the wrapped model, whose modules keep their own attributes).

        The hook points of a module spliced in at a hook point (an SAE's ``hook_sae_acts_post``, ...) are indexed
        as its children, right after it in forward order; module-path hook points made so far are kept.
        """
        raw = self.adapter.raw_prefix
        escape_hatches = [hp for name, hp in getattr(self, "hook_dict", {}).items() if name.startswith(raw + ".")]
        self.mod_dict = {}
        points: list[tuple[tuple[int, int], str, HookPoint]] = []
        stack: list[tuple[str, nn.Module]] = [(n, m) for n, m in self._modules.items() if n != raw]
        stack += [(hp.name, hp) for hp in escape_hatches if isinstance(hp, BoundHookPoint)]
        while stack:
            name, module = stack.pop()
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, BoundHookPoint):
                points.append(((module.order, 0), name, module))
                for i, (child, hp) in enumerate(module.child_hook_points().items(), start=1):
                    hp.name = f"{name}.{child}"
                    self.mod_dict[hp.name] = hp
                    points.append(((module.order, i), hp.name, hp))
            else:
                stack.extend((f"{name}.{n}", m) for n, m in module._modules.items())
        self.hook_dict = {name: hp for _, name, hp in sorted(points, key=lambda point: point[0])}
        self._pattern_matches: dict[str, list[str]] = {}

    @property
    def raw_model(self) -> nn.Module:
        """The wrapped Hugging Face / open_clip model, unmodified."""
        return self.adapter.model

    def hook_names(self, pattern: str = "*") -> list[str]:
        """Canonical hook names matching a glob pattern, in forward order (``"vision.blocks.*.hook_resid_post"``)."""
        # memoised until the index changes: matching a pattern against ~1000 names is paid on every run otherwise
        matches = self._pattern_matches.get(pattern)
        if matches is None:
            # module-path hook points made so far are listed only when the pattern asks for them (``"hf.*"``)
            match, raw = _glob(pattern), self.adapter.raw_prefix + "."
            matches = [n for n in self.hook_dict if match(n) and (pattern.startswith(raw) or not n.startswith(raw))]
            self._pattern_matches[pattern] = matches
        return list(matches)

    def hook_point(self, name: str) -> BoundHookPoint:
        """The hook point called ``name``: a canonical name, or ``<raw prefix>.<module path>.hook_out|hook_in``."""
        hook_point = self.hook_dict.get(name)
        if hook_point is not None:
            return hook_point
        raw = self.adapter.raw_prefix
        for suffix, tap_class in ((".hook_out", OutputTap), (".hook_in", InputTap)):
            if name.startswith(raw + ".") and name.endswith(suffix):
                path = name[len(raw) + 1 : -len(suffix)]
                try:
                    self.raw_model.get_submodule(path)
                except AttributeError:
                    break
                hook_point = self._new_hook_point(tap_class(path))
                hook_point.name = name
                self.hook_dict[name] = self.mod_dict[name] = hook_point
                self._pattern_matches.clear()
                return hook_point
        close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownHookError(
            f"unknown hook name {name!r}.{hint} (model.hook_names() lists the canonical names; any module of the "
            f"wrapped model is reachable as '{raw}.<module path>.hook_out' or '.hook_in')"
        )

    def hook_width(self, name: str) -> int | None:
        """The width of the vector ``name`` carries per position (``head · d_head`` for hooks split into heads):
        what an SAE, probe or steering vector there reads, from :meth:`Adapter.hook_widths
        <hooked_vlm.adapter.Adapter.hook_widths>`. ``None`` for attention scores and patterns, and for a
        module-path hook point whose module states no width (an SAE there is checked on its first forward).
        Unknown names raise :class:`UnknownHookError`."""
        hook_point = self.hook_point(name)
        if self._hook_widths is None:
            self._hook_widths = self.adapter.hook_widths()
        if name in self._hook_widths:
            return self._hook_widths[name]
        # what the adapter's hook map does not list: head results (added here) and module-path hook points, whose
        # width is known only where their module states it (a Linear, a norm, ...), not guessed from its neighbours
        parts = block_parts(name)
        towers = {tower.name: tower for tower in self.adapter.towers()}
        if parts is not None and parts[0] in towers:
            return block_hook_width(towers[parts[0]], parts[2])
        if not isinstance(hook_point, BoundHookPoint) or not isinstance(hook_point.tap, (InputTap, OutputTap)):
            return None
        return stated_width(self.raw_model.get_submodule(hook_point.tap.module), isinstance(hook_point.tap, OutputTap))

    def resolve_names(self, names_filter: NamesFilter) -> list[BoundHookPoint]:
        """The hook points a TransformerLens-style ``names_filter`` selects; unknown names raise."""
        if names_filter is None:
            return list(self.hook_dict.values())
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return [hp for name, hp in list(self.hook_dict.items()) if names_filter(name)]
        selected: list[BoundHookPoint] = []
        for name in names_filter:
            if any(c in name for c in "*?["):
                matches = self.hook_names(name)
                if not matches:
                    raise UnknownHookError(f"no hook name matches the pattern {name!r}")
                selected.extend(self.hook_dict[m] for m in matches)
            else:
                selected.append(self.hook_point(name))
        return list(dict.fromkeys(selected))

    # ---- hooks: lazy resolution of names for every TransformerLens entry point -------------------------------------
    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        with self._run_guard.held():  # a hook added from another thread would fire in the run in progress
            for hp in self.resolve_names(name if callable(name) else [name]):
                self.check_and_add_hook(
                    hp, hp.name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend
                )

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):
        """TransformerLens's ``hooks`` context, held by one thread: another thread's run on this model raises
        :class:`~hooked_vlm.taps.ConcurrentRunError` instead of adding its hooks to this one's."""
        with (
            self._run_guard.held(),
            super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as m,
        ):
            yield m

    def remove_all_hook_fns(self, direction="both", including_permanent=False, level=None) -> None:
        # TransformerLens visits every hook point (~1000 on a VLM) at the end of every run_with_cache /
        # run_with_hooks. Only armed hook points and the hook points of their splices can hold hooks.
        for armed in list(self._armed):
            for hp in (armed, *armed.child_hook_points().values()):
                if hp.fwd_hooks or hp.bwd_hooks:
                    hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def _enable_hook(self, name, hook, dir) -> None:
        for hp in self.resolve_names(name if callable(name) else [name]):
            hp.add_hook(hook, dir=dir, level=self.context_level)

    # ---- running --------------------------------------------------------------------------------------------------
    def prepare_inputs(self, inputs: Any = None, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        """Build model inputs and their :class:`InputLayout` from images, text, prompts or processor outputs."""
        if isinstance(inputs, Prepared):
            return inputs
        _check_text("text", text)
        _check_text("prompt", prompt)
        return self.adapter.prepare(inputs, text=text, prompt=prompt, **kwargs)

    def _check_slicing(self, hook_points: list[BoundHookPoint], sliced: Slicer, heads: list[int] | None) -> None:
        """``heads=`` and ``positions=`` checked against the towers of the cached hooks before the forward: a bad
        index would otherwise fail mid-run, in a gather that names neither the argument nor the valid range."""
        if heads is not None:
            if not heads:
                raise ValueError("heads=[] selects no head; pass head indices, or heads=None for every head")
            n_heads = {tower.name: tower.n_heads for tower in self.adapter.towers()}
            for hp in hook_points:
                parts = block_parts(hp.name)
                if parts is None or leaf(parts[2]) not in QUERY_HEAD_HOOKS or parts[0] not in n_heads:
                    continue
                n = n_heads[parts[0]]
                bad = [h for h in heads if not 0 <= h < n]
                if bad:
                    raise ValueError(
                        f"heads={heads} has {bad} out of range for {hp.name!r}: the {parts[0]} tower has {n} heads, "
                        f"so heads= takes indices 0..{n - 1}"
                    )
        if sliced.positions is not None:
            for hp in hook_points:
                sliced._position_index(hp.name)  # raises for indices outside the sequence or an empty selection

    def forward(self, inputs: Any = None, *, text: Any = None, prompt: Any = None, **kwargs) -> Any:
        """Run the model with whatever hooks are attached; returns what the wrapped model returns for the input."""
        return self._execute(self.prepare_inputs(inputs, text=text, prompt=prompt, **kwargs), stop_early=False)

    def _live_hook_points(self) -> list[BoundHookPoint]:
        live = [hp for hp in self._armed if hp.is_live()]
        if len(live) != len(self._armed):
            self._armed.intersection_update(live)
        return live

    @contextmanager
    def _taps(self, stop_early: bool, observers: dict[BoundHookPoint, Observer] | None = None):
        """Install the taps of every hook point that has hooks attached or an observer in this run; remove them on
        exit, whatever happens."""
        live = list(dict.fromkeys([*self._live_hook_points(), *(observers or {})]))
        if not live:
            yield
            return
        # a splice without hooks runs wherever the forward goes, but an early stop need not wait for it
        waited = [hp for hp in live if hp.has_any_hook() or hp in (observers or {})]
        run = Run(waited, stop_early and bool(waited), observers)
        handles = install_taps(self.raw_model, live, run)
        try:
            yield
        finally:
            remove_all(handles)

    @property
    def _run_guard(self) -> RunGuard:
        """One thread at a time runs the wrapped model (shared with any other HookedVLM around it)."""
        return guard_for(self.adapter.model)

    @contextmanager
    def _running(self, prepared: Prepared):
        """Expose ``prepared`` as :attr:`current_inputs` while a run is in progress, in one thread at a time."""
        with self._run_guard.held():
            outer, self.current_inputs = self.current_inputs, prepared
            try:
                yield
            finally:
                self.current_inputs = outer

    def _execute(
        self, prepared: Prepared, stop_early: bool, observers: dict[BoundHookPoint, Observer] | None = None
    ) -> Any:
        try:
            with self._running(prepared), self._taps(stop_early, observers):
                return self.adapter.forward(prepared)
        except StopForward:
            return None

    def run_with_cache(
        self,
        inputs: Any = None,
        *,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        stop_early: bool = True,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        positions: Selector | None = None,
        heads: Sequence[int] | None = None,
        text: Any = None,
        prompt: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run the model and cache the activations ``names_filter`` selects (all canonical hooks by default).

        With ``stop_early`` (default) and an explicit ``names_filter``, the forward stops as soon as every hook
        point with hooks attached has fired, and the returned output is ``None``. ``device`` / ``dtype`` say where
        and in which dtype cached tensors are kept; with ``device="cpu"`` each GPU activation is copied into pinned
        host memory as soon as it is produced, without stopping the forward, so the GPU never holds the cache.
        ``incl_bwd`` backpropagates from the (scalar) output and
        caches gradients under ``<name>_grad``. ``positions`` (a selector: ``"image"``, ``"patches"``, a patch mask,
        ...) keeps only those positions of every cached hook (the query axis of patterns) and ``heads`` only those
        query heads, so e.g. a long prompt's LM patterns fit in memory.
        """
        hook_points = self.resolve_names(names_filter)
        prepared = self.prepare_inputs(inputs, text=text, prompt=prompt, **kwargs)
        cache: dict[str, Tensor] = {}
        sliced = Slicer(prepared, positions, _head_list(heads))
        self._check_slicing(hook_points, sliced, sliced.heads)
        host_copies = HostCopies()

        def save(tensor: Tensor, hook: BoundHookPoint, suffix: str = "") -> None:
            if positions is not None or heads is not None:
                tensor = sliced(hook.name, tensor)
            cache[hook.name + suffix] = stash(tensor, device, dtype, host_copies)

        # Bound hook points are recorded by the run itself, after their own hooks, as a TransformerLens caching hook
        # added last would see them, without adding and removing a hook per point per run. The hook points of a
        # splice (no tap of their own), and caching hooks asked to outlive the run, go through TransformerLens.
        observed = [hp for hp in hook_points if isinstance(hp, BoundHookPoint)] if reset_hooks_end else []
        observers = dict.fromkeys(observed, save)
        fwd_hooks = [(hp.name, save) for hp in hook_points if hp not in observers]
        bwd_hooks = [(hp.name, lambda t, hook: save(t, hook, "_grad")) for hp in hook_points] if incl_bwd else []
        stop = stop_early and names_filter is not None and not incl_bwd
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            output = self._execute(prepared, stop_early=stop, observers=observers)
            if incl_bwd:
                scalar = output if isinstance(output, Tensor) else None
                if scalar is None or scalar.numel() != 1:
                    raise ValueError("incl_bwd=True needs a scalar model output; use run_with_hooks and a readout")
                scalar.backward()
        host_copies.wait()
        if isinstance(names_filter, (str, list, tuple)):
            silent = [hp.name for hp in hook_points if hp.name not in cache]
            if silent:
                warnings.warn(
                    f"{silent} did not fire in this run: the input does not reach them (e.g. text hooks with images "
                    "only), or the module behind a module-path name is not called (open_clip's attn.out_proj)",
                    stacklevel=2,
                )
        result = ActivationCache(cache, lambda: prepared.layout)
        result.model = self  # decompositions read W_O, biases and final norms (hooked_vlm.decomposition)
        return output, result

    def generate(
        self,
        inputs: Any = None,
        *,
        prompt: Any = None,
        text: Any = None,
        cache_names: NamesFilter = None,
        cache_device: str | torch.device | None = None,
        **generate_kwargs: Any,
    ) -> Generation:
        """Generate with every attached hook active at every step (prefill and each new token).

        ``cache_names`` (a names filter) records those hooks at every forward step into
        ``Generation.step_cache[name]`` (a list, prefill first), moved to ``cache_device`` (e.g. ``"cpu"``) when
        given. ``generate_kwargs`` go to the wrapped model's ``generate`` (``max_new_tokens``, ``do_sample``, ...).
        """
        prepared = self.prepare_inputs(inputs, text=text, prompt=prompt)
        step_cache: dict[str, list[Tensor]] = {}
        host_copies = HostCopies()

        def record(tensor: Tensor, hook: BoundHookPoint) -> None:
            step_cache.setdefault(hook.name, []).append(stash(tensor, cache_device, None, host_copies))

        recorded = self.resolve_names(cache_names) if cache_names is not None else []
        observers = {hp: record for hp in recorded if isinstance(hp, BoundHookPoint)}  # as in run_with_cache
        with self.hooks([(hp.name, record) for hp in recorded if hp not in observers]):
            with self._running(prepared), self._taps(stop_early=False, observers=observers):
                sequences = self.adapter.generate(prepared, **generate_kwargs)
        host_copies.wait()
        n_prompt = self.adapter.prompt_length(prepared)
        new_tokens = sequences[:, n_prompt:]
        return Generation(sequences, new_tokens, self.adapter.decode(new_tokens), step_cache, prepared.layout)

    @property
    def name(self) -> str:
        """The model's name in stores, SAE configs and steering vectors (:attr:`Adapter.name <hooked_vlm.adapter.Adapter.name>`)."""
        return self.adapter.name

    def __repr__(self) -> str:
        return (
            f"HookedVLM({self.adapter.family}: {type(self.raw_model).__name__}, {len(self.hook_names())} hook points)"
        )


def _check_text(argument: str, value: Any) -> None:
    """``text=`` / ``prompt=``: a str, a non-empty list of str (or, for ``text=``, a tensor of token ids)."""
    if value is None or isinstance(value, (str, Tensor)):
        return
    expected = f"{argument}= takes a str or a non-empty list of str"
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{expected}, got bytes (which would be read as one prompt per byte); decode it first")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{expected}, got an empty {type(value).__name__}")
        wrong = sorted({type(v).__name__ for v in value if not isinstance(v, str)})
        if wrong:
            raise TypeError(f"{expected}, got a {type(value).__name__} holding {', '.join(wrong)}")
        return
    raise TypeError(f"{expected}, got {type(value).__name__}")


def _head_list(heads: Any) -> list[int] | None:
    if heads is None:
        return None
    try:
        if isinstance(heads, (str, bytes)):
            raise TypeError
        return [operator.index(h) for h in (heads.tolist() if isinstance(heads, Tensor) else heads)]
    except TypeError:
        raise TypeError(f"heads= takes a list of head indices (ints), got {heads!r}") from None


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> Callable[[str], Any]:
    """A compiled matcher for a glob pattern (``fnmatchcase`` recompiles per name: slow over ~1000 hook names)."""
    return re.compile(fnmatch.translate(pattern)).match
