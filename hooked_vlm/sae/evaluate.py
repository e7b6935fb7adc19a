"""How good an SAE is on held-out images: reconstruction, sparsity, and what splicing it costs downstream.

One pass over the images computes, on the rows the SAE was trained on (its position selector):

- explained variance ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (x̄: the mean row), mean squared error per row, mean cosine
  of x and x̂;
- L0 (active features per row), the fraction of dead features (never active on these images) and of dense
  features (active on more than ``dense_threshold`` of the rows);
- the downstream cost of splicing the SAE (no error term) at those positions, against the clean model and
  against zero-ablating the same positions: for a VLM the LM's next-token cross-entropy on the text tokens
  and the KL divergence from the clean next-token distribution (nats per token), with the fraction of the
  zero-ablation loss the SAE recovers; for CLIP the cosine of the spliced and clean image embeddings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.layout import Kind, Selector
from hooked_vlm.sae.harvesting import describe_positions, image_source, model_inputs, take
from hooked_vlm.sae.splice import encode_at

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_vlm.model import HookedVLM


@dataclass
class SAEReport:
    """The evaluation of one SAE on one image set (see the module docstring for the definitions)."""

    hook_name: str
    architecture: str
    d_in: int
    d_sae: int
    positions: Any
    n_images: int
    n_rows: int
    explained_variance: float
    mse: float
    cosine: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    #: CLIP: embed_cosine_spliced, embed_cosine_zero_ablation; VLMs: ce_clean, ce_spliced, ce_zero_ablation,
    #: ce_loss_recovered, kl_spliced, kl_zero_ablation
    downstream: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"# SAE report: `{self.hook_name}`",
            "",
            f"- SAE: {self.architecture}, d_in {self.d_in}, d_sae {self.d_sae}",
            f"- data: {self.n_images} held-out images, {self.n_rows} rows (positions: {self.positions})",
            "",
            "| metric | value |",
            "|---|---|",
            f"| explained variance | {self.explained_variance:.4f} |",
            f"| MSE per row | {self.mse:.4g} |",
            f"| cosine(x, x̂) | {self.cosine:.4f} |",
            f"| L0 | {self.l0:.2f} |",
            f"| dead features | {self.dead_fraction:.2%} |",
            f"| dense features (> {self.dense_threshold:.0%} of rows) | {self.dense_fraction:.2%} |",
        ]
        lines += [f"| {name} | {value:.4g} |" for name, value in self.downstream.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.json`` and ``<path>.md``; returns the markdown path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(self.to_dict(), indent=1))
        markdown = path.with_suffix(".md")
        markdown.write_text(self.to_markdown())
        return markdown


def trained_positions(sae: SAE) -> Selector:
    """The position selector recorded in the SAE's metadata when it was trained here (``"all"`` otherwise)."""
    described = sae.cfg.metadata.positions
    if described is None:
        return "all"
    if isinstance(described, dict) and "patch_mask" in described:
        return torch.tensor(described["patch_mask"], dtype=torch.bool)
    if isinstance(described, str) and not described.startswith("callable:"):
        return described
    raise ValueError(f"the SAE was trained with positions {described!r}; pass positions= to evaluate it")


class _Totals:
    """Running sums over batches."""

    def __init__(self, d_sae: int):
        self.rows = 0
        self.squared_error = 0.0
        self.row_sum: Tensor | None = None
        self.squared_norm = 0.0
        self.cosine = 0.0
        self.active = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.downstream: dict[str, float] = {}
        self.downstream_weight: dict[str, float] = {}

    def add_rows(self, x: Tensor, recon: Tensor, features: Tensor) -> None:
        x, recon = x.double(), recon.double()
        self.rows += len(x)
        self.squared_error += float(((x - recon) ** 2).sum())
        self.row_sum = x.sum(0) if self.row_sum is None else self.row_sum + x.sum(0)
        self.squared_norm += float((x**2).sum())
        self.cosine += float(F.cosine_similarity(x, recon, dim=-1).sum())
        fired = features > 0
        self.active += float(fired.sum())
        self.fired += fired.sum(0).cpu()

    def add(self, name: str, value: Tensor, weight: int) -> None:
        """A downstream metric, averaged with ``weight`` (tokens or images) across batches."""
        self.downstream[name] = self.downstream.get(name, 0.0) + float(value) * weight
        self.downstream_weight[name] = self.downstream_weight.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {name: total / self.downstream_weight[name] for name, total in self.downstream.items()}


def _zero_at(layout: Any, positions: Selector):
    """A hook zeroing the selected positions of its activation (all of it for pooled hooks)."""

    def hook(tensor: Tensor, hook) -> Tensor:
        if tensor.dim() == 2:
            return torch.zeros_like(tensor)
        mask = layout.mask(positions, hook.name).to(tensor.device)
        return tensor.masked_fill(mask.view(*mask.shape, *[1] * (tensor.dim() - 2)), 0)

    return hook


def _downstream(prepared: Any, clean: Tensor, spliced: Tensor, zeroed: Tensor, totals: _Totals) -> None:
    if clean.dim() == 3:  # LM logits [batch, seq, vocab]: next-token loss where the next token is text
        targets = prepared.kwargs["input_ids"][:, 1:]
        text = (prepared.layout["lm"].kind[:, 1:] == Kind.TEXT).to(targets.device)
        n = int(text.sum())
        if n == 0:
            return
        log_p = {name: logits[:, :-1][text].float().log_softmax(-1)
                 for name, logits in (("clean", clean), ("spliced", spliced), ("zero_ablation", zeroed))}
        for name, values in log_p.items():
            totals.add(f"ce_{name}", F.nll_loss(values, targets[text]), n)
        for name in ("spliced", "zero_ablation"):
            kl = F.kl_div(log_p[name], log_p["clean"], log_target=True, reduction="batchmean")
            totals.add(f"kl_{name}", kl, n)
    else:  # pooled embeddings [batch, d]
        totals.add("embed_cosine_spliced", F.cosine_similarity(clean.float(), spliced.float(), dim=-1).mean(), len(clean))
        totals.add("embed_cosine_zero_ablation", F.cosine_similarity(clean.float(), zeroed.float(), dim=-1).mean(), len(clean))


@torch.no_grad()
def evaluate_sae(
    model: HookedVLM,
    sae: SAE,
    images: Any,
    *,
    positions: Selector | None = None,
    prompt: str | None = None,
    batch_size: int = 16,
    dense_threshold: float = 0.1,
    downstream: bool = True,
    progress: bool = True,
) -> SAEReport:
    """Evaluate ``sae`` at its hook on ``images`` (held out from training): see the module docstring.

    ``positions`` (default: the selector it was trained with, from its metadata) are the rows measured and the
    positions spliced; ``prompt`` (default: its training prompt) is what a VLM sees with each image.
    """
    hook = sae.cfg.metadata.hook_name
    model.hook_point(hook)  # an unknown hook raises before any work
    if sae.cfg.metadata.hook_name_out not in (None, hook):
        raise ValueError(
            f"a transcoder ({hook!r} → {sae.cfg.metadata.hook_name_out!r}): evaluate_sae measures how well an SAE "
            "reconstructs its own hook, which is not what a transcoder computes; it is not evaluated here"
        )
    positions = trained_positions(sae) if positions is None else positions
    prompt = sae.cfg.metadata.prompt if prompt is None else prompt
    source = image_source(images)
    totals = _Totals(sae.cfg.d_sae)
    for first in tqdm(range(0, len(source), batch_size), desc="evaluate", disable=not progress):
        prepared = model.prepare_inputs(**model_inputs(model, source.load(first, first + batch_size), prompt))
        clean, cache = model.run_with_cache(prepared, names_filter=[hook], stop_early=not downstream)
        act = cache[hook]
        features = encode_at(sae, hook, act)
        recon = sae.decode(features)
        totals.add_rows(*(take(cache.layout, hook, t, positions) for t in (act.to(recon.device), recon, features)))
        if downstream:
            pooled = act.dim() == 2
            spliced = model.run_with_saes(prepared, saes=[sae], sae_positions=None if pooled else positions)
            zeroed = model.run_with_hooks(prepared, fwd_hooks=[(hook, _zero_at(prepared.layout, positions))])
            _downstream(prepared, clean, spliced, zeroed, totals)
    mean = totals.row_sum / totals.rows
    variance = totals.squared_norm - totals.rows * float((mean**2).sum())
    metrics = totals.means()
    if "ce_clean" in metrics:
        lost = metrics["ce_zero_ablation"] - metrics["ce_clean"]
        metrics["ce_loss_recovered"] = (metrics["ce_zero_ablation"] - metrics["ce_spliced"]) / lost if lost else float("nan")
    density = totals.fired.double() / totals.rows
    return SAEReport(
        hook_name=hook,
        architecture=sae.cfg.architecture(),
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        positions=describe_positions(positions),
        n_images=len(source),
        n_rows=totals.rows,
        explained_variance=1 - totals.squared_error / variance,
        mse=totals.squared_error / totals.rows,
        cosine=totals.cosine / totals.rows,
        l0=totals.active / totals.rows,
        dead_fraction=float((totals.fired == 0).double().mean()),
        dense_fraction=float((density > dense_threshold).double().mean()),
        dense_threshold=dense_threshold,
        downstream=metrics,
    )
