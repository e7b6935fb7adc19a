"""SAEs from elsewhere: ViT-Prisma and saev files written to disk in their own formats load through sae_lens's
converter mechanism with the right widths and canonical hook names, encode as their own code does (computed here by
hand from the written weights) and splice into a model with add_sae."""

import json

import pytest
import torch

pytest.importorskip("sae_lens")

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.sae import evaluate_sae  # noqa: E402
from hooked_vlm.sae.converters import (  # noqa: E402
    canonical_hook_name,
    load_saev_sae,
    load_vit_prisma_sae,
    register,
    saev_disk_loader,
    vit_prisma_disk_loader,
)
from hooked_vlm.steering import FeatureClamp, SteeringVector, steering_hooks  # noqa: E402
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


# ---------------------------------------------------------------------------------------------------------------
# ViT-Prisma transcoders: ln2 of block 1 in, hook_mlp_out of block 1 out (the MLP they stand in for).

TC_IN, TC_OUT = "vision.blocks.1.ln2.hook_normalized", "vision.blocks.1.hook_mlp_out"


def _transcoder_weights(seed: int, skip: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = _weights(seed) | {"b_dec_out": torch.randn(D_IN, generator=g) * 0.1}
    if skip:
        weights["W_skip"] = torch.randn(D_IN, D_IN, generator=g) * 0.05
    return weights


def _write_prisma_transcoder(folder, weights, **cfg):
    return _write_prisma(folder, weights, is_transcoder=True, hook_point=None, hook_point_layer=1,
                         layer_subtype="ln2.hook_normalized", out_hook_point_layer=1, layer_out_subtype="hook_mlp_out",
                         d_out=D_IN, transcoder_with_skip_connection="W_skip" in weights, **cfg)


def _prisma_transcoder_forward(x, w):
    """ViT-Prisma's Transcoder.forward: relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out (+ x @ (I + W_skip.T))."""
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    out = acts @ w["W_dec"] + w["b_dec_out"]
    if "W_skip" in w:
        out = out + x @ (torch.eye(x.shape[-1]) + w["W_skip"].T)
    return acts, out


@pytest.mark.parametrize("skip", [False, True])
def test_vit_prisma_transcoder_loads_as_a_sae_lens_transcoder(tmp_path, skip):
    from sae_lens import SkipTranscoder, Transcoder

    weights = _transcoder_weights(5, skip)
    tc = load_vit_prisma_sae(_write_prisma_transcoder(tmp_path / "tc", weights))
    assert type(tc) is (SkipTranscoder if skip else Transcoder)
    assert (tc.cfg.d_in, tc.cfg.d_sae, tc.cfg.d_out) == (D_IN, D_SAE, D_IN)
    assert (tc.cfg.metadata.hook_name, tc.cfg.metadata.hook_name_out) == (TC_IN, TC_OUT)
    x = torch.randn(6, D_IN)
    acts, out = _prisma_transcoder_forward(x, weights)
    torch.testing.assert_close(tc.encode(x), acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tc(x), out, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_spliced_transcoder_replaces_its_output_hook_with_its_map_of_the_input_hook(tmp_path, model):
    weights = _transcoder_weights(6, skip=True)
    tc = load_vit_prisma_sae(_write_prisma_transcoder(tmp_path / "tc", weights))
    image = sample_image()
    clean_logits = model(image)  # run_with_cache stops early once its hooks have run
    _, clean = model.run_with_cache(image, names_filter=[TC_IN, TC_OUT, "vision.blocks.1.hook_resid_mid",
                                                         "vision.blocks.1.hook_resid_post"])
    acts, out = _prisma_transcoder_forward(clean[TC_IN], weights)
    features = f"{TC_OUT}.hook_sae_acts_post"
    model.add_sae(tc)
    try:
        assert model.acts_to_saes == {TC_IN: tc} and model.get_sae_hook_name(tc) == features
        assert features in model.hook_names(f"{TC_OUT}.*")
        _, cache = model.run_with_cache(image, names_filter=[features, TC_OUT, "vision.blocks.1.hook_resid_post"])
    finally:
        model.reset_saes()
    torch.testing.assert_close(cache[features], acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[TC_OUT], out, atol=1e-5, rtol=1e-5)
    # what follows sees the transcoder's output in place of the MLP's: resid_post = resid_mid + transcoder(ln2)
    torch.testing.assert_close(cache["vision.blocks.1.hook_resid_post"],
                               clean["vision.blocks.1.hook_resid_mid"] + out, atol=1e-5, rtol=1e-5)
    assert not (cache[TC_OUT] - clean[TC_OUT]).abs().max() < 1e-3  # a random transcoder is not the MLP
    # removed: no SAE hook points, both hooks idle, the model's own output again
    assert not model.hook_names(f"{TC_OUT}.*") and model.acts_to_saes == {}
    assert model.hook_point(TC_IN).splice is None and model.hook_point(TC_OUT).splice is None
    torch.testing.assert_close(model(image), clean_logits)

    # with the error term the output is unchanged until a feature is edited; zeroing one removes its decoder row
    f = int(acts[0].sum(0).argmax())

    def zero(value, hook):
        value[..., f] = 0.0
        return value

    with model.saes(tc, use_error_term=True):
        torch.testing.assert_close(model(image), clean_logits, atol=1e-5, rtol=1e-5)
        with model.hooks(fwd_hooks=[(features, zero)]):
            _, edited = model.run_with_cache(image, names_filter=[TC_OUT])
    expected = clean[TC_OUT] - acts[..., f, None] * weights["W_dec"][f]
    torch.testing.assert_close(edited[TC_OUT], expected, atol=1e-5, rtol=1e-5)
    assert model.acts_to_saes == {}
    # steering knows the features live at the output hook: the clamp is the same edit, the vector the decoder row
    clamp = FeatureClamp.from_sae(tc, f, 0.0)
    with model.saes(tc, use_error_term=True), model.hooks(fwd_hooks=steering_hooks(model, clamp)):
        _, clamped = model.run_with_cache(image, names_filter=[TC_OUT])
    torch.testing.assert_close(clamped[TC_OUT], expected, atol=1e-5, rtol=1e-5)
    vector = SteeringVector.from_sae_feature(tc, f)
    assert vector.hook_name == TC_OUT and torch.equal(vector.direction, tc.W_dec[f])


def test_transcoder_formats_sae_lens_cannot_run_are_refused(tmp_path, model):
    weights = _transcoder_weights(7, skip=False)
    with pytest.raises(ValueError, match="ReLU"):
        vit_prisma_disk_loader(_write_prisma_transcoder(tmp_path / "topk", weights, activation_fn_str="topk",
                                                         activation_fn_kwargs={"k": 4}))
    with pytest.raises(ValueError, match="do not map the output back"):
        vit_prisma_disk_loader(_write_prisma_transcoder(tmp_path / "ln", weights, normalize_activations="layer_norm"))
    with pytest.raises(ValueError, match=r"b_dec_out has shape"):
        vit_prisma_disk_loader(_write_prisma_transcoder(tmp_path / "bad", dict(weights, b_dec_out=torch.zeros(3))))
    # an output hook of another width, and an input hook already taken by an SAE
    wide = load_vit_prisma_sae(_write_prisma_transcoder(tmp_path / "tc", weights))
    wide.cfg.metadata.hook_name_out = "vision.blocks.1.mlp.hook_post"
    with pytest.raises(ValueError, match="d_out=32"):
        model.add_sae(wide)
    tc = load_vit_prisma_sae(tmp_path / "tc")
    with pytest.raises(ValueError, match="not what a transcoder computes"):
        evaluate_sae(model, tc, [sample_image()])
    sae = load_vit_prisma_sae(_write_prisma(tmp_path / "sae", _weights(8)), hook_name=TC_IN)
    model.add_sae(sae)
    try:
        with pytest.raises(ValueError, match="which the transcoder reads"):
            model.add_sae(tc)
    finally:
        model.reset_saes()
    assert model.hook_point(TC_OUT).splice is None
