"""Splicing sae_lens SAEs into a :class:`~hooked_vlm.HookedVLM`: the machinery lives in the core
(:mod:`hooked_vlm.sae_hooks`, so that ``HookedVLM`` does not depend on this optional package); its names stay
importable from here."""

from hooked_vlm.sae_hooks import (
    SAEHooksMixin,
    SAEShapeError,
    SplicedSAE,
    SplicedTranscoder,
    TranscoderInput,
    encode_at,
    flattens_heads,
    generated_tokens_selected,
    output_hook_name,
)

__all__ = [
    "SAEHooksMixin",
    "SAEShapeError",
    "SplicedSAE",
    "SplicedTranscoder",
    "TranscoderInput",
    "encode_at",
    "flattens_heads",
    "generated_tokens_selected",
    "output_hook_name",
]
