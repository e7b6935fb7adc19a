"""``hooked-vlm harvest`` / ``train-sae`` (through ``python -m hooked_vlm.sae``'s entry), offline on tiny models."""

from __future__ import annotations

import torch
from sae_lens import SAE

from hooked_vlm.sae import ActivationStore
from hooked_vlm.sae.cli import main


def test_harvest_then_train_from_the_store(tmp_path, capsys):
    store_path, sae_path = tmp_path / "store", tmp_path / "sae"
    assert main(["harvest", "tiny:clip", "--hook", "vision.blocks.1.hook_resid_post", "--positions", "patches",
                 "--n-sample-images", "12", "--batch-size", "4", "--device", "cpu", "--out", str(store_path)]) == 0
    store = ActivationStore(store_path)
    assert store.complete and store.n_rows["vision.blocks.1.hook_resid_post"] == 12 * 16
    assert main(["train-sae", "--store", str(store_path), "--hook", "vision.blocks.1.hook_resid_post",
                 "--expansion-factor", "2", "--k", "4", "--batch-size", "32", "--n-batches-for-norm-estimate", "1",
                 "--out", str(sae_path)]) == 0
    sae = SAE.load_from_disk(sae_path)
    assert sae.cfg.d_sae == 64 and sae.cfg.metadata.positions == "patches"
    assert "saved TopKSAE" in capsys.readouterr().out


def test_per_hook_positions_and_one_line_errors(tmp_path, capsys):
    hooks = ["vision.blocks.0.hook_resid_post", "lm.blocks.0.hook_resid_post"]
    assert main(["harvest", "tiny:llava_onevision", "--hook", hooks[0], "--hook", hooks[1], "--positions",
                 f"{hooks[0]}=patches", "--positions", f"{hooks[1]}=image", "--prompt", "Hi", "--n-sample-images",
                 "2", "--device", "cpu", "--out", str(tmp_path / "vlm")]) == 0
    store = ActivationStore(tmp_path / "vlm")
    assert store.positions(hooks[1]) == "image" and store.read(hooks[0]).dtype == torch.float32
    assert main(["harvest", "--hook", "vision.blocks.0.hook_resid_pots", "--out", str(tmp_path / "x")]) == 2
    assert main(["harvest", "--hook", hooks[0], "--positions", "patchs", "--out", str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[-2].startswith("hooked-vlm: error: unknown hook name") and "Did you mean" in errors[-2]
    assert errors[-1].startswith("hooked-vlm: error: unknown position selector 'patchs'")
