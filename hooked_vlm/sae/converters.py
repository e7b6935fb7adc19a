"""Vision SAEs trained elsewhere, loaded through sae_lens's own converter mechanism and spliced with ``add_sae``.

sae_lens loads a foreign format with a *converter*: a function ``(path, device, cfg_overrides) -> (cfg_dict,
state_dict)`` passed to ``SAE.load_from_disk(path, converter=...)`` (the disk loaders of
``sae_lens.loading.pretrained_sae_loaders``, e.g. ``sparsify_disk_loader``), and, for the Hub, a loader
``(repo_id, folder_name, device, force_download, cfg_overrides) -> (cfg_dict, state_dict, log_sparsity)``
registered by name in ``NAMED_PRETRAINED_SAE_LOADERS`` (what a release's ``conversion_func`` names). This module
adds both for two formats (ViT-Prisma's, which holds SAEs and transcoders, and saev's):

- **ViT-Prisma** (``vit_prisma.sae.SparseAutoencoder``; the released CLIP and DINO SAEs): a folder holding
  ``config.json`` (the ``VisionModelSAERunnerConfig`` fields: ``d_in``, ``d_sae`` or ``expansion_factor``,
  ``hook_point`` / ``hook_point_layer``, ``activation_fn_str`` and ``activation_fn_kwargs``,
  ``normalize_activations``, ``model_name``, ``cls_token_only``) and the state dict in ``weights.pt`` (or
  ``*.safetensors``), or one ``.pt`` file ``{"cfg": {...}, "state_dict": {...}}``. Weights ``W_enc [d_in, d_sae]``,
  ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``; it encodes ``act((x - b_dec) @ W_enc + b_enc)``, which is
  sae_lens's ``apply_b_dec_to_input=True``. Its hook names are TransformerLens's (``blocks.9.hook_mlp_out``):
  they become ``vision.blocks.9.hook_mlp_out``.
- **saev** (OSU-NLP-Group, ``saev.nn.modeling.dump``): one file, a JSON header line (``{"schema": 2, "cfg":
  {"d_vit", "exp_factor", "activation": {"cls": "Relu" | "TopK" | "BatchTopK", "params": {"top_k"}}, ...}}``;
  schema 1 and the older header of bare config fields are read too) followed by a ``torch.save``'d state dict with
  the same four weights. It encodes ``act(x @ W_enc + b_enc)`` (no ``b_dec`` subtracted), so
  ``apply_b_dec_to_input=False``. The file does not say which layer it was trained on (saev records that in the
  activation shards' metadata), so the caller names it: ``layer=`` (the residual stream after that block,
  ``vision.blocks.{layer}.hook_resid_post``, what saev records) or ``hook_name=``.
- **ViT-Prisma transcoders** (``vit_prisma.transcoders.Transcoder``; the same files, with ``is_transcoder: true``):
  an input hook (``hook_point_layer`` / ``layer_subtype``) and an output hook (``out_hook_point_layer`` /
  ``layer_out_subtype``, width ``d_out``). Weights ``W_enc [d_in, d_sae]``, ``b_enc``, ``b_dec [d_in]`` (subtracted
  from the input), ``W_dec [d_sae, d_out]``, ``b_dec_out [d_out]`` and, with ``transcoder_with_skip_connection``,
  ``W_skip [d_in, d_in]``; it computes ``act((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out`` (``+ x @ (I +
  W_skip.T)`` with the skip). They become sae_lens's ``Transcoder`` / ``SkipTranscoder`` (``b_dec`` folded into
  ``b_enc``, the identity into ``W_skip``) with ``cfg.metadata.hook_name`` / ``hook_name_out``; ``add_sae`` splices
  them from one hook to the other (:class:`hooked_vlm.sae.splice.SplicedTranscoder`). ReLU only, without input
  normalisation: sae_lens's transcoders have no TopK form and do not map a normalised output back, so those refuse.

    from hooked_vlm.sae.converters import load_vit_prisma_sae, load_saev_sae
    sae = load_vit_prisma_sae("path/to/prisma-sae-folder")       # cfg.metadata.hook_name: vision.blocks.9.hook_mlp_out
    model.add_sae(sae)

Not converted: the per-dataset activation scaling saev applies while training (not stored in the SAE file: scale
inputs yourself).
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hooked_vlm.names import canonical_hook_name

VIT_PRISMA = "vit_prisma"
SAEV = "saev"

def _architecture(activation: str, params: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    if activation.lower() in ("relu", "standard"):
        return "standard", {}
    if activation.lower() in ("topk", "batchtopk"):
        k = params.get("k", params.get("top_k"))
        if k is None:
            raise ValueError(f"{source}: a TopK SAE without k (activation kwargs {params})")
        return "topk", {"k": int(k)}
    raise ValueError(f"{source}: activation {activation!r} has no sae_lens equivalent (relu and topk do)")


def _cfg_dict(*, d_in: int, d_sae: int, architecture: str, extra: dict[str, Any], apply_b_dec_to_input: bool,
              normalize: str, hook_name: str, model_name: str, positions: str | None, device: str,
              source: str, overrides: dict[str, Any] | None, hook_name_out: str | None = None) -> dict[str, Any]:
    import sae_lens

    overrides = dict(overrides or {})
    metadata = {
        "model_name": model_name,
        "hook_name": overrides.pop("hook_name", hook_name),
        "hook_head_index": None,
        "positions": positions,
        "sae_lens_version": sae_lens.__version__,  # the dict is already in the 6.x layout: no legacy remapping
        "converted_from": source,
    }
    if hook_name_out is not None:
        metadata["hook_name_out"] = overrides.pop("hook_name_out", hook_name_out)
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize,
        "metadata": metadata,
        **extra,
    }
    cfg.update(overrides)
    return cfg


def _weights(state: dict[str, Tensor], d_in: int, d_sae: int, source: str, device: str,
             expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """The weights (by default an SAE's four), checked against the widths the config states (a mismatch names
    the tensor)."""
    expected = expected or {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{source}: the state dict lacks {missing} (it has {sorted(state)})")
    out = {}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, the config implies {shape}")
        out[key] = state[key].detach().to(device=device, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# ViT-Prisma


def _read_prisma(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "cfg" not in blob or "state_dict" not in blob:
            raise ValueError(f"{path} is not a ViT-Prisma SAE file: expected a dict with 'cfg' and 'state_dict'")
        if not isinstance(blob["cfg"], dict):
            raise ValueError(f"{path}: its 'cfg' is a pickled ViT-Prisma object; save it as a dict (vars(cfg))")
        return blob["cfg"], blob["state_dict"]
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a ViT-Prisma SAE folder")
    cfg = json.loads(config.read_text())
    weights = [path / "weights.pt"] if (path / "weights.pt").is_file() else sorted(path.glob("*.safetensors"))
    weights = weights or sorted(path.glob("*.pt"))
    if len(weights) != 1:
        raise FileNotFoundError(f"{path}: expected one weights file (weights.pt, *.safetensors or *.pt), found {weights}")
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(weights[0])
    else:
        state = torch.load(weights[0], map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    return cfg, state


def vit_prisma_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sae_lens disk converter for ViT-Prisma SAEs: ``SAE.load_from_disk(path, converter=vit_prisma_disk_loader)``."""
    path = Path(path)
    cfg, state = _read_prisma(path)
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("d_sae") or d_in * int(cfg["expansion_factor"]))
    architecture, extra = _architecture(cfg.get("activation_fn_str", "relu"), cfg.get("activation_fn_kwargs") or {},
                                        str(path))
    # ViT-Prisma's config.json holds the fields; hook_point is derived from them (older files store it)
    hook = cfg.get("hook_point") or f"blocks.{cfg['hook_point_layer']}.{cfg.get('layer_subtype', 'hook_mlp_out')}"
    normalize = cfg.get("normalize_activations") or "none"
    if cfg.get("is_transcoder"):
        return _prisma_transcoder(path, cfg, state, d_in, d_sae, architecture, hook, normalize, device, cfg_overrides)
    if normalize not in ("none", "layer_norm", "constant_norm_rescale"):
        raise ValueError(f"{path}: normalize_activations={normalize!r} has no sae_lens equivalent")
    return _cfg_dict(
        d_in=d_in, d_sae=d_sae, architecture=architecture, extra=extra, apply_b_dec_to_input=True, normalize=normalize,
        hook_name=canonical_hook_name(hook), model_name=cfg.get("model_name", "unknown"),
        positions="cls" if cfg.get("cls_token_only") else None, device=device, source=f"{VIT_PRISMA}:{path}",
        overrides=cfg_overrides,
    ), _weights(state, d_in, d_sae, str(path), device)


def _prisma_transcoder(
    path: Path, cfg: dict[str, Any], state: dict[str, Tensor], d_in: int, d_sae: int, architecture: str, hook: str,
    normalize: str, device: str, overrides: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A ViT-Prisma transcoder as sae_lens's ``Transcoder`` / ``SkipTranscoder`` (see the module docstring)."""
    if architecture != "standard":
        raise ValueError(f"{path}: a {architecture} transcoder; sae_lens's transcoders are ReLU (or JumpReLU) only")
    if normalize != "none":
        raise ValueError(
            f"{path}: normalize_activations={normalize!r}; sae_lens's transcoders normalise their input but do not map "
            "the output back with the input's statistics as ViT-Prisma does, so the outputs would differ"
        )
    d_out = int(cfg.get("d_out", d_in))
    skip = bool(cfg.get("transcoder_with_skip_connection"))
    if skip and d_out != d_in:
        raise ValueError(f"{path}: a skip connection x @ (I + W_skip.T) needs d_out == d_in, not {d_out} and {d_in}")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_in,),
              "b_dec_out": (d_out,)} | ({"W_skip": (d_in, d_in)} if skip else {})
    weights = _weights(state, d_in, d_sae, str(path), device, shapes)
    # sae_lens subtracts nothing from a transcoder's input: (x - b_dec) @ W_enc + b_enc = x @ W_enc + b_enc'
    converted = {"W_enc": weights["W_enc"], "b_enc": weights["b_enc"] - weights["b_dec"] @ weights["W_enc"],
                 "W_dec": weights["W_dec"], "b_dec": weights["b_dec_out"]}
    if skip:  # ViT-Prisma adds x @ (I + W_skip.T); sae_lens adds x @ W_skip.T
        converted["W_skip"] = torch.eye(d_in, device=device) + weights["W_skip"]
    out_layer = cfg.get("out_hook_point_layer", cfg.get("hook_point_layer"))
    hook_out = cfg.get("hook_point_out") or f"blocks.{out_layer}.{cfg.get('layer_out_subtype', 'hook_mlp_out')}"
    return _cfg_dict(
        d_in=d_in, d_sae=d_sae, architecture="skip_transcoder" if skip else "transcoder", extra={"d_out": d_out},
        apply_b_dec_to_input=False, normalize="none", hook_name=canonical_hook_name(hook),
        model_name=cfg.get("model_name", "unknown"), positions="cls" if cfg.get("cls_token_only") else None,
        device=device, source=f"{VIT_PRISMA}:{path}", overrides=overrides, hook_name_out=canonical_hook_name(hook_out),
    ), converted


# ---------------------------------------------------------------------------------------------------------------
# saev


def _read_saev(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if path.is_dir():
        files = sorted(path.glob("*.pt"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: expected one saev checkpoint (*.pt), found {files}")
        path = files[0]
    with open(path, "rb") as fd:
        try:
            header = json.loads(fd.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a saev SAE file: its first line is not a JSON header ({error})") from None
        state = torch.load(io.BytesIO(fd.read()), map_location="cpu", weights_only=True)
    schema = header.get("schema")
    if schema is None:  # the original format: the header is the config itself, ReLU
        cfg, activation, params = header, "Relu", {}
    elif schema in (1, 2):
        cfg = header["cfg"]
        spec = cfg.get("activation")
        if isinstance(spec, dict):
            activation, params = spec["cls"], spec.get("params", {})
        else:  # schema 1, first form: the activation's class name in "cls", its k among the config fields
            activation, params = header.get("cls", "Relu"), {"top_k": cfg.get("top_k", 32)}
            if activation == "SparseAutoencoderConfig":
                activation = "Relu"
    else:
        raise ValueError(f"{path}: saev schema {schema} is not known here (0, 1 and 2 are)")
    return {"d_vit": int(cfg["d_vit"]), "exp_factor": int(cfg["exp_factor"]), "activation": activation,
            "params": params}, state


def saev_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sae_lens disk converter for saev SAEs. The file does not record its hook: pass it in ``cfg_overrides``
    (``{"hook_name": "vision.blocks.11.hook_resid_post"}``), or use :func:`load_saev_sae` with ``layer=``."""
    path = Path(path)
    cfg, state = _read_saev(path)
    if not cfg_overrides or "hook_name" not in cfg_overrides:
        raise ValueError(f"{path}: a saev file does not record its layer; pass cfg_overrides={{'hook_name': ...}} "
                         "or load_saev_sae(path, layer=N)")
    d_in, d_sae = cfg["d_vit"], cfg["d_vit"] * cfg["exp_factor"]
    architecture, extra = _architecture(cfg["activation"], cfg["params"], str(path))
    overrides = dict(cfg_overrides)
    overrides["hook_name"] = canonical_hook_name(overrides["hook_name"])
    return _cfg_dict(
        d_in=d_in, d_sae=d_sae, architecture=architecture, extra=extra, apply_b_dec_to_input=False, normalize="none",
        hook_name=overrides["hook_name"], model_name=overrides.pop("model_name", "unknown"), positions=None,
        device=device, source=f"{SAEV}:{path}", overrides=overrides,
    ), _weights(state, d_in, d_sae, str(path), device)


# ---------------------------------------------------------------------------------------------------------------
# Loading, and sae_lens's registry of named loaders (for releases hosted on the Hub).


def load_vit_prisma_sae(path: str | Path, *, device: str = "cpu", hook_name: str | None = None) -> Any:
    """A ViT-Prisma SAE or transcoder (folder or ``.pt`` file) as a sae_lens ``SAE`` (``Transcoder``) with a
    canonical ``cfg.metadata.hook_name`` (and ``hook_name_out``)."""
    from sae_lens import SAE

    overrides = {"hook_name": hook_name} if hook_name else None
    return SAE.load_from_disk(path, device=device,
                              converter=functools.partial(_with_overrides, vit_prisma_disk_loader, overrides))


def load_saev_sae(path: str | Path, *, layer: int | None = None, hook_name: str | None = None,
                  device: str = "cpu", model_name: str = "unknown") -> Any:
    """A saev SAE file as a sae_lens ``SAE`` spliced (by ``add_sae``) after block ``layer``, or at ``hook_name``."""
    from sae_lens import SAE

    if (layer is None) == (hook_name is None):
        raise ValueError("pass exactly one of layer= (the block whose output it was trained on) or hook_name=")
    name = hook_name or f"vision.blocks.{layer}.hook_resid_post"
    overrides = {"hook_name": name, "model_name": model_name}
    return SAE.load_from_disk(path, device=device, converter=functools.partial(_with_overrides, saev_disk_loader, overrides))


def _with_overrides(loader: Any, fixed: dict[str, Any] | None, path: Any, device: str,
                    cfg_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return loader(path, device, cfg_overrides={**(fixed or {}), **(cfg_overrides or {})})


def _hub_loader(disk_loader: Any):
    def load(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
             cfg_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor], None]:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id, allow_patterns=[f"{folder_name}/*"] if folder_name else None,
                                 force_download=force_download)
        cfg, state = disk_loader(Path(root) / folder_name, device, cfg_overrides=cfg_overrides)
        return cfg, state, None

    load.__name__ = f"{disk_loader.__name__.removesuffix('_disk_loader')}_huggingface_loader"
    return load


vit_prisma_huggingface_loader = _hub_loader(vit_prisma_disk_loader)
saev_huggingface_loader = _hub_loader(saev_disk_loader)


def register() -> None:
    """Add both formats to sae_lens's named loaders, so a release whose ``conversion_func`` is ``vit_prisma`` or
    ``saev`` loads through ``SAE.from_pretrained`` (and ``converter=`` accepts the functions directly)."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault(VIT_PRISMA, vit_prisma_huggingface_loader)
    loaders.NAMED_PRETRAINED_SAE_LOADERS.setdefault(SAEV, saev_huggingface_loader)
