"""Model specs: the strings :meth:`HookedVLM.from_pretrained <hooked_vlm.HookedVLM.from_pretrained>`, the CLI
and the examples accept, resolved to an adapter around a loaded model.

===========================  ==================================================================================
``tiny:NAME``                a tiny random-weight model of ``hooked_vlm.testing.TINY_MODELS`` (offline, seconds)
``config:NAME``              a shipped real checkpoint config (``hooked_vlm/configs``) built on the meta device:
                             real-size shapes, no weights
``open_clip:ARCH/TAG``       an adapter that loads a scheme itself (:meth:`Adapter.matches_name`), e.g. open_clip
hub id or local folder       ``AutoConfig`` names the family (``config.model_type``), its adapter loads it
===========================  ==================================================================================

The user guide (doc/user_guide.md, "Loading a model") lists them with examples.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from hooked_vlm.adapter import Adapter
    from hooked_vlm.model import HookedVLM

#: what the CLI and the examples load when no model is named: runs on a fresh machine with no downloads
DEFAULT_MODEL = "tiny:clip"
#: what a VLM is asked, and what a two-tower model's text tower reads, so that one run reaches every hook
DEFAULT_PROMPT = "Describe the image."
DEFAULT_CAPTION = "a photo of the sky over a field"


def registered_adapters() -> list[type[Adapter]]:
    """Every registered adapter class (importing ``hooked_vlm.adapters`` registers the shipped families)."""
    import hooked_vlm.adapters  # noqa: F401
    from hooked_vlm.adapter import ADAPTERS

    return list(ADAPTERS)


def adapter_for_model(model: Any, processor: Any = None) -> Adapter:
    """The registered adapter that wraps ``model``, or a ``TypeError`` listing the supported families."""
    adapters = registered_adapters()
    for adapter in adapters:
        if adapter.matches_model(model):
            return adapter(model, processor)
    raise TypeError(
        f"no hooked_vlm adapter supports {type(model).__module__}.{type(model).__qualname__}; "
        f"supported families: {', '.join(sorted(a.family for a in adapters))}"
    )


def load_adapter(
    spec: str,
    *,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> Adapter:
    """The adapter around the model that ``spec`` names, loaded on ``device`` (ignored for ``config:``).

    ``kwargs`` go to the adapter's ``load`` (:class:`~hooked_vlm.adapter.HFAdapter.load` for Hugging Face
    families: ``revision``, ``token``, ``cache_dir``, ``device_map``, ...); ``tiny:`` and ``config:`` models take none.
    """
    scheme, _, name = spec.partition(":")
    if scheme in ("tiny", "config"):
        if kwargs or attn_implementation is not None:
            given = sorted([*kwargs, *(["attn_implementation"] if attn_implementation is not None else [])])
            raise TypeError(f"{spec!r} is built locally and takes no loading options, got {given}")
        return _local_adapter(scheme, name, spec, device, dtype)
    adapters = registered_adapters()
    adapter = next((a for a in adapters if a.matches_name(spec)), None)
    if adapter is None:  # a hub id or a folder: the checkpoint's config names its family
        # A path that is not there would otherwise be tried as a hub id, after network timeouts when offline.
        if spec.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(spec)):
            raise FileNotFoundError(
                f"model folder not found: {spec} (what was tried: a local folder, as the name is a path; "
                "hub ids look like ORG/NAME)"
            )
        spec = os.path.expanduser(spec)
        config = _load_config(spec, kwargs)
        adapter = next((a for a in adapters if a.matches_config(config)), None)
        if adapter is None:
            raise ValueError(
                f"{spec!r} is a {getattr(config, 'model_type', '?')!r} checkpoint "
                f"({getattr(config, 'architectures', None)}), which no hooked_vlm adapter supports; "
                f"supported families: {', '.join(sorted(a.family for a in adapters))}"
            )
    model, processor = adapter.load(spec, device=device, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return adapter(model, processor)


def load_model(
    spec: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs: Any
) -> HookedVLM:
    """A :class:`~hooked_vlm.HookedVLM` from a model spec (default :data:`DEFAULT_MODEL`), as the CLI loads it.

    Unlike :meth:`HookedVLM.from_pretrained`, ``device`` defaults to CUDA when there is one, else the CPU.
    """
    import torch

    from hooked_vlm.model import HookedVLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HookedVLM.from_pretrained(spec or DEFAULT_MODEL, device=device, dtype=dtype, **kwargs)


def _local_adapter(scheme: str, name: str, spec: str, device: Any, dtype: Any) -> Adapter:
    from hooked_vlm import testing

    if scheme == "config":  # an unknown name is a KeyError that lists the shipped configs
        return adapter_for_model(testing.meta_model(name))
    if name not in testing.TINY_MODELS:
        raise ValueError(f"unknown tiny model {spec!r}; available: {', '.join('tiny:' + n for n in testing.TINY_MODELS)}")
    model, processor = testing.TINY_MODELS[name]()
    return adapter_for_model(model.to(device=device, dtype=dtype), processor)


def _load_config(name_or_path: str, kwargs: dict[str, Any]):
    from transformers import AutoConfig

    from hooked_vlm.adapter import HUB_KEYWORDS

    config_kwargs = {k: kwargs[k] for k in HUB_KEYWORDS if k in kwargs}
    try:
        return AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    except Exception as error:  # offline, unknown repo, bad folder: say what was tried
        raise OSError(
            f"could not load {name_or_path!r}: tried transformers.AutoConfig.from_pretrained({name_or_path!r}) "
            f"(a Hugging Face hub id or a local folder with config.json), the schemes 'open_clip:ARCH/PRETRAINED', "
            f"'tiny:NAME' and 'config:NAME'. Underlying error: {type(error).__name__}: {error}"
        ) from error
