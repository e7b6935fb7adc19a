"""Activation patching, attribution patching, ablation and attention knockout on images and prompts.

TransformerLens's patching functions take token ids only. Here the clean and corrupted inputs are anything
:meth:`HookedVLM.prepare_inputs` accepts (images, images with a prompt, processor outputs, ``Prepared``), so
they may differ in the image, the prompt, or both, as long as every patched hook has the same shape in both
(same image size / tile count, same prompt token count).

Every sweep runs its patches in batches: the base input is repeated along the batch axis (for Qwen2-VL's packed
vision tower, along the packed sequence) and each copy gets a different patch in the same forward. Results are
:class:`PatchingResult` s: the readout per patch, with labelled ``layer`` / ``position`` / ``head`` axes and the
input layout, so positions map back to (image, tile, row, col) and to heatmaps over the image.

- :func:`activation_patching`: exact patching, denoising (clean into corrupted) or noising (corrupted into clean).
- :func:`attribution_patching`: gradient × activation difference for every requested hook from one forward
  and one backward (plus the clean forward).
- :func:`integrated_gradients`: the same with the gradient averaged along the path between the inputs, so a
  hook's attributions add up to the effect of patching it (``attribution_patching(ig_steps=)`` calls it).
- :func:`ablation`: zero / mean / given-value ablation, swept like patching; :func:`ablation_hooks` for one run.
- :func:`attention_knockout`: block attention from source positions (image tokens) to target positions over a
  window of layers, swept over layers; :func:`knockout_hooks` for one run.

Modules: :mod:`~hooked_vlm.patching.results` (results and their plots), :mod:`~hooked_vlm.patching.planning`
(what a sweep patches), :mod:`~hooked_vlm.patching.batching` (copies of an input in one forward, the prefix
replay), and one module per technique: :mod:`~hooked_vlm.patching.activation`,
:mod:`~hooked_vlm.patching.attribution`, :mod:`~hooked_vlm.patching.integrated_gradients`,
:mod:`~hooked_vlm.patching.ablation`, :mod:`~hooked_vlm.patching.knockout`. Positions are those of
:mod:`hooked_vlm.positions`.
"""

from hooked_vlm.patching.ablation import ablation, ablation_hooks, mean_activation
from hooked_vlm.patching.activation import activation_patching
from hooked_vlm.patching.attribution import attribution_patching
from hooked_vlm.patching.batching import repeat_inputs
from hooked_vlm.patching.integrated_gradients import default_interpolation, integrated_gradients
from hooked_vlm.patching.knockout import attention_knockout, knockout_hooks
from hooked_vlm.patching.planning import Hooks, position_mask
from hooked_vlm.patching.results import KnockoutResult, PatchingResult
from hooked_vlm.positions import PositionLabel, Positions, on_image_grid, position_labels

__all__ = [
    "Hooks",
    "KnockoutResult",
    "PatchingResult",
    "PositionLabel",
    "Positions",
    "ablation",
    "ablation_hooks",
    "activation_patching",
    "attention_knockout",
    "attribution_patching",
    "default_interpolation",
    "integrated_gradients",
    "knockout_hooks",
    "mean_activation",
    "on_image_grid",
    "position_labels",
    "position_mask",
    "repeat_inputs",
]
