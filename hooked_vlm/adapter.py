"""The contract between the model-agnostic core and one model family, and the adapter registry.

An adapter is the only place that knows a family's module paths. It declares how to recognise the family,
how to load it, where each canonical hook sits (a :class:`~hooked_vlm.taps.Tap` per name), how inputs are
built from images and text, and the :class:`~hooked_vlm.layout.InputLayout` of an input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hooked_vlm.attention import AttentionFunctionTap
from hooked_vlm.layout import InputLayout
from hooked_vlm.taps import InputTap, OutputTap, ResidualSumTap, SplitHeads, Tap

ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS.append(cls)
    return cls


class Prepared:
    """Model inputs built from user inputs, and their layout.

    The layout may be given as a zero-argument function: it is built on first use, so a run that needs no
    layout (no hooks, no position selection) does no work for it — CPU time before the first kernel launch is
    time the GPU waits.
    """

    def __init__(self, kwargs: dict[str, Any], layout: InputLayout | Callable[[], InputLayout]):
        self.kwargs = kwargs
        self._layout = layout

    @property
    def layout(self) -> InputLayout:
        if not isinstance(self._layout, InputLayout):
            self._layout = self._layout()
        return self._layout


@dataclass(frozen=True)
class TowerInfo:
    """Facts about one tower, for reports and shape checks."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_kv_heads: int | None = None
    d_mlp: int | None = None


class Adapter:
    """Base class of the per-family adapters in ``hooked_vlm.adapters``."""

    #: short family name shown in reports
    family: ClassVar[str] = ""
    #: prefix of the module-path escape hatch names (``hf.<module path>.hook_out``)
    raw_prefix: ClassVar[str] = "hf"
    #: ``(module path, method)`` whose result's ``pooler_output`` (one tensor per image, in batch order) is all that
    #: the language model takes from the vision side: batched patching of LM hooks answers it from one base run
    #: instead of running the vision tower again for every copy (``None``: no such boundary)
    image_features_method: ClassVar[tuple[str, str] | None] = None

    def __init__(self, model: nn.Module, processor: Any = None):
        self.model = model
        self.processor = processor

    # ---- recognising and loading ---------------------------------------------------------------------------
    @classmethod
    def matches_model(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def matches_name(cls, name: str) -> bool:
        """True if this adapter loads ``name`` itself (a scheme such as ``open_clip:``)."""
        return False

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        return False

    @classmethod
    def load(cls, name: str, *, device: str, dtype: torch.dtype | None, attn_implementation: str | None, **kwargs):
        """Load ``(model, processor)``; the model on ``device`` in eval mode."""
        raise NotImplementedError

    # ---- hook points ------------------------------------------------------------------------------------------
    def hook_map(self) -> dict[str, Tap]:
        """Every canonical hook name of this model, in forward order, with its tap."""
        raise NotImplementedError

    def towers(self) -> list[TowerInfo]:
        raise NotImplementedError

    def tower_of_prefix(self) -> Mapping[str, str]:
        """Hook-name prefix → layout tower for prefixes that do not name a tower themselves."""
        return {}

    # ---- inputs -----------------------------------------------------------------------------------------------
    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        raise NotImplementedError

    def require_processor(self, what: str = "images and prompts") -> Any:
        """The processor, or a clear error for a model wrapped without one."""
        if self.processor is None:
            raise ValueError(
                f"this model was wrapped without a processor, so {what} cannot be preprocessed here; pass "
                "HookedVLM.from_hf(model, processor), or ready pixel_values / processor outputs as a dict"
            )
        return self.processor

    def forward(self, prepared: Prepared) -> Any:
        """Run the wrapped model on prepared inputs and return what the family returns for them."""
        raise NotImplementedError

    def generate(self, prepared: Prepared, **generate_kwargs) -> torch.Tensor:
        """Token ids ``[batch, prompt + new]`` from the wrapped model's ``generate``."""
        raise NotImplementedError(f"{self.family} models do not generate text")

    def prompt_length(self, prepared: Prepared) -> int:
        """Number of prompt positions at the start of the generated sequences."""
        return prepared.kwargs["input_ids"].shape[1]

    def decode(self, token_ids: torch.Tensor) -> list[str] | None:
        """Token ids decoded by the checkpoint's processor (``None`` for a model wrapped without one)."""
        if self.processor is None:
            return None
        return self.processor.batch_decode(token_ids, skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        """Structure facts for the Phase 0 report (projection, embeddings, token counts)."""
        return {}

    def tower_forward(self, tower: str, prepared: Prepared) -> Any:
        """Run only ``tower`` on prepared inputs, for harvests that need nothing after it (compiled harvests)."""
        raise NotImplementedError(f"{self.family}: running the {tower!r} tower alone is not supported")

    def block_list(self, tower: str) -> str:
        """Module path of the ``nn.ModuleList`` holding ``tower``'s blocks, in forward order."""
        raise NotImplementedError(f"{self.family}: no block list for the {tower!r} tower")

    def example_inputs(self) -> dict[str, Any] | None:
        """Processor-style inputs of the checkpoint's real sizes, built from the config alone, or ``None``.

        Small CPU tensors (no processor, no image file): :meth:`prepare` moves them to the model's device, and
        layouts can read their values (e.g. image-token ids), so a model built on the meta device from a shipped
        config runs one forward for real-size shapes (``hooked-vlm hooks config:NAME``).
        """
        return None


# ---------------------------------------------------------------------------------------------------------------
# The canonical per-block hook set for blocks built from separate modules (HF CLIP, SigLIP, Qwen2, ...).


@dataclass(frozen=True)
class BlockPaths:
    """Module names inside one pre-norm transformer block (relative to the block)."""

    ln1: str
    attn: str
    ln2: str
    mlp: str
    q: str | None = "q_proj"  # relative to attn; None when q/k/v are fused
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "out_proj"
    mlp_in: str = "fc1"  # gate projection for gated MLPs
    mlp_up: str | None = None  # up projection of gated MLPs
    mlp_out: str = "fc2"


def block_hooks(
    prefix: str,
    block: str,
    paths: BlockPaths,
    d_head: int,
    rotary: bool = False,
    attention_function: bool = True,
    attention_repeats: bool = False,
) -> dict[str, Tap]:
    """The DESIGN.md per-block hook set of ``prefix`` (e.g. ``vision.blocks.3``) for the block at ``block``."""
    attn = f"{block}.{paths.attn}"
    mlp = f"{block}.{paths.mlp}"
    heads = SplitHeads(d_head)
    hooks: dict[str, Tap] = {
        f"{prefix}.hook_resid_pre": InputTap(block),
        f"{prefix}.ln1.hook_normalized": OutputTap(f"{block}.{paths.ln1}"),
    }
    for kind in ("q", "k", "v"):
        path = getattr(paths, kind)
        if path is not None:
            hooks[f"{prefix}.attn.hook_{kind}"] = OutputTap(f"{attn}.{path}", view=heads)
    if attention_function:
        kinds = ("rot_q", "rot_k", "scores", "pattern") if rotary else ("scores", "pattern")
        for kind in kinds:
            name = {"scores": "hook_attn_scores", "pattern": "hook_pattern"}.get(kind, f"hook_{kind}")
            hooks[f"{prefix}.attn.{name}"] = AttentionFunctionTap(attn, kind=kind, fires_repeatedly=attention_repeats)
    hooks[f"{prefix}.attn.hook_z"] = InputTap(f"{attn}.{paths.o}", view=heads)
    hooks[f"{prefix}.hook_attn_out"] = OutputTap(attn)
    hooks[f"{prefix}.hook_resid_mid"] = ResidualSumTap(attn, block=block)
    hooks[f"{prefix}.ln2.hook_normalized"] = OutputTap(f"{block}.{paths.ln2}")
    hooks[f"{prefix}.mlp.hook_pre"] = OutputTap(f"{mlp}.{paths.mlp_in}")
    if paths.mlp_up is not None:
        hooks[f"{prefix}.mlp.hook_pre_linear"] = OutputTap(f"{mlp}.{paths.mlp_up}")
    hooks[f"{prefix}.mlp.hook_post"] = InputTap(f"{mlp}.{paths.mlp_out}")
    hooks[f"{prefix}.hook_mlp_out"] = OutputTap(mlp)
    hooks[f"{prefix}.hook_resid_post"] = OutputTap(block)
    return hooks
