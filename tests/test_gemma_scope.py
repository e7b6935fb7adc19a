"""A Gemma Scope 2 SAE (sae_lens release ``gemma-scope-2-4b-it-res-all``) in its on-disk format, loaded by
sae_lens's own loader and spliced into the tiny Gemma 3 with ``add_sae``.

The release's files, as sae_lens's ``gemma_3`` loader (``gemma_3_sae_huggingface_loader``) reads them from
``google/gemma-scope-2-4b-it``: a folder per SAE (``resid_post_all/layer_0_width_16k_l0_small``) holding
``params.safetensors`` (``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``: a
JumpReLU SAE) and ``config.json`` (``architecture: jump_relu``, ``model_name``, ``hf_hook_point_in``). Only the two
Hub calls of the loader (``hf_hub_download`` and the HTTP range read of the safetensors header) are pointed at a
temporary folder; everything else (the release registry, the config, the hook name ``blocks.0.hook_resid_post``,
the weight conversion) is sae_lens's, as for a user with Hub access. The reference is the SAE computed by hand from
the raw file: ``f = pre · (pre > threshold)``, ``pre = x · w_enc + b_enc``, ``x̂ = f · w_dec + b_dec``.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name
from safetensors import safe_open
from safetensors.torch import save_file

from hooked_vlm import HookedVLM
from hooked_vlm.sae.converters import canonical_hook_name
from hooked_vlm.testing import sample_image
from hooked_vlm.testing.gemma3 import tiny_gemma3

RELEASE, SAE_ID = "gemma-scope-2-4b-it-res-all", "layer_0_width_16k_l0_small"
D_SAE = 64


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_hf(*tiny_gemma3(seed=0))


@pytest.fixture
def release(tmp_path, monkeypatch):
    """The SAE's files under ``tmp_path/<repo_id>/<folder>``, and sae_lens's Hub reads pointed there."""
    repo_id, folder = get_repo_id_and_folder_name(RELEASE, SAE_ID)
    where = tmp_path / repo_id / folder
    where.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    d_in = 32
    params = {
        "w_enc": torch.randn(d_in, D_SAE, generator=generator) * 0.3,
        "w_dec": torch.randn(D_SAE, d_in, generator=generator) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=generator) * 0.1,
        "b_dec": torch.randn(d_in, generator=generator) * 0.1,
        "threshold": torch.rand(D_SAE, generator=generator) * 2.0,
    }
    save_file(params, str(where / "params.safetensors"))
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-4b-it", "hf_hook_point_in": "model.layers.0.output"}
    (where / "config.json").write_text(json.dumps(config))

    def hf_hub_download(repo_id, filename, subfolder=None, force_download=False, **kwargs):
        path = tmp_path / repo_id / (subfolder or "") / filename
        if not path.is_file():
            raise FileNotFoundError(path)
        return str(path)

    def get_safetensors_tensor_shapes(repo_id, filename):
        with safe_open(str(tmp_path / repo_id / filename), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", get_safetensors_tensor_shapes)
    return params


def by_hand(params, x):
    pre = x @ params["w_enc"] + params["b_enc"]
    features = pre * (pre > params["threshold"])
    return features, features @ params["w_dec"] + params["b_dec"]


def test_a_gemma_scope_2_sae_loads_and_its_reconstruction_is_used(model, release):
    sae = SAE.from_pretrained(RELEASE, SAE_ID, device="cpu")
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"  # TransformerLens's name for layer 0's output
    assert sae.cfg.metadata.model_name == "google/gemma-3-4b-it" and sae.cfg.architecture() == "jumprelu"
    hook_name = canonical_hook_name(sae.cfg.metadata.hook_name, tower="lm")
    assert hook_name == "lm.blocks.0.hook_resid_post"

    prepared = model.prepare_inputs(sample_image(seed=4), prompt="Describe the picture.")
    clean_logits, clean = model.run_with_cache(prepared, names_filter=hook_name, stop_early=False)
    x = clean[hook_name]
    features, reconstruction = by_hand(release, x)
    assert 0 < int((features > 0).sum()) < features.numel()  # the threshold zeroes some features, not all

    model.add_sae(sae, hook_name=hook_name)
    try:
        names = [f"{hook_name}.hook_sae_acts_post", "lm.blocks.1.hook_resid_pre"]
        logits, cache = model.run_with_cache(prepared, names_filter=names, stop_early=False)
    finally:
        model.reset_saes()
    torch.testing.assert_close(cache[names[0]], features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache["lm.blocks.1.hook_resid_pre"], reconstruction, rtol=1e-5, atol=1e-5)
    # the forward goes on from the reconstruction: the same logits as putting it there by hand
    expected = model.run_with_hooks(prepared, fwd_hooks=[(hook_name, lambda value, hook: reconstruction)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, clean_logits, atol=1e-3)

    model.add_sae(sae, hook_name=hook_name, use_error_term=True)
    try:
        with_error = model(prepared)
    finally:
        model.reset_saes()
    torch.testing.assert_close(with_error, clean_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model(prepared), clean_logits)  # and gone once reset
