"""The contract between the model-agnostic core and one model family, and the adapter registry.

An adapter is the only place that knows a family's module paths. It declares how to recognise the family,
how to load it, where each canonical hook sits (a :class:`~hooked_vlm.taps.Tap` per name), how inputs are
built from images and text, and the :class:`~hooked_vlm.layout.InputLayout` of an input. What the core may ask
of a family beyond that is a *capability attribute* (:attr:`Adapter.has_language_model`, ...), never its name.

- :class:`Adapter`: the abstract contract (``abc``): what every family must provide, and what it may override.
- :class:`HFAdapter`: the base of Hugging Face families; it owns :meth:`~HFAdapter.load`, so hub options
  (``revision``, ``token``, ``cache_dir``, ...) reach the model and the processor alike in every family.
- :func:`block_hooks` / :data:`BLOCK_HOOK_SUFFIXES`: the canonical per-block hook set, shared by every family.

``doc/adding_a_family.md`` walks through writing one, and ``tests/test_families.py`` is the suite it must pass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import nn

from hooked_vlm.attention import AttentionFunctionTap
from hooked_vlm.inputs import processor_part
from hooked_vlm.layout import InputLayout
from hooked_vlm.taps import InputTap, OutputTap, ResidualSumTap, SplitHeads, Tap
from hooked_vlm.widths import derived_hook_widths

ADAPTERS: list[type[Adapter]] = []


class AdapterConflictError(TypeError):
    """Two adapters claim the same model class or family name: which one wraps a model would depend on import order."""


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` one of the adapters :class:`~hooked_vlm.HookedVLM` picks from.

    Registering again the same class (a module reloaded) replaces it; a different adapter claiming a model class
    or family name that a registered one claims is an :class:`AdapterConflictError`.
    """
    if not isinstance(cls, type) or not issubclass(cls, Adapter):
        raise TypeError(f"register_adapter takes an Adapter subclass, got {cls!r}")
    if not cls.family:
        raise TypeError(f"{cls.__qualname__} sets no family name (the class attribute `family`)")
    for other in list(ADAPTERS):
        if other.__module__ == cls.__module__ and other.__qualname__ == cls.__qualname__:
            ADAPTERS.remove(other)  # the same adapter, its module imported again
            continue
        shared = [c for c in cls.claimed_classes() if c in other.claimed_classes()]
        if shared or other.family == cls.family:
            what = (
                f"model class {shared[0].__module__}.{shared[0].__qualname__}" if shared else f"family {cls.family!r}"
            )
            raise AdapterConflictError(
                f"{cls.__module__}.{cls.__qualname__} claims the {what}, which "
                f"{other.__module__}.{other.__qualname__} already claims; give each model class one adapter "
                "(a variant of a family subclasses its adapter and claims its own model class)"
            )
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

    @classmethod
    def from_hf_config(cls, name: str, config: Any) -> TowerInfo:
        """A tower's facts from the standard fields of a Hugging Face (sub-)config: ``num_hidden_layers``,
        ``hidden_size``, ``num_attention_heads``, ``head_dim`` (else ``hidden_size // heads``), ``num_key_value_heads``
        and ``intermediate_size`` where the config has them."""
        heads = config.num_attention_heads
        return cls(
            name=name,
            n_layers=config.num_hidden_layers,
            d_model=config.hidden_size,
            n_heads=heads,
            d_head=getattr(config, "head_dim", None) or config.hidden_size // heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None),
            d_mlp=getattr(config, "intermediate_size", None),
        )


class Adapter(abc.ABC):
    """The contract of a model family (``hooked_vlm.adapters``): an adapter wraps one model and its processor.

    Must provide (abstract): :meth:`matches_model`, :meth:`load`, :meth:`towers`, :meth:`block_list`,
    :meth:`hook_map`, :meth:`prepare` (which builds the :class:`~hooked_vlm.layout.InputLayout`) and
    :meth:`forward`; families with a language model also :meth:`generate`. Attention patterns come from the taps
    in the hook map: :class:`~hooked_vlm.attention.AttentionFunctionTap` for modules that call transformers'
    attention interface, or a family tap (open_clip's recomputation, Qwen2-VL's packed replay).

    The capability attributes below are what the core and ``hooked_vlm.sae`` read instead of family names.
    """

    #: short family name shown in reports (unique over the registered adapters)
    family: ClassVar[str] = ""
    #: the vision tower's tokens are image patches on a square centre crop of the image (CLIP preprocessing);
    #: ``False``: the whole image is resized to the grid (plots map patches back onto the full image)
    centre_crops_images: ClassVar[bool] = False
    #: the vision tower runs every image of a batch as one packed sequence ``[1, Σ patches, ...]`` (no batch axis
    #: per image), so per-image vision batching, early stop per image, etc. cannot split it by rows
    packed_vision: ClassVar[bool] = False
    #: the vision blocks' attention scores can be edited (``attn.hook_attn_scores``), so attention knockout in
    #: the vision tower works
    supports_vision_knockout: ClassVar[bool] = True
    #: prefix of the module-path escape hatch names (``hf.<module path>.hook_out``)
    raw_prefix: ClassVar[str] = "hf"
    #: ``(module path, method)`` whose result's ``pooler_output`` (one tensor per image, in batch order) is all that
    #: the language model takes from the vision side: batched patching of LM hooks answers it from one base run
    #: instead of running the vision tower again for every copy (``None``: no such boundary)
    image_features_method: ClassVar[tuple[str, str] | None] = None

    def __init__(self, model: nn.Module, processor: Any = None):
        self.model = model
        self.processor = processor

    @property
    def name(self) -> str:
        """The checkpoint the model was loaded from (its config's ``name_or_path``), else ``family:ModelClass``:
        how stores, SAEs and steering vectors name the model."""
        name = getattr(getattr(self.model, "config", None), "name_or_path", "")
        return name or f"{self.family}:{type(self.model).__name__}"

    # ---- capabilities read from the towers -----------------------------------------------------------------
    @property
    def has_language_model(self) -> bool:
        """An ``lm`` tower: the model takes prompts, returns logits and :meth:`generate` s text."""
        return any(t.name == "lm" for t in self.towers())

    @property
    def has_text_tower(self) -> bool:
        """A ``text`` tower (CLIP-style contrastive models): captions are encoded, not generated."""
        return any(t.name == "text" for t in self.towers())

    # ---- recognising and loading ---------------------------------------------------------------------------
    @classmethod
    def claimed_classes(cls) -> tuple[type, ...]:
        """The model classes this adapter wraps (the registry refuses two adapters claiming one)."""
        return ()

    @classmethod
    @abc.abstractmethod
    def matches_model(cls, model: nn.Module) -> bool:
        """True if this adapter wraps ``model`` (a built model object)."""

    @classmethod
    def matches_name(cls, name: str) -> bool:
        """True if this adapter loads ``name`` itself (a scheme such as ``open_clip:``)."""
        return False

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        return False

    @classmethod
    @abc.abstractmethod
    def load(cls, name: str, *, device: str, dtype: torch.dtype | None, attn_implementation: str | None, **kwargs):
        """Load ``(model, processor)``; the model on ``device`` in eval mode."""

    # ---- hook points ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def hook_map(self) -> dict[str, Tap]:
        """Every canonical hook name of this model, in forward order, with its tap."""

    @abc.abstractmethod
    def towers(self) -> list[TowerInfo]:
        """One :class:`TowerInfo` per tower (``vision``, ``text``, ``lm``), in forward order."""

    def hook_widths(self) -> dict[str, int | None]:
        """Hook name → the width of the vector it carries per position (``head · d_head`` for head hooks; ``None``
        for attention scores and patterns): what an SAE spliced there must read, checked by ``add_sae``.

        The default (:func:`~hooked_vlm.widths.derived_hook_widths`) sizes per-block hooks from :meth:`towers`
        and the others from the module their tap sits on. Override to add what it cannot see (a family tap, a
        projection held as a parameter): ``return super().hook_widths() | {"hook_image_embeds": d}``.
        """
        return derived_hook_widths(self.model, self.hook_map(), self.towers())

    def image_projection(self) -> Float[torch.Tensor, "d_vision d_embed"] | None:
        """``[d_vision, d_embed]``: the linear map from the pooled vision feature (``vision.hook_out``) to
        ``hook_image_embeds``, for two-tower models that have one (direct attribution reads it); else ``None``."""
        return None

    def tower_of_prefix(self) -> Mapping[str, str]:
        """Hook-name prefix → layout tower for prefixes that do not name a tower themselves."""
        return {}

    # ---- inputs -----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, inputs: Any, *, text: Any = None, prompt: Any = None, **kwargs) -> Prepared:
        """Model inputs and their layout from images, ``text`` (captions / formatted text) and ``prompt``
        (chat messages), or from ready processor outputs; family keywords the model's forward takes pass through."""

    def require_processor(self, what: str = "images and prompts", part: str | None = None) -> Any:
        """The processor, or a clear error for a model wrapped without one; with ``part`` (``"image_processor"``
        or ``"tokenizer"``), that part of it (see :func:`~hooked_vlm.inputs.processor_part`: a bare image
        processor or tokenizer is its own part)."""
        if self.processor is None:
            raise ValueError(
                f"this model was wrapped without a processor, so {what} cannot be preprocessed here; pass "
                "HookedVLM.from_hf(model, processor), or ready pixel_values / processor outputs as a dict"
            )
        return self.processor if part is None else processor_part(self.processor, part, what)

    @abc.abstractmethod
    def forward(self, prepared: Prepared) -> Any:
        """Run the wrapped model on prepared inputs and return what the family returns for them."""

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

    @abc.abstractmethod
    def block_list(self, tower: str) -> str:
        """Module path of the ``nn.ModuleList`` holding ``tower``'s blocks, in forward order (raise
        :meth:`no_block_list` for a tower this model lacks)."""

    def no_block_list(self, tower: str) -> NotImplementedError:
        return NotImplementedError(
            f"{self.family}: no block list for the {tower!r} tower (towers: {[t.name for t in self.towers()]})"
        )

    def attn_layer_scale(self, tower: str, layer: int) -> torch.Tensor | None:
        """``[d_model]``: the per-channel scale (LayerScale) block ``layer`` of ``tower`` applies to its attention
        output before adding it to the residual stream, or None. Decompositions fold it into each head's write
        (``attn.hook_result`` itself is ``z @ W_O`` per head, before the scale)."""
        return None

    def example_inputs(self) -> dict[str, Any] | None:
        """Processor-style inputs of the checkpoint's real sizes, built from the config alone, or ``None``.

        Small CPU tensors (no processor, no image file): :meth:`prepare` moves them to the model's device, and
        layouts can read their values (e.g. image-token ids), so a model built on the meta device from a shipped
        config runs one forward for real-size shapes (``hooked-vlm hooks config:NAME``).
        """
        return None


#: keyword arguments of :meth:`HFAdapter.load` that address the checkpoint on the hub or on disk: they go to the
#: model's and the processor's ``from_pretrained`` alike, so both come from the same revision, cache and token
HUB_KEYWORDS = (
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "force_download",
    "proxies",
    "subfolder",
    "trust_remote_code",
)


class HFAdapter(Adapter):
    """Base of the Hugging Face families: recognising by model class and ``config.model_type``, and :meth:`load`.

    A subclass sets :attr:`model_class` (what :meth:`load` builds), optionally :attr:`model_classes` (every class
    it wraps) and :attr:`model_types`, and lists in :attr:`processor_keywords` the :meth:`load` keywords meant
    for its processor (Qwen2-VL's ``min_pixels``).
    """

    #: the class :meth:`load` builds with ``from_pretrained``
    model_class: ClassVar[type]
    #: every model class this adapter wraps (default: ``(model_class,)``)
    model_classes: ClassVar[tuple[type, ...]] = ()
    #: the ``config.model_type`` values of the checkpoints it loads (default: ``(family,)``)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: :meth:`load` keywords that go to ``AutoProcessor.from_pretrained`` only (when not ``None``)
    processor_keywords: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def claimed_classes(cls) -> tuple[type, ...]:
        return cls.model_classes or (cls.model_class,)

    @classmethod
    def matches_model(cls, model: nn.Module) -> bool:
        return type(model) in cls.claimed_classes()

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in (cls.model_types or (cls.family,))

    @classmethod
    def load(
        cls,
        name: str,
        *,
        device: str | torch.device,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        model_class: str | type | None = None,
        **kwargs: Any,
    ):
        """``(model, processor)`` of a hub id or folder: the model on ``device`` in eval mode, its own processor.

        ``model_class`` (a class or the name of one of :attr:`model_classes`) overrides :attr:`model_class`.
        :data:`HUB_KEYWORDS` go to both ``from_pretrained`` calls; with ``device_map`` accelerate places the weights
        (and ``device`` is not used); other keywords (``max_memory``, ``offload_folder``, ``low_cpu_mem_usage``,
        ...) go to the model's ``from_pretrained``. ``torch_dtype`` is accepted as the older name of ``dtype``.
        """
        from transformers import AutoProcessor

        if "torch_dtype" in kwargs:
            if dtype is not None:
                raise TypeError("pass dtype= or torch_dtype=, not both")
            dtype = kwargs.pop("torch_dtype")
        processor_kwargs = {k: v for k in cls.processor_keywords if (v := kwargs.pop(k, None)) is not None}
        hub = {k: kwargs.pop(k) for k in HUB_KEYWORDS if k in kwargs}
        model_kwargs = dict(kwargs)
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        build = cls._model_class(model_class)
        model = build.from_pretrained(name, **hub, **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        return model.eval(), AutoProcessor.from_pretrained(name, **hub, **processor_kwargs)

    def forward(self, prepared: Prepared) -> Any:
        """Logits ``[batch, seq, vocab]`` of a model with a language model (families without one override this)."""
        return self.model(**{"use_cache": False, **prepared.kwargs}).logits

    def generate(self, prepared: Prepared, **generate_kwargs) -> torch.Tensor:
        if not self.has_language_model:
            return super().generate(prepared, **generate_kwargs)
        return self.model.generate(**prepared.kwargs, **generate_kwargs)

    @classmethod
    def _model_class(cls, model_class: str | type | None) -> type:
        if model_class is None:
            return cls.model_class
        if isinstance(model_class, type):
            return model_class
        by_name = {c.__name__: c for c in cls.claimed_classes()}
        if model_class not in by_name:
            raise ValueError(f"model_class={model_class!r} is not a {cls.family} class; one of {sorted(by_name)}")
        return by_name[model_class]


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
    #: layer scale (DINOv2): the module, relative to the block, that multiplies the attention / MLP output by a
    #: learned ``[d]`` vector before the block adds it to the residual stream; its output is then ``hook_attn_out`` /
    #: ``hook_mlp_out`` (what the block adds). The adapter's :meth:`Adapter.attn_layer_scale` returns the vector.
    attn_scale: str | None = None
    mlp_scale: str | None = None


def block_hooks(
    prefix: str,
    block: str,
    paths: BlockPaths,
    d_head: int,
    rotary: bool = False,
    attention_function: bool = True,
    attention_repeats: bool = False,
) -> dict[str, Tap]:
    """The canonical per-block hook set (doc/hook_reference.md) of ``prefix`` (e.g. ``vision.blocks.3``) for the block at ``block``."""
    attn = f"{block}.{paths.attn}"
    mlp = f"{block}.{paths.mlp}"
    attn_branch = attn if paths.attn_scale is None else f"{block}.{paths.attn_scale}"
    mlp_branch = mlp if paths.mlp_scale is None else f"{block}.{paths.mlp_scale}"
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
    hooks[f"{prefix}.hook_attn_out"] = OutputTap(attn_branch)
    hooks[f"{prefix}.hook_resid_mid"] = ResidualSumTap(attn_branch, block=block)
    hooks[f"{prefix}.ln2.hook_normalized"] = OutputTap(f"{block}.{paths.ln2}")
    hooks[f"{prefix}.mlp.hook_pre"] = OutputTap(f"{mlp}.{paths.mlp_in}")
    if paths.mlp_up is not None:
        hooks[f"{prefix}.mlp.hook_pre_linear"] = OutputTap(f"{mlp}.{paths.mlp_up}")
    hooks[f"{prefix}.mlp.hook_post"] = InputTap(f"{mlp}.{paths.mlp_out}")
    hooks[f"{prefix}.hook_mlp_out"] = OutputTap(mlp_branch)
    hooks[f"{prefix}.hook_resid_post"] = OutputTap(block)
    return hooks
