"""Command-line entries for Phase 1: harvest activations into a store, train an SAE on a store or a live model.

    hooked-vlm harvest [MODEL] --hook NAME [--hook NAME ...] [--images DIR | --dataset DIR] [--positions SEL]
                       [--prompt TEXT] [--out DIR] [--batch-size N] [--store-dtype bfloat16] [--compiled]
    hooked-vlm train-sae (--store DIR | MODEL --images DIR) --hook NAME [--architecture topk] [--k 32]
                       [--expansion-factor 16] [--training-samples N] [--out DIR] [--wandb-project NAME]
    hooked-vlm dashboard [MODEL] --sae DIR [--images DIR | --dataset DIR] [--readout clip] [--out DIR]

(or ``python -m hooked_vlm.sae harvest ...``). MODEL is as for ``hooked-vlm inspect`` (default ``tiny:clip``);
without ``--images`` / ``--dataset``, drawn sample images are used, so both commands run offline. ``--positions``
is a selector for every hook (``patches``) or one per hook (``--positions lm.blocks.5.hook_resid_post=image``,
repeated). A harvest into a folder that holds an interrupted store of the same settings resumes it.

Under ``torchrun`` the harvest is data-parallel: each rank puts the model on its own GPU (``cuda:LOCAL_RANK``; gloo
ranks on the CPU with ``--device cpu``), harvests its part of the images, and rank 0 merges the parts:

    torchrun --nproc_per_node N -m hooked_vlm.sae harvest MODEL --hook NAME --images DIR --out DIR
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hooked_vlm.cli import DTYPES, CLIError, load_for_command
from hooked_vlm.loading import DEFAULT_MODEL


def _images(args: argparse.Namespace) -> Any:
    if args.dataset:
        from datasets import load_from_disk

        return load_from_disk(args.dataset)
    if args.images:
        return args.images
    from hooked_vlm.testing import sample_image  # here: importing it imports torch, and --help must be quick

    return [sample_image(width=64 + 16 * (i % 4), height=64 + 8 * (i % 3), seed=i) for i in range(args.n_sample_images)]


def _positions(values: list[str] | None) -> Any:
    if not values:
        return "all"
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    pairs = [value.split("=", 1) for value in values]
    if any(len(pair) != 2 for pair in pairs):
        raise CLIError("--positions takes one selector, or HOOK=SELECTOR for each hook")
    return dict(pairs)


def _model(args: argparse.Namespace, device: str | None = None):
    return load_for_command(args.model, device or args.device, args.dtype)


def _user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Mistakes in what was asked for (hook names, selectors, folders) become a one-line CLIError."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CLIError:
            raise
        except KeyError as error:  # str() of a KeyError is its repr
            raise CLIError(error.args[0]) from error
        except (ValueError, FileNotFoundError, TypeError) as error:
            raise CLIError(str(error)) from error

    return run


@_user_errors
def cmd_harvest(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from hooked_vlm.sae.distributed import torchrun_group
    from hooked_vlm.sae.pipeline import default_workers
    from hooked_vlm.sae.store import harvest_to_store

    if args.workers is None:
        args.workers = default_workers()
        if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun: the node's cores are shared by its ranks
            args.workers = max(0, args.workers // int(os.environ["LOCAL_WORLD_SIZE"]))
    if args.workers < 0:
        raise CLIError(f"--workers {args.workers}: give 0 (load in one thread) or more")
    with torchrun_group(args.device) as device:  # under torchrun: this rank's GPU, in a process group
        store = harvest_to_store(
            _model(args, device), _images(args), args.hook, args.out, positions=_positions(args.positions),
            prompt=args.prompt, batch_size=args.batch_size,
            dtype=DTYPES[args.store_dtype] if args.store_dtype else None, shard_mb=args.shard_mb,
            overwrite=args.overwrite, compiled=args.compiled, workers=args.workers, preprocess=args.preprocess,
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(store)
    return 0


@contextmanager
def _warning_lines() -> Iterator[None]:
    """Warnings about the run itself (too few steps, a loss that did not fall) as one ``hooked-vlm:`` line."""
    from hooked_vlm.sae.train import FewStepsWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, FewStepsWarning):
            print(f"hooked-vlm: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


@_user_errors
def cmd_train(args: argparse.Namespace) -> int:
    from hooked_vlm.sae.store import ActivationStore
    from hooked_vlm.sae.train import train_sae

    fields = {
        "architecture": args.architecture, "expansion_factor": args.expansion_factor, "k": args.k,
        "batch_size": args.batch_size, "lr": args.lr, "wandb_project": args.wandb_project,
        "training_samples": args.training_samples,
    }
    if args.n_batches_for_norm_estimate is not None:
        fields["n_batches_for_norm_estimate"] = args.n_batches_for_norm_estimate
    if args.store:
        source, images = ActivationStore(args.store), None
    else:
        source, images = _model(args), _images(args)
        fields |= {"positions": _positions(args.positions), "prompt": args.prompt}
    with _warning_lines():
        trained = train_sae(source, args.hook, images, output_path=args.out, **fields)
    print(f"saved {type(trained.sae).__name__} (d_in {trained.sae.cfg.d_in}, d_sae {trained.sae.cfg.d_sae}) to "
          f"{trained.path}; loss {float(trained.losses[0]):.4g} → {float(trained.losses[-1]):.4g}")
    return 0


def add_commands(commands: Any) -> None:
    """Add the Phase 1 commands to an argparse sub-command set (``hooked_vlm.cli.build_parser``'s): each command
    is one ``cmd_*`` function and the lines that register it."""

    def common(command: argparse.ArgumentParser, several_hooks: bool) -> None:
        command.add_argument("model", nargs="?", default=None, metavar="MODEL",
                             help=f"hub id, open_clip:ARCH/TAG or tiny:NAME (default {DEFAULT_MODEL})")
        if several_hooks:
            command.add_argument("--hook", action="append", required=True,
                                 help="hook name (repeat for several: one forward feeds them all)")
        else:
            command.add_argument("--hook", required=True, help="hook name")
        command.add_argument("--images", help="a folder of images (read recursively, sorted)")
        command.add_argument("--dataset", help="a Hugging Face dataset saved with save_to_disk (its Image column)")
        command.add_argument("--n-sample-images", type=int, default=64,
                             help="drawn images when none are given (default: %(default)s)")
        command.add_argument("--positions", action="append",
                             help="selector, or HOOK=SELECTOR per hook (default: all)")
        command.add_argument("--prompt", help="what a VLM is asked about each image (default: none)")
        command.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
        command.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")

    harvest = commands.add_parser("harvest", help="harvest activations of images into a resumable store")
    common(harvest, several_hooks=True)
    harvest.add_argument("--out", help="store folder (default models/activations/<model>/<hooks>__<positions>)")
    harvest.add_argument("--batch-size", type=int, default=16, help="images per forward (default: %(default)s)")
    harvest.add_argument("--store-dtype", choices=sorted(DTYPES), help="dtype of the stored rows (default: the model's)")
    harvest.add_argument("--shard-mb", type=float, default=256.0, help="shard size in MB (default: %(default)s)")
    harvest.add_argument("--overwrite", action="store_true", help="start a store of other settings over")
    harvest.add_argument("--compiled", action="store_true", help="torch.compile the truncated tower (CLIP, GPU)")
    harvest.add_argument("--workers", type=int, default=None,
                         help="processes that decode and prepare images (0: one thread; default: every core but one, "
                              "at most 32)")
    harvest.add_argument("--preprocess", choices=["processor", "gpu"], default="processor",
                         help="processor: the checkpoint's processor on the CPU; gpu: nvJPEG decode and the same "
                              "resize/crop/normalise on the GPU (fixed-size processors: CLIP, SigLIP, open_clip) "
                              "(default: %(default)s)")
    harvest.set_defaults(run=cmd_harvest)

    train = commands.add_parser("train-sae", help="train an SAE (sae_lens) on a store or a live model")
    common(train, several_hooks=False)
    train.add_argument("--store", help="an activation store folder (instead of MODEL and images)")
    train.add_argument("--architecture", default="topk",
                       choices=["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"],
                       help="sae_lens SAE architecture (default: %(default)s)")
    train.add_argument("--expansion-factor", type=int, default=16,
                       help="SAE width / hook width (default: %(default)s)")
    train.add_argument("--k", type=int, default=32, help="active features per row of topk/batchtopk (default: %(default)s)")
    train.add_argument("--training-samples", type=int,
                       help="rows to train on; more than the store holds loops over it (default: one pass over the "
                            "rows; a run needs at least 100 × --batch-size rows to learn)")
    train.add_argument("--batch-size", type=int, default=4096, help="rows per training step (default: %(default)s)")
    train.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    train.add_argument("--n-batches-for-norm-estimate", type=int,
                       help="batches for the activation-norm estimate (default: 100)")
    train.add_argument("--wandb-project", help="log to W&B through sae_lens")
    train.add_argument("--out", help="SAE folder (default models/checkpoints/saes/...)")
    train.set_defaults(run=cmd_train)
    add_aesthetic_command(commands)
    add_dashboard_command(commands)


@_user_errors
def cmd_aesthetic(args: argparse.Namespace) -> int:
    """``aesthetic-features``: rank SAE features by association with image scores (see hooked_vlm.sae.aesthetic)."""
    from sae_lens import SAE

    from hooked_vlm.sae.aesthetic import aesthetic_features, aesthetic_readout

    sae = SAE.load_from_disk(args.sae)
    with_model = args.model is not None or args.images is not None or args.dataset is not None
    model = _model(args) if with_model else None
    images = _images(args) if with_model else None
    readout = aesthetic_readout(model, args.readout, path=args.laion_path) if model is not None and args.readout else None
    scores = readout if args.scores == "readout" else args.scores
    if scores is readout is None:
        raise CLIError("--scores readout needs MODEL, --images or --dataset, and --readout")
    out = args.out or f"models/features/aesthetic/{(args.hook or sae.cfg.metadata.hook_name or 'sae').replace('/', '_')}"
    result = aesthetic_features(
        args.store, sae, scores, model=model, images=images, readout=readout, out_dir=out, hook_name=args.hook,
        reduce=args.reduce, statistic=args.statistic, n_permutations=args.n_permutations, quantile=args.quantile,
        alpha=args.alpha, column=args.column, id_column=args.id_column, prompt=args.prompt,
    )
    for row in result.top(5):
        print(f"feature {row['feature']}: rho {row['spearman']:+.3f}, d {row['cohens_d']:+.2f}, q {row['q_value']:.3g}")
    print(f"{result.summary['n_significant']} features with q <= {args.alpha}; wrote {out}/features.csv, summary.json")
    return 0


def add_aesthetic_command(commands: Any) -> None:
    """``aesthetic-features --store DIR --sae DIR --scores CSV|DATASET|split:POS,NEG|readout [MODEL --images DIR]``."""
    command = commands.add_parser("aesthetic-features", help="rank SAE features by association with aesthetic scores")
    command.add_argument("model", nargs="?", default=None, metavar="MODEL", help="for causal effects and galleries")
    for flag, text in [("--store", "activation store folder"), ("--sae", "SAE folder (sae_lens format)"),
                       ("--scores", "CSV, saved dataset, split:POS,NEG, or 'readout'")]:
        command.add_argument(flag, required=True, help=text)
    command.add_argument("--column", help="score column (CSV or dataset)")
    command.add_argument("--id-column", help="image id column (CSV or dataset)")
    command.add_argument("--hook", help="hook in the store (default: the SAE's)")
    command.add_argument("--reduce", choices=["max", "mean"], default="max")
    command.add_argument("--statistic", choices=["spearman", "pearson"], default="spearman")
    command.add_argument("--n-permutations", type=int, default=1000)
    command.add_argument("--quantile", type=float, default=0.2)
    command.add_argument("--alpha", type=float, default=0.05)
    command.add_argument("--readout", choices=["clip", "laion", "vlm"], help="readout for scores and causal effects")
    command.add_argument("--laion-path", help="LAION aesthetic predictor weights (--readout laion)")
    command.add_argument("--images", help="the folder the store was harvested from")
    command.add_argument("--dataset", help="the saved dataset the store was harvested from")
    command.add_argument("--n-sample-images", type=int, default=64)
    command.add_argument("--prompt")
    command.add_argument("--device", choices=["cpu", "cuda"])
    command.add_argument("--dtype", choices=sorted(DTYPES))
    command.add_argument("--out", help="output folder (default models/features/aesthetic/<hook>)")
    command.set_defaults(run=cmd_aesthetic)


@_user_errors
def cmd_dashboard(args: argparse.Namespace) -> int:
    """``dashboard``: the HTML feature dashboard of an SAE over images (see hooked_vlm.sae.dashboard)."""
    from sae_lens import SAE

    from hooked_vlm.sae.aesthetic import aesthetic_readout
    from hooked_vlm.sae.dashboard import feature_dashboard

    sae = SAE.load_from_disk(args.sae)
    model = _model(args)
    features = [int(f) for f in args.features.split(",")] if args.features else None
    readout = aesthetic_readout(model, args.readout, path=args.laion_path) if args.readout else ()
    result = feature_dashboard(
        model, sae, _images(args), args.out, features=features, max_features=args.max_features,
        positions=_positions(args.positions) if args.positions else None, prompt=args.prompt,
        n_images=args.n_images, bins=args.bins, readouts=readout, n_effect_images=args.n_effect_images,
        batch_size=args.batch_size,
    )
    print(f"wrote {result.page} ({len(result.features)} features) and {result.index}")
    return 0


def add_dashboard_command(commands: Any) -> None:
    """``dashboard [MODEL] --sae DIR [--images DIR | --dataset DIR] [--readout clip|laion|vlm] [--out DIR]``."""
    command = commands.add_parser("dashboard", help="write an HTML dashboard of an SAE's features (and an index)")
    command.add_argument("model", nargs="?", default=None, metavar="MODEL",
                         help=f"hub id, open_clip:ARCH/TAG or tiny:NAME (default {DEFAULT_MODEL})")
    command.add_argument("--sae", required=True, help="SAE folder (sae_lens format)")
    command.add_argument("--images", help="a folder of images (read recursively, sorted)")
    command.add_argument("--dataset", help="a Hugging Face dataset saved with save_to_disk (its Image column)")
    command.add_argument("--n-sample-images", type=int, default=64,
                         help="drawn images when none are given (default: %(default)s)")
    command.add_argument("--positions", action="append", help="selector (default: the SAE's training positions)")
    command.add_argument("--prompt", help="what a VLM is asked about each image (default: the SAE's)")
    command.add_argument("--features", help="comma-separated features (default: the strongest --max-features)")
    command.add_argument("--max-features", type=int, default=64, help="features shown (default: %(default)s)")
    command.add_argument("--n-images", type=int, default=12, help="top images per feature (default: %(default)s)")
    command.add_argument("--bins", type=int, default=30, help="activation histogram bins (default: %(default)s)")
    command.add_argument("--readout", choices=["clip", "laion", "vlm"], help="readout whose ablation effect is shown")
    command.add_argument("--laion-path", help="LAION aesthetic predictor weights (--readout laion)")
    command.add_argument("--n-effect-images", type=int, default=16,
                         help="images the readout effects average over (default: %(default)s)")
    command.add_argument("--batch-size", type=int, default=16, help="images per forward (default: %(default)s)")
    command.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    command.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")
    command.add_argument("--out", help="output folder (default models/features/<model>/<hook>/dashboard)")
    command.set_defaults(run=cmd_dashboard)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hooked_vlm.sae ...``: :func:`hooked_vlm.cli.main`, which parses every command."""
    from hooked_vlm.cli import main

    return main(argv, prog="python -m hooked_vlm.sae")
