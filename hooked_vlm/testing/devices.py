"""Spreading an already-built model over several devices with accelerate, as ``from_pretrained(device_map=...)`` does.

A checkpoint loads spread with ``HookedVLM.from_pretrained(name, device_map="auto")``. A model that is already
built (random weights at real size, a model changed in memory) is spread with :func:`dispatch` and then wrapped
with ``HookedVLM.from_hf``. :func:`alternating_device_map` puts every block on another device than the one before
it, so tests cross a device boundary at every block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

DeviceMap = dict[str, Any]  # module path → device (an index, "cuda:1", "cpu" or "disk")

_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def dispatch(
    model: nn.Module,
    device_map: str | DeviceMap = "balanced",
    *,
    max_memory: dict[Any, int | str] | None = None,
    offload_dir: str | None = None,
) -> nn.Module:
    """Spread ``model`` over devices with accelerate's ``infer_auto_device_map`` and ``dispatch_model``.

    ``device_map``: ``"balanced"`` (``"auto"``: the same, as in transformers) splits the model evenly over the
    visible GPUs, ``"balanced_low_0"`` keeps GPU 0 light (for ``generate``), ``"sequential"`` fills GPU 0 first;
    or an explicit map of module paths to devices (``"cpu"`` and ``"disk"`` offload, the latter into
    ``offload_dir``). ``max_memory`` (``{0: "20GiB", 1: "20GiB"}``) bounds each device, and so also chooses
    which GPUs are used. Blocks are never split: the model's ``_no_split_modules`` are kept whole, as
    transformers does. Returns the model (moved in place) with ``hf_device_map`` set.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if isinstance(device_map, str):
        if device_map not in _STRATEGIES:
            raise ValueError(f"device_map must be one of {_STRATEGIES} or a dict module path → device, not {device_map!r}")
        no_split = sorted(getattr(model, "_no_split_modules", None) or [])
        if device_map == "sequential":
            memory = get_max_memory(max_memory)
        else:
            memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    skip_keys = sorted(getattr(model, "_skip_keys_device_placement", None) or []) or None
    return dispatch_model(model, device_map, offload_dir=offload_dir, skip_keys=skip_keys)


def alternating_device_map(model: nn.Module, devices: Sequence[Any]) -> DeviceMap:
    """The finest device map accelerate may make of ``model``, its units placed on ``devices`` in turn.

    Units are the model's ``_no_split_modules`` whole and every other module down to its leaves, so every
    boundary between blocks (and between the stages of a projector) is a boundary between devices. Parameters
    held directly by a split module (LLaVA-OneVision's ``image_newline``) go on ``devices[0]``: accelerate hooks
    modules, not loose parameters, so such a parameter stays where it was built and the model moves it where it
    is used.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    units: list[str] = []
    loose: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if not children or type(module).__name__ in no_split:
            units.append(prefix)
            return
        own = [*dict(module.named_parameters(recurse=False)), *dict(module.named_buffers(recurse=False))]
        loose.extend(f"{prefix}.{name}" if prefix else name for name in own)
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return {name: devices[0] for name in loose} | {unit: devices[i % len(devices)] for i, unit in enumerate(units)}
