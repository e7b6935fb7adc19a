"""Small helpers in the spirit of ``transformer_lens.utils``."""

from __future__ import annotations

from transformer_lens.utils import get_act_name

TOWERS = ("vision", "text", "lm")


def act_name(name: str, layer: int | str | None = None, layer_type: str | None = None, *, tower: str | None = None) -> str:
    """The canonical hooked_vlm name for TransformerLens shorthand, in ``tower``.

    ``act_name("resid_post", 3, tower="vision")`` → ``"vision.blocks.3.hook_resid_post"``;
    ``act_name("z5", tower="lm")`` → ``"lm.blocks.5.attn.hook_z"``; ``act_name("embed", tower="text")`` →
    ``"text.hook_embed"``; ``act_name("normalized", tower="lm")`` → ``"lm.ln_final.hook_normalized"``. The
    shorthand is TransformerLens's own (``get_act_name``: ``"k6"``, ``"scale4ln1"``, aliases such as
    ``"attn"`` → ``hook_pattern``); a full name (with a dot, or ``hook_…``) is returned as it is.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    if tower is None:
        raise ValueError(f"act_name({name!r}, ...) needs tower= one of {TOWERS}: every block name sits in a tower")
    if tower not in TOWERS:
        raise ValueError(f"tower={tower!r}: expected one of {TOWERS}")
    if isinstance(layer, int) and layer < 0:
        raise ValueError(f"layer={layer}: act_name does not know the tower's depth; pass a non-negative layer")
    return f"{tower}.{get_act_name(name, layer, layer_type)}"
