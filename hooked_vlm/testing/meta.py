"""Full-size models from real checkpoint configs, built on the meta device (no weights, no memory)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch


def config_names() -> list[str]:
    """Names of the shipped checkpoint configs (hub ids with ``/`` written as ``--``)."""
    files = resources.files("hooked_vlm.configs").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def load_config(name: str) -> dict[str, Any]:
    """The shipped config of a checkpoint, by hub id (``openai/clip-vit-large-patch14``) or file stem."""
    stem = name.replace("/", "--").replace(":", "--")
    path = resources.files("hooked_vlm.configs") / f"{stem}.json"
    if not path.is_file():
        raise KeyError(f"no shipped config {stem!r}; available: {config_names()}")
    return json.loads(path.read_text())


def build(name: str, model_class: str | None = None, device: str | torch.device = "meta", dtype=None):
    """A random-weight model of a shipped config, on ``device`` (meta by default: shapes only).

    Hugging Face configs build ``model_class`` (default: the config's first architecture); an open_clip config
    (``{"library": "open_clip", "model": "ViT-L-14", ...}``) builds ``open_clip.create_model(model)``.
    """
    data = load_config(name)
    if data.get("library") == "open_clip":
        import open_clip

        with torch.device(device):  # build in place rather than on the CPU first
            model = open_clip.create_model(data["model"], pretrained=None, device=device, **data.get("kwargs", {}))
    else:
        import transformers
        from transformers import CONFIG_MAPPING

        config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
        with torch.device(device):
            model = getattr(transformers, model_class or data["architectures"][0])(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def meta_model(name: str, model_class: str | None = None):
    """Shorthand for ``build(name, model_class, device="meta")``."""
    return build(name, model_class, device="meta")
