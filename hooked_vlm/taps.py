"""Binding of hook points to module boundaries of a model we do not own.

A :class:`Tap` says where a canonical hook point sits in the wrapped model (a module path plus a boundary)
and how its value is viewed (e.g. split into heads). Taps are installed as PyTorch hooks only for the hook
points that have hooks attached, only for the duration of one run, and removed afterwards, so that a model
with no hooks attached runs exactly the stock forward.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class StopForward(Exception):
    """Raised inside a forward once every requested hook point has fired; caught by the run."""


class HookShapeError(ValueError):
    """A user hook returned a tensor of the wrong shape."""


class HookDtypeError(HookShapeError, TypeError):
    """A user hook returned a tensor of another dtype than the value it was given, or a meta tensor."""


# ---------------------------------------------------------------------------------------------------------------
# Views: how the tensor at a boundary is presented to the hook point, and how an edit is written back.


class View:
    """Identity view; subclasses reshape a boundary tensor for the hook and write edits back."""

    def to_hook(self, x: Tensor) -> Tensor:
        return x

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        return h


@dataclass(frozen=True)
class SplitHeads(View):
    """``[..., head * d_head]`` at the boundary, ``[..., head, d_head]`` at the hook point."""

    d_head: int

    def to_hook(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.d_head))

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        return h.flatten(-2)


@dataclass(frozen=True)
class SelectToken(View):
    """One position of a ``[batch, pos, d]`` boundary tensor (e.g. the CLS token a pooler reads)."""

    index: int

    def to_hook(self, x: Tensor) -> Tensor:
        return x[:, self.index]

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        out = x.clone()
        out[:, self.index] = h
        return out


@dataclass(frozen=True)
class TokensFrom(View):
    """The positions from ``start`` on of a ``[batch, pos, d]`` boundary tensor (e.g. the patches without the CLS
    token, where a model reads only those); an edit leaves the positions before ``start`` as they were."""

    start: int

    def to_hook(self, x: Tensor) -> Tensor:
        return x[:, self.start :]

    def from_hook(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.cat([x[:, : self.start], h], dim=1)


IDENTITY = View()


# ---------------------------------------------------------------------------------------------------------------
# The hook point class and the per-run state.


class BoundHookPoint(HookPoint):
    """A transformer_lens ``HookPoint`` that knows where it sits in the wrapped model.

    Adding a hook arms the hook point: the next run installs its tap. Nothing else differs from
    ``HookPoint``, so TransformerLens and sae_lens utilities treat it as one.
    """

    def __init__(self, tap: Tap, armed: set[BoundHookPoint], order: int):
        super().__init__()
        self.tap = tap
        self.order = order
        self._armed = armed
        # A module spliced in at this point (an SAE): it runs on the value in every forward and its output goes
        # on downstream. Kept out of ``_modules`` so that its parameters are not the model's; its own hook
        # points are named as children of this one (``<name>.hook_sae_acts_post``) by ``HookedVLM.setup``.
        self.__dict__["splice"] = None

    def set_splice(self, module: nn.Module | None) -> None:
        """Splice ``module`` in at this hook point (``None`` removes it); a splice arms the hook point."""
        self.__dict__["splice"] = module
        if module is not None:
            self._armed.add(self)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.splice is None else self.splice(x)

    def child_hook_points(self) -> dict[str, HookPoint]:
        """The spliced module's hook points, by name relative to this hook point (none without a splice)."""
        if self.splice is None:
            return {}
        return {name: m for name, m in self.splice.named_modules() if isinstance(m, HookPoint)}

    def add_hook(self, hook, dir="fwd", is_permanent=False, level=None, prepend=False, **kwargs) -> None:
        super().add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend, **kwargs)
        self._armed.add(self)

    def has_any_hook(self) -> bool:
        """True if hooks are attached here or to a hook point of the splice: a run has to reach this point."""
        return any(hp._forward_hooks or hp._backward_hooks for hp in (self, *self.child_hook_points().values()))

    def is_live(self) -> bool:
        """True if the next run has to install this hook point's tap: it has hooks, or a splice to run."""
        return self.splice is not None or self.has_any_hook()

    def layer(self) -> int:
        """The block index in ``<tower>.blocks.<i>.…`` (TransformerLens's version expects ``blocks.<i>`` first)."""
        parts = (self.name or "").split(".")
        if "blocks" not in parts[:-1]:
            raise ValueError(f"{self.name!r} is not a per-block hook point")
        return int(parts[parts.index("blocks") + 1])


Observer = Callable[[Tensor, "BoundHookPoint"], None]


class ConcurrentRunError(RuntimeError):
    """A second thread ran a model while a run on it was in progress (its taps would mix the two runs)."""


PARALLEL_HINT = (
    "a model runs one forward at a time; to run in parallel, give each thread its own model "
    "(HookedVLM.from_pretrained / from_hf in each thread, or copy.deepcopy(model)) or batch the inputs into one call"
)


class RunGuard:
    """Who is running a wrapped model: one thread at a time, re-entrant within it (a hook may run the model again).

    Hooks, taps, splices and ``current_inputs`` are state of the model, shared by every thread: a second thread's
    run would install its taps on the modules the first thread's forward goes through. One guard per wrapped
    model (``guard_for``), so that two ``HookedVLM`` around one model exclude each other too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            if self.owner is not None and self.owner != me:
                raise ConcurrentRunError(
                    f"this model is in use by another thread ({self.owner}) right now; {PARALLEL_HINT}"
                )
            self.owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self.owner = None


_guards: weakref.WeakKeyDictionary[nn.Module, RunGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def guard_for(model: nn.Module) -> RunGuard:
    """The one :class:`RunGuard` of a wrapped model."""
    with _guards_lock:
        guard = _guards.get(model)
        if guard is None:
            guard = _guards[model] = RunGuard()
        return guard


class Run:
    """State shared by the taps of one run: which hook points still have to fire before an early stop, and the
    run's observers (``run_with_cache``'s recorders), called with each value after the hook point's own hooks."""

    def __init__(
        self,
        hook_points: Sequence[BoundHookPoint],
        stop_early: bool,
        observers: dict[BoundHookPoint, Observer] | None = None,
    ):
        self.pending = set(hook_points) if stop_early else None
        self.observers = observers or {}
        self.thread = threading.get_ident()

    def fire(self, hp: BoundHookPoint, x: Tensor) -> Tensor:
        """Pass ``x`` through the hook point, check what the user hooks returned, and track completion."""
        # (not while compiling: dynamo cannot trace get_ident and would break the graph at every tap; a compiled
        # harvest runs in the thread that holds the model's guard)
        if not torch.compiler.is_compiling() and threading.get_ident() != self.thread:
            # another thread's forward (the raw model's, say) is going through this run's taps: it would run this
            # run's hooks, and this run's cache would record it
            raise ConcurrentRunError(
                f"{hp.name!r} fired in a thread other than the one whose run installed it; {PARALLEL_HINT}"
            )
        y = hp(x)
        if y is not x:
            if not isinstance(y, Tensor):
                raise HookShapeError(f"hook on {hp.name!r} returned {type(y).__name__}, expected a Tensor or None")
            if y.shape != x.shape:
                raise HookShapeError(f"hook on {hp.name!r} returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
            if y.dtype != x.dtype:
                # a silent cast would change the logits (bf16 into a float32 model) or fail deep in a layer norm
                raise HookDtypeError(
                    f"hook on {hp.name!r} returned dtype {y.dtype}, expected {x.dtype}; cast what the hook "
                    f"returns (e.g. `return new.to(x.dtype)`)"
                )
            if y.device != x.device:  # e.g. a value from a cache kept on the CPU or on another GPU of a device_map
                if y.device.type == "meta":
                    raise HookDtypeError(
                        f"hook on {hp.name!r} returned a tensor on the meta device (shape only, no values); "
                        f"expected values on {x.device}"
                    )
                y = y.to(x.device)
        observer = self.observers.get(hp)
        if observer is not None:
            observer(y, hp)
        if self.pending is not None and not hp.tap.fires_repeatedly:
            self.done(hp)
        return y

    def done(self, hp: BoundHookPoint) -> None:
        if self.pending is None:
            return
        self.pending.discard(hp)
        if not self.pending:
            raise StopForward


Handle = Any  # anything with .remove()


# ---------------------------------------------------------------------------------------------------------------
# Taps.


@dataclass(frozen=True)
class Tap:
    """Where a hook point sits: a module path of the wrapped model and a boundary of that module."""

    module: str
    view: View = IDENTITY
    #: True if the value can pass the boundary several times in one call of ``module`` (e.g. per-image
    #: attention calls); completion is then tracked at the end of the module's forward.
    fires_repeatedly: bool = False

    def group_key(self) -> object:
        return self

    @classmethod
    def install_group(cls, root: nn.Module, hook_points: list[BoundHookPoint], run: Run) -> list[Handle]:
        # names bound to one boundary (``vision.hook_out`` and the last block's ``hook_resid_post``) are installed
        # last one first, as ``install_taps`` installs groups: with ``prepend=True`` they then fire in forward
        # order, and each sees the edits of the names before it
        handles = []
        for hp in reversed(hook_points):
            handles.extend(hp.tap.install(root, hp, run))
        return handles

    def install(self, root: nn.Module, hp: BoundHookPoint, run: Run) -> list[Handle]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.module


def _first(output: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The tensor a module boundary carries, and how to put a replacement back into the output."""
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, tuple):
        return output[0], lambda new: (new, *output[1:])
    if isinstance(output, dict):  # ModelOutput
        key = next(iter(output.keys()))

        def put(new: Tensor) -> Any:
            output[key] = new
            return output

        return output[key], put
    raise TypeError(f"cannot tap a module output of type {type(output).__name__}")


@dataclass(frozen=True)
class OutputTap(Tap):
    """The output of ``module`` (its first element if the module returns a tuple)."""

    def install(self, root, hp, run):
        view = self.view

        def hook(module, args, output):
            x, put = _first(output)
            h = view.to_hook(x)
            new = run.fire(hp, h)
            if new is not h:
                return put(view.from_hook(x, new))
            return None

        return [submodule(root, self.module).register_forward_hook(hook, prepend=True)]

    def describe(self) -> str:
        return f"{self.module} → output"


@dataclass(frozen=True)
class InputTap(Tap):
    """The first positional input of ``module``."""

    def install(self, root, hp, run):
        view = self.view

        def hook(module, args, kwargs):
            if args:
                x = args[0]
                h = view.to_hook(x)
                new = run.fire(hp, h)
                if new is not h:
                    return (view.from_hook(x, new), *args[1:]), kwargs
                return None
            key = next(iter(kwargs))
            x = kwargs[key]
            h = view.to_hook(x)
            new = run.fire(hp, h)
            if new is not h:
                return args, {**kwargs, key: view.from_hook(x, new)}
            return None

        return [submodule(root, self.module).register_forward_pre_hook(hook, with_kwargs=True, prepend=True)]

    def describe(self) -> str:
        return f"{self.module} → input"


@dataclass(frozen=True)
class ResidualSumTap(Tap):
    """``block input + branch output``: the residual stream between two sublayers (``hook_resid_mid``).

    ``module`` is the branch (the attention module, or the layer-scale after it) whose output the block adds
    to its input. An edit is written back into the branch output as ``new - block_input``, so the block's own
    addition produces the edited residual and every later use of it sees the edit.
    """

    block: str = ""

    def install(self, root, hp, run):
        stash: dict[str, Tensor] = {}

        def remember_input(module, args, kwargs):
            stash["resid_pre"] = args[0] if args else next(iter(kwargs.values()))

        view = self.view

        def hook(module, args, output):
            branch, put = _first(output)
            # the block's pre-hook sees its input before accelerate moves it to the block's device (a no-op
            # unless a device_map splits the model there)
            resid_pre = stash["resid_pre"].to(branch.device)
            mid = resid_pre + branch
            h = view.to_hook(mid)
            version = h._version  # mid is a fresh sum, not the model's tensor: in-place edits must be written back too
            new = run.fire(hp, h)
            if new is not h or h._version != version:
                return put(view.from_hook(mid, new) - resid_pre)
            return None

        block = submodule(root, self.block)
        return [
            block.register_forward_pre_hook(remember_input, with_kwargs=True, prepend=True),
            submodule(root, self.module).register_forward_hook(hook, prepend=True),
        ]

    def describe(self) -> str:
        return f"{self.block} → input + {self.module} → output"


class CompletionHook:
    """Marks hook points done when ``module`` finishes (for taps that may fire several times per call)."""

    @staticmethod
    def install(root: nn.Module, module: str, hook_points: list[BoundHookPoint], run: Run) -> Handle:
        def hook(mod, args, output):
            for hp in hook_points:
                run.done(hp)

        return submodule(root, module).register_forward_hook(hook)


_MISSING = object()


class InstanceOverride:
    """Sets an attribute on one instance (a method, a config) until ``remove()``, which puts back whatever the
    instance had. Taps use it where a value has no module boundary: the class and other instances are untouched."""

    def __init__(self, obj: Any, name: str, value: Any):
        self.obj, self.name = obj, name
        self.previous = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)

    def remove(self) -> None:
        if self.previous is _MISSING:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.previous)


class RemoveEntry:
    """Removes ``mapping[key]`` on ``remove()`` (per-run registries keyed by module)."""

    def __init__(self, mapping: dict, key: Any):
        self.mapping, self.key = mapping, key

    def remove(self) -> None:
        self.mapping.pop(self.key, None)


def install_taps(root: nn.Module, hook_points: Sequence[BoundHookPoint], run: Run) -> list[Handle]:
    """Install the taps of ``hook_points`` and return the handles to remove.

    Taps register their PyTorch hooks with ``prepend=True``, installed here in reverse definition order: on a
    module they then fire in definition order (``hook_attn_out`` before ``hook_resid_mid``), and before any hook
    the model registered itself. transformers records ``output_hidden_states`` with permanent forward hooks, and
    LLaVA-OneVision's projector reads the recorded vision layer: an edit made after that hook would be lost.
    """
    groups: dict[object, list[BoundHookPoint]] = {}
    for hp in sorted(hook_points, key=lambda h: h.order):
        groups.setdefault(hp.tap.group_key(), []).append(hp)
    handles: list[Handle] = []
    try:
        for members in reversed(groups.values()):
            handles.extend(type(members[0].tap).install_group(root, members, run))
        if run.pending is not None:
            repeated: dict[str, list[BoundHookPoint]] = {}
            for hp in hook_points:
                if hp.tap.fires_repeatedly:
                    repeated.setdefault(hp.tap.module, []).append(hp)
            for module, members in repeated.items():
                handles.append(CompletionHook.install(root, module, members, run))
    except BaseException:
        remove_all(handles)
        raise
    return handles


def remove_all(handles: Sequence[Handle]) -> None:
    for handle in reversed(handles):
        handle.remove()


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` for the taps of every run: a walk through ``_modules`` costs a fraction of
    ``get_submodule``'s checked ``getattr`` chain (about 6 µs a path), which a run would pay once per tap."""
    module = root
    try:
        for part in path.split("."):
            module = module._modules[part]
    except KeyError:
        return root.get_submodule(path)  # its error names the missing part
    return module


def module_exists(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (``dispatch_model``, ``device_map=``, offloading), or ``None``.

    accelerate wraps the forward of a dispatched module with an ``AlignDevicesHook`` (several in a
    ``SequentialHook``) that moves its inputs, and offloaded weights, to its execution device.
    """
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def current_device(module: nn.Module) -> torch.device:
    """The device inputs should go to.

    A model dispatched by accelerate moves every input to the execution device of the hook on its root (and its
    outputs back to where the inputs were), so inputs go there directly: one copy, not two. Otherwise the first
    parameter's device; parameters offloaded to the CPU or disk are on the meta device, and then it is the
    execution device of the first module accelerate hooked (``accelerate.cpu_offload`` leaves the root's own hook
    without one). A model built on the meta device (shape checks) takes meta inputs.
    """
    device = execution_device(module)
    if device is not None:
        return device
    first = next(module.parameters(), None)
    if first is None:
        return torch.device("cpu")
    if first.device.type != "meta":
        return first.device
    return next((d for d in map(execution_device, module.modules()) if d is not None), first.device)
