"""SAEs from elsewhere: ViT-Prisma and saev files written to disk in their own formats load through sae_lens's
converter mechanism with the right widths and canonical hook names, encode as their own code does (computed here by
hand from the written weights) and splice into a model with add_sae."""

import json

import pytest
import torch

pytest.importorskip("sae_lens")

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.sae.converters import (  # noqa: E402
    canonical_hook_name,
    load_saev_sae,
    load_vit_prisma_sae,
    register,
    saev_disk_loader,
    vit_prisma_disk_loader,
)
from hooked_vlm.testing import sample_image, tiny_clip  # noqa: E402

D_IN, D_SAE = 32, 96  # the tiny CLIP's width; 3× expansion


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / D_SAE**0.5,
        "b_dec": torch.randn(D_IN, generator=g) * 0.1,
    }


def _write_prisma(folder, weights, **cfg):
    folder.mkdir()
    config = {"d_in": D_IN, "expansion_factor": D_SAE // D_IN, "hook_point_layer": 1, "hook_point": "blocks.1.hook_mlp_out",
              "activation_fn_str": "relu", "activation_fn_kwargs": {}, "model_name": "open-clip:laion/tiny",
              "normalize_activations": None, "cls_token_only": False, "l1_coefficient": 1e-5} | cfg
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "weights.pt")
    return folder


def _write_saev(path, weights, activation=None):
    activation = activation or {"cls": "Relu", "params": {}}
    header = {"schema": 2, "cfg": {"d_vit": D_IN, "exp_factor": D_SAE // D_IN, "n_reinit_samples": 10,
                                   "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 0,
                                   "activation": activation}, "commit": "unknown", "lib": "1.0"}
    with open(path, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode())
        torch.save(weights, fd)
    return path


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_hf(*tiny_clip())


def test_vit_prisma_folder_loads_with_its_widths_and_a_canonical_hook(tmp_path, model):
    weights = _weights(0)
    sae = load_vit_prisma_sae(_write_prisma(tmp_path / "prisma", weights))
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.metadata.hook_name == "vision.blocks.1.hook_mlp_out"
    x = torch.randn(5, D_IN)
    # ViT-Prisma's forward: relu((x - b_dec) @ W_enc + b_enc), decoded with W_dec and b_dec
    acts = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(acts), acts @ weights["W_dec"] + weights["b_dec"])

    name = "vision.blocks.1.hook_mlp_out"
    _, clean = model.run_with_cache(sample_image(), names_filter=name)  # before: a spliced hook shows the SAE's output
    model.add_sae(sae)
    try:
        assert f"{name}.hook_sae_acts_post" in model.hook_names(f"{name}.*")
        _, cache = model.run_with_cache_with_saes(sample_image(), saes=[], names_filter=f"{name}.hook_sae_acts_post")
        got = cache[f"{name}.hook_sae_acts_post"]
        assert got.shape[-1] == D_SAE
    finally:
        model.reset_saes()
    expected = torch.relu((clean[name] - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vit_prisma_topk_file_and_cls_only(tmp_path):
    weights = _weights(1)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_post", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 4}, "cls_token_only": True}
    torch.save({"cfg": cfg, "state_dict": weights}, tmp_path / "n_images_100.pt")
    sae = load_vit_prisma_sae(tmp_path / "n_images_100.pt")
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 4
    assert sae.cfg.metadata.hook_name == "vision.blocks.0.hook_resid_post" and sae.cfg.metadata.positions == "cls"
    x = torch.randn(3, D_IN)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    top = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(sae.encode(x), expected)


def test_saev_file_loads_at_the_named_layer_and_splices(tmp_path, model):
    weights = _weights(2)
    path = _write_saev(tmp_path / "sae.pt", weights)
    sae = load_saev_sae(path, layer=0)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.metadata.hook_name == "vision.blocks.0.hook_resid_post"
    assert sae.cfg.apply_b_dec_to_input is False
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ weights["W_enc"] + weights["b_enc"]))  # saev: no b_dec

    name = "vision.blocks.0.hook_resid_post"
    _, clean = model.run_with_cache(sample_image(), names_filter=name)
    model.add_sae(sae)
    try:
        _, cache = model.run_with_cache_with_saes(sample_image(), saes=[], names_filter=f"{name}.hook_sae_acts_post")
    finally:
        model.reset_saes()
    torch.testing.assert_close(cache[f"{name}.hook_sae_acts_post"],
                               torch.relu(clean[name] @ weights["W_enc"] + weights["b_enc"]), atol=1e-5, rtol=1e-5)


def test_saev_topk_and_older_schemas(tmp_path):
    weights = _weights(3)
    sae = load_saev_sae(_write_saev(tmp_path / "topk.pt", weights, {"cls": "TopK", "params": {"top_k": 8}}),
                        hook_name="blocks.1.hook_resid_post")
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 8
    assert sae.cfg.metadata.hook_name == "vision.blocks.1.hook_resid_post"
    # the original header: bare config fields, ReLU
    with open(tmp_path / "old.pt", "wb") as fd:
        fd.write((json.dumps({"d_vit": D_IN, "exp_factor": 3, "l1_coeff": 0.1}) + "\n").encode())
        torch.save(weights, fd)
    assert load_saev_sae(tmp_path / "old.pt", layer=1).cfg.architecture() == "standard"


def test_errors_name_the_file_the_tensor_or_the_missing_layer(tmp_path, model):
    weights = _weights(4)
    path = _write_saev(tmp_path / "sae.pt", weights)
    with pytest.raises(ValueError, match="does not record its layer"):
        saev_disk_loader(path)
    with pytest.raises(ValueError, match="exactly one of layer"):
        load_saev_sae(path)
    bad = dict(weights, W_dec=weights["W_dec"][:, :-1])
    with pytest.raises(ValueError, match=r"W_dec has shape \(96, 31\)"):
        vit_prisma_disk_loader(_write_prisma(tmp_path / "bad", bad))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vit_prisma_disk_loader(tmp_path)
    with pytest.raises(ValueError, match="cannot map hook name"):
        canonical_hook_name("encoder.layer.3")
    # a width that does not fit the model's hook is refused at splice time
    wide = load_saev_sae(_write_saev(tmp_path / "x.pt", weights), layer=1)
    wide.cfg.d_in = 64
    with pytest.raises(ValueError, match="d_in=64"):
        model.add_sae(wide)


def test_register_adds_both_formats_to_sae_lens_named_loaders():
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

    register()
    assert NAMED_PRETRAINED_SAE_LOADERS["vit_prisma"].__name__ == "vit_prisma_huggingface_loader"
    assert NAMED_PRETRAINED_SAE_LOADERS["saev"].__name__ == "saev_huggingface_loader"
