"""Training SAEs with sae_lens on image-driven activations.

sae_lens's ``SAETrainer`` takes any iterator of ``[batch, d_in]`` activations (``MultiSAETrainer`` one of
``{hook: [batch, d_in]}``); this module feeds it from a live model (:func:`~hooked_vlm.sae.activation_stream`),
from an :class:`~hooked_vlm.sae.ActivationStore`, or from any iterator of activation tensors, through sae_lens's
``mixing_buffer`` (rows of one image are correlated; the buffer shuffles rows of many images together and
yields the exact batch size the trainer counts with). The trained SAE gets its metadata (hook name, model name,
position selector, prompt, data source) and is saved in sae_lens's format (``cfg.json``,
``sae_weights.safetensors``, ``sparsity.safetensors``): ``sae_lens.SAE.load_from_disk(path)`` loads it.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

import hooked_vlm
from hooked_vlm.model import HookedVLM
from hooked_vlm.sae.harvesting import Positions, activation_stream, describe_positions, image_source, positions_for
from hooked_vlm.sae.store import ActivationStore, checkpoint_name, slug
from hooked_vlm.taps import current_device

if TYPE_CHECKING:
    from sae_lens import SAE, LoggingConfig, TrainingSAE


#: our name → sae_lens's architecture name (BatchTopK and Matryoshka SAEs are saved as JumpReLU SAEs)
ARCHITECTURES = {
    "standard": "standard",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "matryoshka": "matryoshka_batchtopk",
    "matryoshka_batchtopk": "matryoshka_batchtopk",
}

DEFAULT_ROOT = Path("models/checkpoints/saes")


@dataclass
class SAETrainingConfig:
    """How an SAE is trained. Every field can also be passed to :func:`train_sae` by name.

    The defaults target real runs on CLIP ViT-L/14 and VLM activations (shared/notes/saelens.md §4 gathers the
    published numbers); tests and the tiny-model example override the sizes.
    """

    # ---- the dictionary
    #: TopK fixes L0 directly, so no sparsity coefficient has to be tuned per hook; the vision SAEs with the best
    #: published explained variance at low L0 (CLIP-Scope, Pach et al. 2025) are TopK / Matryoshka-BatchTopK.
    architecture: str = "topk"
    #: d_sae = expansion_factor · d_in unless d_sae is given: 16 is ViT-Prisma's default and the low end of
    #: published vision SAEs (16–64); widen once a hook is known to be worth it.
    expansion_factor: int = 16
    d_sae: int | None = None
    #: active features per row (TopK) or per row on average (BatchTopK, Matryoshka): CLIP-Scope uses 32 on
    #: ViT-L/14, Pach et al. 20; LM-side VLM SAEs 32–256.
    k: int = 32
    #: standard / gated SAEs: sae_lens's default; the right value depends on d_in and the L0 wanted, so it has to
    #: be tuned per hook (one reason TopK is the default)
    l1_coefficient: float = 1.0
    #: JumpReLU: sae_lens's default for its L0 penalty
    l0_coefficient: float = 1.0
    #: Matryoshka: nested prefix widths; default d_sae/16, d_sae/4, d_sae (coarse features first)
    matryoshka_widths: list[int] | None = None
    #: scale inputs to an average norm of √d_in during training (estimated first, folded into the weights at the
    #: end, so the saved SAE takes raw activations): the same hyperparameters then work across hooks and layers,
    #: whose norms differ by orders of magnitude
    normalize_activations: str = "expected_average_only_in"
    #: any other field of the architecture's sae_lens training config (e.g. {"aux_loss_coefficient": 1/32})
    sae_kwargs: dict[str, Any] = field(default_factory=dict)

    # ---- optimisation
    #: rows to train on; default one pass over the data (the images, or the store's rows)
    training_samples: int | None = None
    #: rows per step: sae_lens's default, and the batch size of the published CLIP SAEs
    batch_size: int = 4096
    #: Adam learning rate: sae_lens's default, in the range used for TopK SAEs of this width
    lr: float = 3e-4
    #: the cosine schedule ends at lr_end (default lr / 10, what sae_lens's LM runner uses); sae_lens's trainer
    #: needs it set explicitly outside its runner
    lr_end: float | None = None
    lr_scheduler: str = "cosineannealing"
    #: linear warm-up; default 5% of the steps (early Adam steps on a fresh dictionary are the noisiest)
    lr_warm_up_steps: int | None = None
    lr_decay_steps: int = 0
    #: batches used to estimate the normalisation (not trained on): 100 × 4096 rows pin the mean norm to well
    #: under 1%; sae_lens's default of 1000 costs ten times the harvesting for no visible gain
    n_batches_for_norm_estimate: int = 100
    #: the mixing buffer holds this many batches (16 × 4096 rows ≈ 250 CLIP images' worth of tokens)
    buffer_batches: int = 16
    #: steps without firing after which a feature counts as dead (and TopK's auxiliary loss revives it)
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    seed: int = 0
    #: where the SAE trains: default the model's device (a store or iterator: CUDA if there is one)
    device: str | None = None
    #: bf16 autocast of the SAE step; default on for CUDA
    autocast: bool | None = None

    # ---- data from a live model
    #: a selector for every hook, or one per hook ({"vision.blocks.3.hook_resid_post": "patches", ...})
    positions: Positions = "all"
    prompt: str | None = None
    #: images per forward while harvesting
    harvest_batch_size: int = 16
    #: harvest through a compiled, truncated tower (hooked_vlm.compiled.CompiledHarvest; CLIP on a GPU): True,
    #: or torch.compile arguments
    compiled_harvest: bool | dict[str, Any] = False

    # ---- logging and checkpoints (sae_lens's own)
    #: log to this W&B project through sae_lens's LoggingConfig (None: no W&B)
    wandb_project: str | None = None
    #: a full sae_lens LoggingConfig, instead of wandb_project
    logger: LoggingConfig | None = None
    n_checkpoints: int = 0
    checkpoint_path: str | None = None


@dataclass
class TrainedSAE:
    """A trained SAE as ``SAE.load_from_disk`` gives it back, where it was saved, and its training curve."""

    sae: SAE
    path: Path
    losses: Float[Tensor, " steps"]  # total training loss per step
    mse_losses: Float[Tensor, " steps"]  # reconstruction part, on normalised activations


# ---------------------------------------------------------------------------------------------------------------
# Data sources.


@dataclass
class _Data:
    chunks: Iterator[dict[str, Tensor]]  # endless, unshuffled, [n, d_in] per hook
    d_in: dict[str, int]
    rows_per_pass: int | None
    metadata: dict[str, Any]  # shared by every hook's SAE
    positions: dict[str, Any]  # hook → the selector its rows were taken with (described), where known
    device: str


def _peek(chunks: Iterator[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Iterator[dict[str, Tensor]]]:
    first = next(chunks)
    return first, itertools.chain([first], chunks)


def _data(source: Any, hook_names: list[str], images: Any, config: SAETrainingConfig, model_name: str | None) -> _Data:

    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(source, HookedVLM):
        if images is None:
            raise ValueError("training from a live model needs images=")
        images = image_source(images)
        stream = activation_stream(source, images, hook_names, positions=config.positions, prompt=config.prompt,
                                   batch_size=config.harvest_batch_size, dtype=torch.float32,
                                   compiled=config.compiled_harvest, progress=False)
        first, chunks = _peek(stream)
        n_first = min(config.harvest_batch_size, len(images))
        metadata = {
            "model_name": model_name or checkpoint_name(source),
            "model_class_name": "HookedVLM",
            "model_family": source.adapter.family,
            "prompt": config.prompt,
            "dataset_path": images.description,
        }
        positions = {h: describe_positions(positions_for(config.positions, h)) for h in hook_names}
        rows = round(len(first[hook_names[0]]) / n_first * len(images))
        return _Data(chunks, {h: a.shape[-1] for h, a in first.items()}, rows, metadata, positions,
                     str(current_device(source.raw_model)))
    if isinstance(source, (str, os.PathLike)):
        source = ActivationStore(source)
    if isinstance(source, ActivationStore):
        missing = [h for h in hook_names if h not in source.hook_names]
        if missing:
            raise KeyError(f"{missing} not in the store at {source.path} (hooks: {source.hook_names})")
        chunks = source.stream(hook_names, config.batch_size, loop=True, seed=config.seed, dtype=torch.float32)
        manifest = source.manifest
        metadata = {
            "model_name": model_name or manifest["model"],
            "model_class_name": "HookedVLM",
            "prompt": manifest["prompt"],
            "dataset_path": f"activation store {source.path} ({manifest.get('source', '?')})",
        }
        positions = {h: source.positions(h) for h in hook_names}
        rows = source.n_rows[hook_names[0]]
        return _Data(chunks, {h: source.d_in(h) for h in hook_names}, rows, metadata, positions, gpu)
    if isinstance(source, Iterable):
        as_dicts = (x if isinstance(x, dict) else {hook_names[0]: x} for x in source)
        first, chunks = _peek(iter(as_dicts))
        missing = [h for h in hook_names if h not in first]
        if missing:
            raise KeyError(f"the activation iterator yields no {missing} (keys: {list(first)})")
        metadata = {"model_name": model_name, "dataset_path": "activation iterator"}
        return _Data(chunks, {h: first[h].shape[-1] for h in hook_names}, None, metadata, {}, gpu)
    raise TypeError(f"cannot train from a {type(source).__name__}: pass a HookedVLM (and images=), an "
                    "ActivationStore (or its folder), or an iterator of [n, d_in] activation tensors")


# ---------------------------------------------------------------------------------------------------------------
# SAEs and trainers.


def _metadata(hook_name: str | None, data: _Data) -> dict[str, Any]:
    """What the saved SAE records about where its training rows came from."""
    return {"hook_name": hook_name, **data.metadata, "positions": data.positions.get(hook_name),
            "hooked_vlm_version": hooked_vlm.__version__}


def _training_sae(hook_name: str | None, data: _Data, config: SAETrainingConfig) -> TrainingSAE:
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.architecture!r}; choose from {sorted(ARCHITECTURES)}")
    sae_class, config_class = get_sae_training_class(ARCHITECTURES[config.architecture])
    d_in = data.d_in[hook_name or "activations"]
    d_sae = config.d_sae or config.expansion_factor * d_in
    options = {
        "k": config.k,
        "l1_coefficient": config.l1_coefficient,
        "l0_coefficient": config.l0_coefficient,
        "matryoshka_widths": config.matryoshka_widths or sorted({max(1, d_sae // 16), max(1, d_sae // 4), d_sae}),
    }
    accepted = {f.name for f in fields(config_class)}
    options = {name: value for name, value in options.items() if name in accepted} | config.sae_kwargs
    sae_config = config_class(
        d_in=d_in,
        d_sae=d_sae,
        normalize_activations=config.normalize_activations,
        # sae_lens's convention for per-head attention outputs (it flattens [.., head, d_head] when spliced)
        reshape_activations="hook_z" if hook_name is not None and hook_name.endswith("hook_z") else "none",
        metadata=SAEMetadata(**_metadata(hook_name, data)),
        **options,
    )
    torch.manual_seed(config.seed)
    return sae_class(sae_config)


def _trainer_config(config: SAETrainingConfig, total: int, device: str):
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    steps = max(1, total // config.batch_size)
    logger = config.logger or LoggingConfig(log_to_wandb=config.wandb_project is not None,
                                            wandb_project=config.wandb_project or "hooked_vlm")
    return SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=config.batch_size,
        lr=config.lr,
        lr_end=config.lr_end if config.lr_end is not None else config.lr / 10,
        lr_scheduler_name=config.lr_scheduler,
        lr_warm_up_steps=config.lr_warm_up_steps if config.lr_warm_up_steps is not None else steps // 20,
        lr_decay_steps=config.lr_decay_steps,
        device=device,
        autocast=config.autocast if config.autocast is not None else torch.device(device).type == "cuda",
        dead_feature_window=config.dead_feature_window,
        feature_sampling_window=config.feature_sampling_window,
        n_checkpoints=config.n_checkpoints,
        checkpoint_path=config.checkpoint_path,
        logger=logger,
        n_batches_for_norm_estimate=config.n_batches_for_norm_estimate,
    )


class _LossRecorder:
    """Records each step's losses by wrapping a trainer's ``step`` (the seam ``fit`` and ``MultiSAETrainer`` call)."""

    def __init__(self, trainer: Any):
        self.losses: list[Tensor] = []
        self.mse_losses: list[Tensor] = []
        step = trainer.step

        def recording_step(batch: Tensor) -> Any:
            output = step(batch)
            self.losses.append(output.loss.detach().float())
            self.mse_losses.append(output.losses["mse_loss"].detach().float())
            return output

        trainer.step = recording_step

    def curves(self) -> tuple[Tensor, Tensor]:
        stack = lambda values: torch.stack(values).cpu() if values else torch.empty(0)  # noqa: E731
        return stack(self.losses), stack(self.mse_losses)


def _save(sae: TrainingSAE, trainer: Any, path: Path, device: str) -> SAE:
    from sae_lens import SAE
    from sae_lens.constants import SPARSITY_FILENAME
    from safetensors.torch import save_file

    sae.save_inference_model(path)
    save_file({"sparsity": trainer.log_feature_sparsity.detach().cpu().contiguous()}, path / SPARSITY_FILENAME)
    return SAE.load_from_disk(path, device=device)


def _output_path(output_path: str | os.PathLike | None, hook_name: str | None, config: SAETrainingConfig,
                 data: _Data) -> Path:
    if output_path is not None:
        return Path(output_path)
    positions = data.positions.get(hook_name, "given")
    d_sae = config.d_sae or config.expansion_factor * data.d_in[hook_name or "activations"]
    parts = [slug(hook_name or "sae"), slug(positions) if isinstance(positions, str) else "custom",
             f"{config.architecture}-{d_sae}"]
    return DEFAULT_ROOT / slug(data.metadata.get("model_name") or "activations") / "__".join(parts)


@dataclass
class _Run:
    data: _Data
    config: SAETrainingConfig
    total: int
    device: str


def _prepare(source, hook_names, images, config, model_name, fields_) -> _Run:
    config = replace(config or SAETrainingConfig(), **fields_)
    if config.architecture not in ARCHITECTURES:  # before any data is read or harvested
        raise ValueError(f"unknown architecture {config.architecture!r}; choose from {sorted(ARCHITECTURES)}")
    data = _data(source, hook_names, images, config, model_name)
    total = config.training_samples or data.rows_per_pass
    if total is None:
        raise ValueError("training from an activation iterator needs training_samples= (rows to train on)")
    _check_steps(total, config, looped=config.training_samples is not None)
    return _Run(data, config, total, config.device or data.device)


#: fewer optimiser steps than this and an SAE has barely moved from its initialisation (sae_lens's warm-up,
#: norm estimate and dead-feature windows alone are counted in hundreds of steps)
MIN_STEPS = 100


class FewStepsWarning(UserWarning):
    """A training run of so few steps that the SAE will hardly learn (see :data:`MIN_STEPS`)."""


def _check_steps(total: int, config: SAETrainingConfig, *, looped: bool) -> None:
    """Refuse a run of zero steps, warn about one of a handful, saying what to change (rows, batch, samples)."""
    steps = total // config.batch_size
    what = f"training_samples={total}" if looped else f"the data has {total} rows a pass"
    if steps == 0:
        raise ValueError(
            f"{what}, fewer than one batch of {config.batch_size} rows (batch_size, --batch-size): lower the batch "
            f"size to at most {total}, or train over several passes with training_samples (--training-samples), "
            f"e.g. {MIN_STEPS * config.batch_size}"
        )
    if steps < MIN_STEPS:
        warnings.warn(
            f"{what}: only {steps} training steps of {config.batch_size} rows; an SAE needs at least "
            f"~{MIN_STEPS}: train over several passes with training_samples (--training-samples) "
            f"{MIN_STEPS * config.batch_size}, lower batch_size (--batch-size) to {max(1, total // MIN_STEPS)}, or "
            "harvest more images",
            FewStepsWarning, stacklevel=4,
        )


def _check_losses(losses: Tensor, hook: str) -> None:
    if len(losses) > 1 and float(losses[-1]) >= float(losses[0]):
        warnings.warn(f"the loss of the SAE on {hook} did not fall ({float(losses[0]):.4g} → "
                      f"{float(losses[-1]):.4g}): train on more rows or with another lr", FewStepsWarning,
                      stacklevel=3)


@contextmanager
def _wandb_run(trainer_config: Any, config: SAETrainingConfig, metadata: dict[str, Any]) -> Iterator[None]:
    """A W&B run around training when sae_lens's logger asks for one (its trainer logs, but does not start runs)."""
    logger = trainer_config.logger
    if not logger.log_to_wandb:
        yield
        return
    import wandb

    settings = {k: v for k, v in asdict(config).items() if k != "logger"} | {"metadata": metadata}
    wandb.init(project=logger.wandb_project, entity=logger.wandb_entity, name=logger.run_name, id=logger.wandb_id,
               config=settings)
    try:
        yield
    finally:
        wandb.finish()


def train_sae(
    source: Any,
    hook_name: str | None = None,
    images: Any = None,
    *,
    output_path: str | os.PathLike | None = None,
    config: SAETrainingConfig | None = None,
    sae: TrainingSAE | None = None,
    model_name: str | None = None,
    **config_fields: Any,
) -> TrainedSAE:
    """Train one SAE on ``hook_name`` and save it in sae_lens's format.

    ``source``: a :class:`~hooked_vlm.HookedVLM` (with ``images=``: a list, a folder or a ``datasets.Dataset``),
    an :class:`~hooked_vlm.sae.ActivationStore` (or its folder), or an iterator of ``[n, d_in]`` tensors (then
    ``training_samples=`` is required and ``hook_name`` is only recorded). Settings: a
    :class:`SAETrainingConfig` and/or its fields by name (``architecture="jumprelu"``, ``k=64``, ...). ``sae``
    replaces the freshly initialised training SAE (fine-tuning, custom configs). Saved to ``output_path``
    (default ``models/checkpoints/saes/<model>/<hook>__<positions>__<arch>-<d_sae>``).

    Example:
        >>> trained = train_sae(model, "vision.blocks.12.hook_resid_post", images="photos/", positions="patches")
        >>> sae = trained.sae  # what sae_lens.SAE.load_from_disk(trained.path) returns
    """
    from sae_lens import SAETrainer
    from sae_lens.training.mixing_buffer import mixing_buffer

    hook = hook_name if hook_name is not None else "activations"
    run = _prepare(source, [hook], images, config, model_name, config_fields)
    config, data = run.config, run.data
    if sae is None:
        sae = _training_sae(hook_name, data, config)
    else:  # a given SAE keeps what its metadata already says, and learns where its training rows come from
        for key, value in _metadata(hook_name, data).items():
            if value is not None and getattr(sae.cfg.metadata, key) is None:
                setattr(sae.cfg.metadata, key, value)
    provider = mixing_buffer(buffer_size=config.buffer_batches * config.batch_size, batch_size=config.batch_size,
                             activations_loader=(chunk[hook] for chunk in data.chunks))
    trainer_config = _trainer_config(config, run.total, run.device)
    trainer = SAETrainer(cfg=trainer_config, sae=sae, data_provider=provider)
    recorder = _LossRecorder(trainer)
    with _wandb_run(trainer_config, config, data.metadata):
        try:
            trained = trainer.fit()
        finally:
            provider.close()  # the buffer's generator would otherwise complain at interpreter exit
    path = _output_path(output_path, hook_name, config, data)
    result = TrainedSAE(_save(trained, trainer, path, run.device), path, *recorder.curves())
    _check_losses(result.losses, hook)
    return result


def train_saes(
    source: Any,
    hook_names: Sequence[str],
    images: Any = None,
    *,
    output_path: str | os.PathLike | None = None,
    config: SAETrainingConfig | None = None,
    model_name: str | None = None,
    **config_fields: Any,
) -> dict[str, TrainedSAE]:
    """One SAE per hook, all fed by the same forwards (sae_lens's ``MultiSAETrainer``), with the same settings.

    The hooks must yield the same rows (one tower, one selector: e.g. several vision blocks), which are shuffled
    together. Each SAE is saved under ``output_path/<hook>`` (default: next to where :func:`train_sae` saves).
    """
    from sae_lens.training.mixing_buffer import multi_hook_concat_split_iter
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    hook_names = list(hook_names)
    run = _prepare(source, hook_names, images, config, model_name, config_fields)
    config, data = run.config, run.data
    first, chunks = _peek(data.chunks)
    counts = {h: len(first[h]) for h in hook_names}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"the hooks give different numbers of rows per forward {counts} (different towers or selectors); "
            "train them with separate train_sae calls, e.g. from one activation store"
        )
    saes = {h: _training_sae(h, data, config) for h in hook_names}
    provider = multi_hook_concat_split_iter(buffer_size=config.buffer_batches * config.batch_size,
                                            batch_size=config.batch_size, activations_loader=chunks,
                                            hook_names=hook_names)
    trainer_config = _trainer_config(config, run.total, run.device)
    trainer = MultiSAETrainer(cfg=trainer_config, saes=saes, hook_names={h: h for h in hook_names},
                              data_provider=provider)
    recorders = {h: _LossRecorder(trainer.trainers[h]) for h in hook_names}
    with _wandb_run(trainer_config, config, data.metadata):
        try:
            trained = trainer.fit()
        finally:
            provider.close()
    results = {}
    for h in hook_names:
        base = Path(output_path) / slug(h) if output_path is not None else None
        path = _output_path(base, h, config, data)
        results[h] = TrainedSAE(_save(trained[h], trainer.trainers[h], path, run.device), path, *recorders[h].curves())
        _check_losses(results[h].losses, h)
    return results
