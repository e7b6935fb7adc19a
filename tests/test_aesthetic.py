"""Aesthetic features: association from a store, causal effects through the spliced SAE, the ranked answer.

References: scipy's ``pearsonr`` / ``spearmanr`` / ``rankdata`` and ``false_discovery_control``; per-image maxima
computed by hand from ``store.read`` and ``sae.encode``; exact ablation by a hand-written hook on
``hook_sae_acts_post``; the CSV and JSON files read back.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from scipy import stats

from hooked_vlm import HookedVLM
from hooked_vlm.sae import harvest_to_store
from hooked_vlm.sae.aesthetic import (
    aesthetic_features,
    aesthetic_readout,
    causal_effects,
    load_scores,
    readout_scores,
    split_scores,
    steering_from_summary,
)
from hooked_vlm.sae.association import TensorRows, associate, average_ranks, bh_qvalues, image_activations
from hooked_vlm.steering import FeatureClamp, SteeringVector
from hooked_vlm.testing import sample_image, tiny_clip

HOOK = "vision.blocks.0.hook_resid_post"


def planted(n_images=200, n_pos=16, d=32, d_sae=128, feature=3, seed=0):
    """Rows that are sparse sums of orthonormal directions; feature j < d reads direction j exactly, the others
    read random mixtures of the directions other than ``feature``'s. The score is the image's maximum
    coefficient of direction ``feature`` plus noise, so only ``feature`` relates to it."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    encoder = torch.randn(d, d_sae, generator=g) * 0.3
    planted_direction = directions[:, feature:feature + 1]
    encoder -= planted_direction @ (planted_direction.T @ encoder)
    encoder[:, :d] = directions
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae, metadata=SAEMetadata(hook_name="h")))
    with torch.no_grad():
        sae.W_enc.copy_(encoder)
        sae.W_dec.copy_(encoder.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    active = torch.rand(n_images, n_pos, d, generator=g) < 0.1
    coefficients = active * torch.rand(n_images, n_pos, d, generator=g) * 3
    rows = (coefficients @ directions.T).reshape(-1, d)
    image = torch.arange(n_images).repeat_interleave(n_pos)
    position = torch.arange(n_pos).repeat(n_images)
    index = torch.stack([image, image % 8, position + 1, torch.zeros_like(image), position // 4, position % 4], 1)
    score = coefficients[:, :, feature].amax(1) + 0.5 * torch.randn(n_images, generator=g)
    return TensorRows("h", rows, index, [f"img{i}.png" for i in range(n_images)]), sae, score


def test_planted_feature_ranks_first_and_unrelated_feature_is_not_significant():
    rows, sae, score = planted()
    acts = image_activations(rows, sae, progress=False)
    result = associate(acts, score, n_permutations=500)
    order = result.ranking()
    assert int(order[0]) == 3
    assert float(result.q_value[3]) < 0.01
    assert float(result.cohens_d[3]) > 2
    for unrelated in (0, 10, 20):  # directions independent of the score
        assert float(result.q_value[unrelated]) > 0.5


def test_statistics_match_scipy():
    rows, sae, score = planted(n_images=60)
    acts = image_activations(rows, sae, progress=False)
    result = associate(acts, score, n_permutations=200, quantile=0.25)
    x, s = acts.values.double().numpy(), score.double().numpy()
    for f in (1, 3, 40):
        assert float(result.pearson[f]) == pytest.approx(stats.pearsonr(x[:, f], s).statistic, abs=1e-5)
        assert float(result.spearman[f]) == pytest.approx(stats.spearmanr(x[:, f], s).statistic, abs=1e-5)
        top, bottom = s >= np.quantile(s, 0.75), s <= np.quantile(s, 0.25)
        a, b = x[top, f], x[bottom, f]
        pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        assert float(result.cohens_d[f]) == pytest.approx((a.mean() - b.mean()) / pooled, rel=1e-4)
    ties = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 2.0], [0.0, 5.0]])
    assert torch.equal(average_ranks(ties), torch.tensor(stats.rankdata(ties.numpy(), axis=0), dtype=torch.float32))
    p = torch.rand(50, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(bh_qvalues(p).double(), torch.tensor(stats.false_discovery_control(p.numpy())).double(),
                          atol=1e-6)
    # the per-feature permutation p of a strong effect sits at its floor 1 / (P + 1), and is not below it
    assert float(result.p_feature[3]) == pytest.approx(1 / 201)


def test_image_activations_from_a_real_store_match_hand_reduction(tmp_path):
    clip = HookedVLM.from_hf(*tiny_clip())
    images = [sample_image(width=64 + 8 * (i % 3), seed=i) for i in range(10)]
    store = harvest_to_store(clip, images, HOOK, tmp_path / "store", positions="patches", batch_size=4)
    sae = _random_sae(d_sae=48)
    acts_max = image_activations(store, sae, progress=False, chunk_rows=7)  # chunks that split images
    acts_mean = image_activations(store, sae, reduce="mean", progress=False)
    with torch.no_grad():
        features = sae.encode(store.read(HOOK).float()).view(10, 16, 48)
    # chunks of 7 rows run other matmul shapes than one pass: equal up to float rounding
    torch.testing.assert_close(acts_max.values, features.amax(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acts_mean.values, features.mean(1), atol=1e-6, rtol=1e-5)
    assert acts_max.n_rows == 160


def _random_sae(hook=HOOK, d_sae=64, seed=0, scale=0.1):
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, positions="patches")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * scale)
    return sae


def test_first_order_estimates_agree_with_exact_ablation():
    clip = HookedVLM.from_hf(*tiny_clip())
    sae = _random_sae()
    images = [sample_image(width=64 + 8 * i, seed=i) for i in range(4)]
    readout = aesthetic_readout(clip, "clip")
    features = list(range(0, 64, 2))
    effects = causal_effects(clip, sae, images, readout, features, batch_size=4, progress=False)
    assert effects.agreement >= 0.95
    # exact effect of one feature by hand: zero it at the patches with the SAE spliced with its error term
    f = features[int(effects.exact.abs().argmax())]

    def zero(acts, hook):
        acts = acts.clone()
        acts[:, 1:, f] = 0.0  # patches: every position but CLS
        return acts

    with torch.no_grad():
        clean = clip.run_with_cache(images, names_filter="hook_image_embeds", stop_early=False)[1]
        edited = clip.run_with_hooks_with_saes(images, saes=[sae], use_error_term=True, fwd_hooks=[
            (f"{HOOK}.hook_sae_acts_post", zero)], sae_positions="patches")
    from hooked_vlm.cache import ActivationCache
    by_hand = readout(None, ActivationCache({"hook_image_embeds": edited}, lambda: None)) - readout(None, clean)
    assert float(effects.exact[features.index(f)]) == pytest.approx(float(by_hand.mean()), rel=1e-3, abs=1e-7)


def test_scores_from_csv_dataset_split_and_readout(tmp_path):
    ids = ["good/a.jpg", "good/b.jpg", "bad/c.jpg", "other/d.jpg"]
    (tmp_path / "scores.csv").write_text("file,score\na.jpg,7.5\nc.jpg,2\nb.jpg,5\n")
    scores = load_scores(tmp_path / "scores.csv", ids)
    assert scores.values[:3].tolist() == [7.5, 5.0, 2.0] and scores.values[3].isnan()
    split = split_scores(ids, "good", "bad")
    assert split.values[:3].tolist() == [1.0, 1.0, 0.0] and split.values[3].isnan()
    assert torch.equal(load_scores("split:good,bad", ids).values.nan_to_num(-1), split.values.nan_to_num(-1))
    from datasets import Dataset

    Dataset.from_dict({"rating": [1.0, 2.0, 3.0, 4.0]}).save_to_disk(str(tmp_path / "ds"))
    assert load_scores(tmp_path / "ds", ["0", "1", "2", "3"], column="rating").values.tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="no image of the store has a score"):
        load_scores({"zzz": 1.0}, ids)
    clip = HookedVLM.from_hf(*tiny_clip())
    images = [sample_image(seed=i) for i in range(3)]
    readout = aesthetic_readout(clip, "clip")
    on_the_fly = readout_scores(clip, images, readout, batch_size=2, progress=False)
    _, cache = clip.run_with_cache(images, names_filter="hook_image_embeds")
    assert torch.allclose(on_the_fly.values.float(), readout(None, cache), atol=1e-6)


def test_aesthetic_features_writes_table_summary_and_builds_steering(tmp_path):
    rows, sae, score = planted(n_images=120)
    result = aesthetic_features(rows, sae, score, out_dir=tmp_path, n_permutations=300, progress=False)
    assert result.rows[0]["feature"] == 3 and result.rows[0]["q_value"] < 0.01
    assert result.rows[0]["top_images"][0]["image_id"].startswith("img")
    with (tmp_path / "features.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == 128 and table[0]["feature"] == "3" and "position" in table[0]["top_images"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["positive"][0]["feature"] == 3 and summary["n_images"] == 120
    assert (tmp_path / "scatter_3.png").stat().st_size > 1000
    # the peak recorded for the top image is the row where the feature is largest in that image
    top = result.rows[0]["top_images"][0]
    image_rows = rows.rows[rows.index[:, 0] == top["image"]]
    with torch.no_grad():
        assert top["value"] == pytest.approx(float(sae.encode(image_rows)[:, 3].max()))
        assert top["value"] == pytest.approx(float(sae.encode(rows.rows[top["store_row"]][None])[0, 3]))
    assert rows.index[top["store_row"]].tolist()[2:] == [top["position"], top["tile"], top["row"], top["col"]]
    vectors = steering_from_summary(tmp_path / "summary.json", sae, n=1)
    assert isinstance(vectors[0], SteeringVector) and torch.equal(vectors[0].vector, sae.W_dec[3].detach())
    clamps = steering_from_summary(summary, sae, n=1, kind="clamp", strength=2.0)
    assert isinstance(clamps[0], FeatureClamp) and clamps[0].value == pytest.approx(2 * summary["positive"][0]["mean_top"])


def test_cli_runs(tmp_path):
    from hooked_vlm.cli import main

    clip = HookedVLM.from_hf(*tiny_clip())
    images = [sample_image(width=64 + 8 * (i % 3), seed=i) for i in range(12)]
    store = harvest_to_store(clip, images, HOOK, tmp_path / "store", positions="patches", batch_size=4)
    real_sae = _random_sae()
    real_sae.save_model(str(tmp_path / "sae"))
    (tmp_path / "scores.csv").write_text("file,score\n" + "".join(f"{i},{i % 5}\n" for i in range(12)))
    code = main(["aesthetic-features", "--store", str(store.path), "--sae", str(tmp_path / "sae"), "--scores",
                 str(tmp_path / "scores.csv"), "--out", str(tmp_path / "out"), "--n-permutations", "100"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_images"] == 12 and (tmp_path / "out" / "features.csv").exists()


def test_fast_encode_matches_sae_lens():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    from hooked_vlm.sae.association import _encode

    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    for sae in (StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, apply_b_dec_to_input=True)),
                JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=64)), TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=5))):
        with torch.no_grad():
            for parameter in sae.parameters():
                parameter.normal_(0, 0.3)
            assert torch.allclose(_encode(sae, x), sae.encode(x), atol=1e-6)
