"""Feature dashboards: a static HTML page per SAE, in the layout of SAEDashboard and Neuronpedia, and an index.

:func:`feature_dashboard` writes, for one SAE, a page with a card per feature: its statistics (density, mean and
maximum activation), the histogram of its non-zero activations over every selected row, what its decoder
direction does to the output (the top positive and negative logits for a hook in the language model's residual
stream) and to readouts (the exact effect of ablating it, and the first-order estimate, from
:func:`~hooked_vlm.sae.aesthetic.causal_effects`), its association with an aesthetic score when an
:class:`~hooked_vlm.sae.aesthetic.AestheticFeatures` is given, and its top-activating images with the per-patch
heatmap (:func:`~hooked_vlm.sae.features.feature_gallery`, from a :class:`~hooked_vlm.sae.features.FeatureScan`).
``index.html`` in the same folder lists every SAE page written there (``dashboards.json`` keeps the list).

The pages open from disk without a server or a network: links are relative, the styles are inline, histograms
are inline SVG (their counts in ``data-count`` attributes), and images are PNG files in a folder beside the page.
Files rather than data URIs: a page of 64 galleries stays a few kB of HTML that the browser lays out at once and
loads the images lazily, the galleries can be reused in notes and slides as they are, and a page regenerated
for other features does not carry the old images inline.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import datetime
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vlm.names import RESIDUAL_WIDTH_SUFFIXES, block_parts
from hooked_vlm.sae.evaluate import trained_positions
from hooked_vlm.sae.features import (
    DEFAULT_ROOT,
    FeatureScan,
    density_histogram,
    feature_gallery,
    feature_rows,
    scan_features,
)
from hooked_vlm.sae.harvesting import describe_positions
from hooked_vlm.sae.splice import output_hook_name
from hooked_vlm.sae.store import slug

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_vlm.model import HookedVLM
    from hooked_vlm.readouts import Readout
    from hooked_vlm.sae.aesthetic import AestheticFeatures, CausalEffects

MANIFEST = "dashboards.json"


@dataclass
class Histogram:
    """Counts of a feature's non-zero activations in ``len(edges) - 1`` equal bins from 0 to its maximum (a bin
    holds ``edges[i] <= a < edges[i + 1]``, the last one its right edge and anything above: ``numpy.histogram``'s
    rule, with a value a hair over the scan's maximum, as another batch size can round it, kept in the last bin)."""

    edges: Float[Tensor, " bins_plus_1"]
    counts: Int[Tensor, " bins"]


@dataclass
class FeatureDashboard:
    """What :func:`feature_dashboard` wrote, and the numbers on the page."""

    page: Path
    index: Path
    features: list[int]
    scan: FeatureScan
    histograms: dict[int, Histogram]
    logits: dict[int, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)
    effects: list[CausalEffects] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def feature_dashboard(
    model: HookedVLM,
    sae: SAE,
    images: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    scan: FeatureScan | None = None,
    features: Sequence[int] | None = None,
    max_features: int = 64,
    positions: Any = None,
    prompt: str | None = None,
    n_images: int = 12,
    tile: int = 0,
    bins: int = 30,
    readouts: Readout | Sequence[Readout] = (),
    n_effect_images: int = 16,
    aesthetic: AestheticFeatures | None = None,
    n_logits: int = 10,
    name: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> FeatureDashboard:
    """Write the dashboard page of ``sae`` over ``images`` into ``out_dir`` and refresh the folder's index.

    ``scan`` (from :func:`~hooked_vlm.sae.features.scan_features` over the same images and ``positions``) saves
    the first pass; otherwise it is computed here, keeping ``n_images`` top images per feature. ``features``
    (default: the ``max_features`` live features with the highest maximum activation) get a card each. A second
    pass over the images counts every feature's activations into ``bins`` bins. Heatmaps are drawn over grid
    ``tile`` (as :func:`~hooked_vlm.sae.features.feature_gallery`). ``readouts`` are ablated through:
    each card gives the mean change of each readout over the first ``n_effect_images`` images when the feature
    is set to 0 (SAE spliced with its error term), and the first-order estimate. ``out_dir`` defaults to
    ``models/features/<model>/<hook>/dashboard``; the page is ``<name>.html`` (default: model, hook,
    architecture and width), its images are in the folder ``<name>/``. Returns what was written.
    """
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("the SAE has no cfg.metadata.hook_name: it does not say which hook it reads")
    model.hook_point(hook)  # an unknown hook raises here, before any image is loaded
    if (images is None) == (scan is None):
        raise ValueError("pass images= (scanned here) or scan= (a FeatureScan of the images), one of them")
    if features is not None:
        wrong = [int(f) for f in features if not 0 <= int(f) < sae.cfg.d_sae]
        if wrong:
            raise ValueError(f"features {wrong} are not features of this SAE (0 to {sae.cfg.d_sae - 1})")
    positions = trained_positions(sae) if positions is None else positions
    prompt = sae.cfg.metadata.prompt if prompt is None else prompt
    if scan is None:
        scan = scan_features(
            model,
            sae,
            images,
            positions=positions,
            prompt=prompt,
            top_k=n_images,
            batch_size=batch_size,
            progress=progress,
        )
    elif scan.hook_name != hook or scan.fired.shape[0] != sae.cfg.d_sae:
        raise ValueError(
            f"the scan is of {scan.hook_name!r} with {scan.fired.shape[0]} features, the SAE reads "
            f"{hook!r} with {sae.cfg.d_sae}"
        )
    if scan.positions != describe_positions(positions):
        raise ValueError(
            f"the scan was over positions {scan.positions!r}, not {describe_positions(positions)!r}: "
            "pass the positions it was made with"
        )
    prompt = scan.prompt  # the readout effects run the images as the scan saw them
    chosen = [int(f) for f in features] if features is not None else _strongest_features(scan, max_features)
    readouts = [readouts] if not isinstance(readouts, (list, tuple)) else list(readouts)

    out = Path(out_dir) if out_dir is not None else DEFAULT_ROOT / slug(scan.model_name) / slug(hook) / "dashboard"
    name = slug(name or f"{scan.model_name}__{hook}__{type(sae).__name__}{sae.cfg.d_sae}")
    pictures = out / name
    pictures.mkdir(parents=True, exist_ok=True)

    histograms = activation_histograms(
        model, sae, scan, chosen, positions, bins=bins, batch_size=batch_size, progress=progress
    )
    logits = decoder_logits(model, sae, chosen, n_logits) if writes_to_lm_residual(model, sae) else {}
    effects = []
    if readouts and chosen:
        from hooked_vlm.sae.aesthetic import _subset, causal_effects

        subset = _subset(scan.source, n_effect_images)
        effects = [
            causal_effects(
                model,
                sae,
                subset,
                readout,
                chosen,
                positions=positions,
                prompt=prompt,
                batch_size=batch_size,
                progress=progress,
            )
            for readout in readouts
        ]
    association = {row["feature"]: row for row in aesthetic.rows} if aesthetic is not None else {}

    files = [density_histogram(scan, pictures / "density.png")]
    cards = []
    for f in tqdm(chosen, desc="dashboard features", disable=not progress):
        gallery = feature_gallery(model, sae, scan, f, pictures / f"feature_{f}.png", n=n_images, tile=tile)
        files.append(gallery)
        cards.append(
            _card(
                scan,
                f,
                histograms[f],
                logits.get(f),
                effects,
                association.get(f),
                os.path.relpath(gallery, out),
                n_images,
            )
        )
    page = out / f"{name}.html"
    page.write_text(_page(scan, sae, chosen, cards, os.path.relpath(files[0], out), name, effects, aesthetic))
    index = write_index(
        out,
        {
            "page": page.name,
            "model": scan.model_name,
            "hook": hook,
            "architecture": type(sae).__name__,
            "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae),
            "images": len(scan.source),
            "rows": scan.n_rows,
            "dead": int((scan.fired == 0).sum()),
            "features": len(chosen),
            "written": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        },
    )
    return FeatureDashboard(page, index, chosen, scan, histograms, logits, effects, files)


def _strongest_features(scan: FeatureScan, max_features: int) -> list[int]:
    """The live features with the highest maximum activation, strongest first."""
    d_sae = scan.fired.shape[0]
    strongest = scan.top_values[:, 0] if scan.top_values.shape[1] else torch.zeros(d_sae)
    order = strongest.argsort(descending=True, stable=True)
    return [int(f) for f in order[:max_features] if scan.fired[f] > 0]


@torch.no_grad()
def activation_histograms(
    model: HookedVLM,
    sae: SAE,
    scan: FeatureScan,
    features: Sequence[int],
    positions: Any,
    *,
    bins: int = 30,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, Histogram]:
    """Per feature, the histogram of its non-zero activations over every selected row of the scan's images, in
    ``bins`` bins from 0 to the feature's maximum (known from the scan). One pass over the images."""
    columns = torch.tensor([int(f) for f in features], dtype=torch.long)
    tops = scan.top_values[columns, 0].double() if len(columns) else torch.zeros(0, dtype=torch.float64)
    edges = [torch.linspace(0.0, float(top), bins + 1, dtype=torch.float64) for top in tops.clamp(min=0)]
    counts = torch.zeros(len(columns), bins, dtype=torch.long)
    if len(columns):
        for rows, _ in feature_rows(
            model, sae, scan.source, positions, scan.prompt, batch_size, progress, desc="activation histograms"
        ):
            values = rows[:, columns].double()
            for j in range(len(columns)):
                fired = values[:, j][values[:, j] > 0]
                # the inner edges, right=True: edges[i] <= a < edges[i + 1]; the maximum falls in the last bin
                which = torch.bucketize(fired, edges[j][1:-1], right=True)
                counts[j] += torch.bincount(which, minlength=bins)[:bins]
    # edges stay float64: the page writes them exactly as they were counted with
    return {int(f): Histogram(edges[j], counts[j]) for j, f in enumerate(columns.tolist())}


def writes_to_lm_residual(model: HookedVLM, sae: SAE) -> bool:
    """Whether the SAE's decoder writes into the language model's residual stream (a per-block residual-width
    hook of the LM, its input embeddings, or the projector's output), where decoder rows can be unembedded."""
    hook = output_hook_name(sae)
    parts = block_parts(hook)
    in_lm = (parts is not None and parts[0] == "lm" and parts[2] in RESIDUAL_WIDTH_SUFFIXES) or hook in (
        "lm.hook_embed",
        "projector.hook_out",
    )
    if not in_lm or getattr(sae.cfg, "normalize_activations", "none") == "layer_norm":
        return False
    from hooked_vlm.decomposition import unembedding

    try:
        return unembedding(model).shape[1] == sae.W_dec.shape[1]
    except ValueError:  # no language model
        return False


@torch.no_grad()
def decoder_logits(model: HookedVLM, sae: SAE, features: Sequence[int], n: int = 10) -> dict[int, dict[str, list]]:
    """Per feature, the ``n`` tokens ``(id, text, logit)`` whose logits its decoder direction raises most and lowers
    most: ``W_dec[f] · W_U[token]`` (the direct path through the unembedding, final norm left out, as in
    SAEDashboard)."""
    from hooked_vlm.decomposition import unembedding
    from hooked_vlm.readouts import resolve_tokenizer

    w_u = unembedding(model)
    directions = sae.W_dec[list(features)].to(device=w_u.device, dtype=torch.float32)
    logits = (directions @ w_u.float().T).cpu()
    tokenizer = resolve_tokenizer(model)
    out = {}
    for j, f in enumerate(features):
        top, bottom = logits[j].topk(min(n, logits.shape[1])), logits[j].topk(min(n, logits.shape[1]), largest=False)
        out[int(f)] = {
            side: [
                (int(i), _token_text(tokenizer, int(i)), float(v))
                for v, i in zip(pick.values, pick.indices, strict=True)
            ]
            for side, pick in (("positive", top), ("negative", bottom))
        }
    return out


def _token_text(tokenizer: Any, token: int) -> str:
    """The token as text; a byte-level piece that decodes to no whole character (U+FFFD) as its vocabulary entry."""
    text = tokenizer.decode([token])
    return tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text


# ---------------------------------------------------------------------------------------------------------------
# HTML.

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
header{background:#1d2433;color:#fff;padding:14px 24px}header a{color:#9cc3ff}
main{padding:16px 24px}h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:0}
.meta{font-size:13px;color:#c9d1e0}.card{background:#fff;border:1px solid #d9dde3;border-radius:8px;
margin:0 0 18px;padding:14px 16px}.card-head{display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
.stat{font-size:13px;color:#555}.cols{display:flex;gap:22px;flex-wrap:wrap;margin-top:10px}
.left{flex:0 0 330px}.right{flex:1 1 520px;min-width:320px}table{border-collapse:collapse;font-size:12.5px}
td,th{padding:2px 8px;border-bottom:1px solid #eceef1;text-align:left}th{color:#666;font-weight:600}
.pos{color:#0b5cad}.neg{color:#b3261e}.num{font-variant-numeric:tabular-nums;text-align:right}
h3{font-size:13px;margin:12px 0 4px;color:#333;text-transform:uppercase;letter-spacing:.04em}
img{max-width:100%;border:1px solid #e2e4e8}.toc{display:flex;flex-wrap:wrap;gap:6px;font-size:12.5px}
.toc a{background:#fff;border:1px solid #d9dde3;border-radius:4px;padding:2px 6px;text-decoration:none}
svg.hist rect.bar{fill:#4f7fc0}svg.hist text{font-size:10px;fill:#555}.none{color:#888;font-size:12.5px}
"""


def _number(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def _histogram_svg(feature: int, histogram: Histogram, density: float) -> str:
    counts = histogram.counts.tolist()
    edges = histogram.edges.tolist()
    width, height, left, bottom = 320, 130, 34, 22
    tallest = max(counts + [1])
    bar = (width - left - 4) / max(len(counts), 1)
    parts = [
        f'<svg class="hist" id="hist-{feature}" width="{width}" height="{height}" role="img" '
        f'aria-label="activation histogram of feature {feature}">'
    ]
    for i, count in enumerate(counts):
        h = (height - bottom - 6) * count / tallest
        parts.append(
            f'<rect class="bar" x="{left + i * bar:.2f}" y="{height - bottom - h:.2f}" width="{bar - 1:.2f}" '
            f'height="{h:.2f}" data-lo="{edges[i]!r}" data-hi="{edges[i + 1]!r}" data-count="{count}">'
            f"<title>{edges[i]:.3g} – {edges[i + 1]:.3g}: {count} rows</title></rect>"
        )
    parts.append(
        f'<text x="{left}" y="{height - 6}">0</text><text x="{width - 4}" y="{height - 6}" '
        f'text-anchor="end">{edges[-1]:.3g}</text><text x="{left - 4}" y="12" text-anchor="end">{tallest}</text>'
        f'<text x="{(width + left) / 2}" y="{height - 6}" text-anchor="middle">activation (non-zero rows; '
        f"density {density:.3%})</text></svg>"
    )
    return "".join(parts)


def _card(
    scan: FeatureScan,
    feature: int,
    histogram: Histogram,
    logits: dict | None,
    effects: list,
    association: dict | None,
    gallery: str,
    n_images: int,
) -> str:
    esc = html.escape
    density = float(scan.density[feature])
    top = scan.top(feature)[:n_images]
    peak = top[0][1] if top else 0.0
    rows = "".join(
        f'<tr class="top-image" data-image="{esc(image)}" data-value="{value!r}"><td class="num">{rank}</td>'
        f'<td>{esc(image)}</td><td class="num">{value:.4g}</td><td>{_where(where)}</td></tr>'
        for rank, (image, value, where) in enumerate(top, 1)
    )
    images = (
        (
            f'<table class="top-images"><tr><th>#</th><th>image</th><th>max activation</th><th>where</th></tr>'
            f"{rows}</table>"
        )
        if top
        else '<p class="none">never fires on the scanned images</p>'
    )
    sections = [f"<h3>Activations</h3>{_histogram_svg(feature, histogram, density)}"]
    if logits:
        for side, css, title in (("positive", "pos", "Positive logits"), ("negative", "neg", "Negative logits")):
            cells = "".join(
                f'<tr data-token-id="{token}" title="token {token}"><td class="{css}">{esc(repr(text))}</td>'
                f'<td class="num">{value:+.3f}</td></tr>'
                for token, text, value in logits[side]
            )
            sections.append(f'<h3>{title}</h3><table class="logits {side}">{cells}</table>')
    if effects:
        cells = ""
        for effect in effects:
            j = effect.features.index(feature)
            exact, estimate = float(effect.exact[j]), float(effect.estimate[feature])
            cells += (
                f'<tr><td>{esc(effect.readout)}</td><td class="num {"pos" if exact >= 0 else "neg"}">'
                f'{exact:+.4g}</td><td class="num">{estimate:+.4g}</td></tr>'
            )
        n = int(effects[0].exact_per_image.shape[0])
        sections.append(
            f'<h3>Readout effects (ablated, {n} images)</h3><table class="effects"><tr><th>readout</th>'
            f"<th>exact Δ</th><th>first-order</th></tr>{cells}</table>"
        )
    if association:
        keys = ("rank", "spearman", "cohens_d", "q_value", "mean_top", "mean_bottom", "causal_effect")
        cells = "".join(f'<tr><td>{k}</td><td class="num">{_number(association[k])}</td></tr>' for k in keys)
        sections.append(f'<h3>Aesthetic association</h3><table class="association">{cells}</table>')
    return (
        f'<section class="card" id="feature-{feature}" data-feature="{feature}"><div class="card-head">'
        f'<h2>Feature {feature}</h2><span class="stat">density {density:.3%} · fired on {int(scan.fired[feature])} '
        f"of {scan.n_rows} rows · mean {float(scan.mean_activation[feature]):.4g} · max {peak:.4g}</span>"
        f'<a class="stat" href="#top">↑ top</a></div><div class="cols"><div class="left">{"".join(sections)}</div>'
        f'<div class="right"><h3>Top activating images</h3><img loading="lazy" src="{quote(gallery)}" '
        f'alt="top images of feature {feature} with per-patch heatmaps">{images}</div></div></section>'
    )


def _where(where: tuple[int, int, int]) -> str:
    tile, row, col = where
    return f"tile {tile}, patch ({row}, {col})" if row >= 0 else "not a patch"


def _page(
    scan: FeatureScan,
    sae: SAE,
    chosen: list[int],
    cards: list[str],
    density: str,
    name: str,
    effects: list,
    aesthetic: Any,
) -> str:
    esc = html.escape
    dead = int((scan.fired == 0).sum())
    toc = "".join(f'<a href="#feature-{f}">{f}</a>' for f in chosen)
    extra = f" · readouts: {esc(', '.join(e.readout for e in effects))}" if effects else ""
    if aesthetic is not None:
        extra += f" · scores: {esc(aesthetic.scores.description)}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(name)}</title>'
        f'<style>{_STYLE}</style></head><body><header id="top"><a href="index.html">← all SAEs</a>'
        f"<h1>{esc(scan.hook_name)} · {esc(type(sae).__name__)} · {sae.cfg.d_sae} features</h1>"
        f'<div class="meta">model {esc(scan.model_name)} · d_in {sae.cfg.d_in} · positions '
        f"{esc(json.dumps(scan.positions))} · prompt {esc(repr(scan.prompt))} · {len(scan.source)} images, "
        f"{scan.n_rows} rows · dead {dead} ({dead / max(len(scan.fired), 1):.1%}){extra}</div></header><main>"
        f'<section class="card"><h2>Feature density</h2><img src="{quote(density)}" alt="feature density histogram" '
        f'style="max-width:560px"><h3>Features shown ({len(chosen)}, strongest first)</h3><div class="toc">{toc}'
        f"</div></section>{''.join(cards)}</main></body></html>"
    )


def write_index(out_dir: str | os.PathLike, entry: dict[str, Any] | None = None) -> Path:
    """``index.html`` of the SAE pages in ``out_dir`` (listed in ``dashboards.json``; ``entry`` is added or
    replaces the entry of the same page). Pages listed whose file is gone are dropped."""
    out = Path(out_dir)
    manifest = out / MANIFEST
    entries = json.loads(manifest.read_text()) if manifest.is_file() else []
    if entry is not None:
        entries = [e for e in entries if e["page"] != entry["page"]] + [entry]
    entries = [e for e in entries if (out / e["page"]).is_file()]
    manifest.write_text(json.dumps(entries, indent=1))
    esc = html.escape
    columns = ("model", "hook", "architecture", "d_in", "d_sae", "images", "rows", "dead", "features", "written")
    head = "".join(f"<th>{c}</th>" for c in columns)
    rows = "".join(
        f'<tr><td><a href="{quote(e["page"])}">{esc(e["page"])}</a></td>'
        + "".join(f"<td>{esc(str(e[c]))}</td>" for c in columns)
        + "</tr>"
        for e in sorted(entries, key=lambda e: (e["model"], e["hook"], e["page"]))
    )
    index = out / "index.html"
    index.write_text(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>SAE feature dashboards</title>'
        f'<style>{_STYLE}</style></head><body><header><h1>SAE feature dashboards</h1><div class="meta">'
        f"{len(entries)} SAE{'s' if len(entries) != 1 else ''} in {esc(str(out))}</div></header><main>"
        f'<section class="card"><table class="saes"><tr><th>page</th>{head}</tr>{rows}</table></section>'
        f"</main></body></html>"
    )
    return index
