"""Evaluation and feature analysis, checked against hand computations.

References: ``run_with_cache`` activations and sae_lens's ``encode`` / ``decode`` on them, reduced by hand
(explained variance, L0, firing counts, per-image maxima); the clean and hand-spliced model outputs for the
downstream numbers; the PNG and CSV files read back.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.sae import density_histogram, evaluate_sae, feature_gallery, feature_table, scan_features
from hooked_vlm.testing import half_and_half_image, sample_image, tiny_clip, tiny_llava_onevision

HOOK = "vision.blocks.0.hook_resid_post"


def sae_at(hook, positions, prompt=None, d_in=32, d_sae=48, seed=0):
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6,
                                metadata=SAEMetadata(hook_name=hook, positions=positions, prompt=prompt)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return sae


@pytest.fixture(scope="module")
def clip():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def pictures():
    return [sample_image(width=64 + 8 * i, height=64, seed=i) for i in range(9)] + [half_and_half_image()]


@torch.no_grad()
def test_report_numbers_match_hand_computation(clip, pictures):
    sae = sae_at(HOOK, "patches")
    report = evaluate_sae(clip, sae, pictures, batch_size=4, progress=False)
    _, cache = clip.run_with_cache(pictures, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, 32).double()  # the patches
    features = sae.encode(x.float())
    recon = sae.decode(features).double()
    assert report.n_rows == len(x) == 10 * 16
    assert report.explained_variance == pytest.approx(1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert report.mse == pytest.approx(float(((x - recon) ** 2).sum(-1).mean()))
    assert report.cosine == pytest.approx(float(F.cosine_similarity(x, recon, dim=-1).mean()))
    assert report.l0 == pytest.approx(6.0)
    fired = (features > 0).sum(0)
    assert report.dead_fraction == pytest.approx(float((fired == 0).double().mean()))
    assert report.dense_fraction == pytest.approx(float((fired / len(x) > 0.1).double().mean()))
    # downstream: the spliced SAE (patches only) against the clean image embeddings, as by hand
    clean = clip(pictures)

    def splice_patches(act, hook):
        act = act.clone()
        act[:, 1:] = sae.decode(sae.encode(act[:, 1:]))
        return act

    spliced = clip.run_with_hooks(pictures, fwd_hooks=[(HOOK, splice_patches)])
    expected = F.cosine_similarity(clean, spliced, dim=-1).mean()
    assert report.downstream["embed_cosine_spliced"] == pytest.approx(float(expected), abs=1e-5)
    assert report.downstream["embed_cosine_spliced"] < 0.999  # a random SAE does cost something
    assert "explained variance" in report.to_markdown()


@torch.no_grad()
def test_vlm_report_measures_next_token_loss_on_text(pictures, tmp_path):
    llava = HookedVLM.from_hf(*tiny_llava_onevision())
    hook = "lm.blocks.0.hook_resid_post"
    sae = sae_at(hook, "image", prompt="Describe.")
    report = evaluate_sae(llava, sae, pictures[:2], batch_size=2, progress=False)
    prepared = llava.prepare_inputs([[p] for p in pictures[:2]], prompt=["Describe."] * 2)
    logits = llava(prepared)
    ids, text = prepared.kwargs["input_ids"], prepared.layout["lm"].kind == Kind.TEXT
    target_is_text = text[:, 1:]
    ce = F.cross_entropy(logits[:, :-1][target_is_text], ids[:, 1:][target_is_text])
    assert report.downstream["ce_clean"] == pytest.approx(float(ce), rel=1e-5)
    assert set(report.downstream) >= {"ce_spliced", "ce_zero_ablation", "ce_loss_recovered", "kl_spliced"}
    image_tokens = int((ids == llava.raw_model.config.image_token_id).sum())
    newlines = int((prepared.layout["lm"].kind == Kind.NEWLINE).sum())
    assert report.downstream["kl_spliced"] > 0 and report.n_rows == image_tokens - newlines
    written = report.save(tmp_path / "report")
    assert written.read_text().startswith("# SAE report") and (tmp_path / "report.json").exists()


@torch.no_grad()
def test_scan_finds_the_top_images_and_patches_by_hand(clip, pictures):
    sae = sae_at(HOOK, "patches")
    scan = scan_features(clip, sae, pictures, top_k=3, batch_size=4, progress=False)
    _, cache = clip.run_with_cache(pictures, names_filter=[HOOK])
    features = sae.encode(cache[HOOK][:, 1:])  # [image, patch, feature]
    per_image, where = features.max(1)  # [image, feature]
    assert torch.equal(scan.fired, (features > 0).sum((0, 1)))
    assert scan.n_rows == 160
    for feature in range(sae.cfg.d_sae):
        values, images = per_image[:, feature].topk(3)
        assert torch.allclose(scan.top_values[feature], values, atol=1e-6)
        live = values > 0
        assert torch.equal(scan.top_images[feature][live], images[live])
        patch = where[images, feature]
        assert torch.equal(scan.top_patches[feature][live][:, 1], (patch // 4)[live])  # row
        assert torch.equal(scan.top_patches[feature][live][:, 2], (patch % 4)[live])  # col


def test_gallery_histogram_and_table_files(clip, pictures, tmp_path):
    sae = sae_at(HOOK, "patches")
    scan = scan_features(clip, sae, pictures, batch_size=5, progress=False)
    feature = int(scan.density.argmax())
    gallery = feature_gallery(clip, sae, scan, feature, tmp_path / "gallery.png", n=6, columns=3)
    with Image.open(gallery) as image:
        assert image.size[0] > 500 and image.size[1] > 400
    histogram = density_histogram(scan, tmp_path / "density.png")
    assert Image.open(histogram).size[0] > 300
    dead = int((scan.density == 0).nonzero()[0])  # a random SAE has some; its gallery says so instead of failing
    assert Image.open(feature_gallery(clip, sae, scan, dead, tmp_path / "dead.png")).size[0] > 100
    table = feature_table(scan, tmp_path / "features.csv")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == sae.cfg.d_sae
    top = scan.top(feature)
    assert float(rows[feature]["density"]) == pytest.approx(float(scan.density[feature]), rel=1e-5)
    assert rows[feature]["top_images"].startswith(f"{top[0][0]} (")
