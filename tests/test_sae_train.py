"""SAE training through sae_lens from a live model, a store and an iterator; planted-feature recovery.

References: sae_lens's own ``SAE.load_from_disk`` / ``encode`` / ``decode`` and its training SAE classes, a
reconstruction loss computed by hand on held-out activations, and synthetic data with known directions.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata

from hooked_vlm import HookedVLM
from hooked_vlm.sae import harvest, harvest_to_store, planted_features, recovery, train_sae, train_saes
from hooked_vlm.testing import sample_image, tiny_clip, tiny_llava_onevision

HOOK = "vision.blocks.1.hook_resid_post"
SMALL = dict(batch_size=64, buffer_batches=4, n_batches_for_norm_estimate=2, expansion_factor=4, k=8, lr=1e-3)


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def pictures():
    return [sample_image(width=64 + 4 * i, height=64, seed=i) for i in range(40)]


@pytest.fixture(scope="module")
def held_out(model):
    rows = [b.acts[HOOK] for b in harvest(model, [sample_image(seed=100 + i) for i in range(8)], HOOK,
                                           positions="patches", progress=False)]
    return torch.cat(rows)


def mse(sae, rows):
    with torch.no_grad():
        return float(((sae.decode(sae.encode(rows)) - rows) ** 2).sum(-1).mean())


def test_training_from_a_live_model_lowers_the_loss_and_saves_for_sae_lens(model, pictures, held_out, tmp_path):
    config = TopKTrainingSAEConfig(d_in=32, d_sae=128, k=8, normalize_activations="expected_average_only_in",
                                   metadata=SAEMetadata(hook_name=HOOK))
    torch.manual_seed(0)
    sae = TopKTrainingSAE(config)
    before = mse(sae, held_out)
    trained = train_sae(model, HOOK, pictures, sae=sae, output_path=tmp_path, positions="patches",
                        training_samples=64 * 150, **SMALL)
    assert len(trained.losses) == 150
    assert trained.losses[-20:].mean() < 0.5 * trained.losses[:20].mean()
    after = mse(sae, held_out)  # the training SAE itself, normalisation folded back in
    assert after < 0.2 * before
    reloaded = SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded.decode(reloaded.encode(held_out)), sae.decode(sae.encode(held_out)), atol=1e-5)
    assert torch.equal(trained.sae.W_dec, reloaded.W_dec)
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert saved["architecture"] == "topk" and saved["normalize_activations"] == "none"
    metadata = reloaded.cfg.metadata
    assert (metadata.hook_name, metadata.model_name, metadata.positions) == (HOOK, "clip:CLIPModel", "patches")
    assert metadata.dataset_path == "list of 40 images" and metadata.l0 == pytest.approx(8.0)
    assert (tmp_path / "sparsity.safetensors").exists()


def test_training_from_a_store_and_several_hooks_in_one_pass(model, pictures, held_out, tmp_path):
    hooks = ["vision.blocks.0.hook_resid_post", HOOK]
    store = harvest_to_store(model, pictures, hooks, tmp_path / "store", positions="patches", batch_size=8,
                             shard_mb=0.02, progress=False)
    from_store = train_sae(store, HOOK, output_path=tmp_path / "one", **SMALL)
    assert len(from_store.losses) == store.n_rows[HOOK] // 64  # default: one pass over the store
    assert from_store.sae.cfg.metadata.positions == "patches"
    assert "activation store" in from_store.sae.cfg.metadata.dataset_path
    several = train_saes(model, hooks, pictures, output_path=tmp_path / "multi", positions="patches",
                         training_samples=64 * 40, **SMALL)
    for hook, trained in several.items():
        assert trained.path == tmp_path / "multi" / hook
        assert SAE.load_from_disk(trained.path).cfg.metadata.hook_name == hook
        assert trained.losses[-5:].mean() < trained.losses[:5].mean()
    llava = HookedVLM.from_hf(*tiny_llava_onevision())
    with pytest.raises(ValueError, match="different numbers of rows"):
        train_saes(llava, ["vision.blocks.0.hook_resid_post", "lm.blocks.0.hook_resid_post"], pictures[:2],
                   positions={"vision.blocks.0.hook_resid_post": "patches", "lm.blocks.0.hook_resid_post": "image"},
                   output_path=tmp_path / "bad", **SMALL)


@pytest.mark.parametrize("architecture", ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"])
def test_every_architecture_trains_saves_and_loads(architecture, tmp_path):
    data = planted_features(16, 32, active_per_row=2)
    trained = train_sae(data.batches(64), "synthetic.hook", architecture=architecture, training_samples=64 * 60,
                        output_path=tmp_path, **(SMALL | {"lr": 5e-3}))
    reloaded = SAE.load_from_disk(tmp_path)
    assert type(reloaded) is type(trained.sae)
    if architecture in ("batchtopk", "matryoshka"):  # sae_lens saves these as JumpReLU SAEs
        assert isinstance(reloaded, JumpReLUSAE)
    assert reloaded.cfg.metadata.hook_name == "synthetic.hook" and reloaded.cfg.d_sae == 64
    assert torch.isfinite(trained.losses).all() and trained.mse_losses[-10:].mean() < 0.5 * trained.mse_losses[:10].mean()


def test_planted_sparse_features_are_recovered(tmp_path):
    data = planted_features(d_in=32, n_features=64, active_per_row=3, seed=0)
    trained = train_sae(data.batches(256), "synthetic", architecture="topk", d_sae=128, k=4, lr=1e-2,
                        batch_size=256, training_samples=256 * 600, n_batches_for_norm_estimate=4, buffer_batches=4,
                        output_path=tmp_path)
    found = recovery(trained.sae, data.directions, threshold=0.9)
    print(f"planted-feature recovery: {found}")
    assert found["recovered"] >= 0.9 and found["mean_max_cosine"] >= 0.95
    control = recovery(trained.sae, planted_features(d_in=32, n_features=64, seed=1).directions)  # other directions
    assert control["recovered"] < 0.1


def test_mistakes_raise_before_training(model, pictures, tmp_path):
    with pytest.raises(ValueError, match="training_samples"):
        train_sae(iter([torch.zeros(4, 8)]), "x", output_path=tmp_path)
    with pytest.raises(ValueError, match="unknown architecture"):
        train_sae(iter([torch.zeros(4, 8)]), "x", architecture="topkk", training_samples=64, output_path=tmp_path)
    with pytest.raises(ValueError, match="images="):
        train_sae(model, HOOK, output_path=tmp_path)
    with pytest.raises(TypeError, match="cannot train from"):
        train_sae(42, HOOK, output_path=tmp_path)
