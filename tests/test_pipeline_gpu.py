"""Harvest loading at scale: GPU preprocessing's math (run on CPU tensors), chunked and persistent workers, the
streamed shard writer, and the compiled harvest that runs eager when compiling would not pay off.

References: the checkpoints' own processors on PIL images (Hugging Face CLIP and SigLIP, open_clip's transforms),
the single-thread harvest, and safetensors' own reader.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hooked_vlm import HookedVLM
from hooked_vlm.sae import activation_stream, harvest, harvest_to_store
from hooked_vlm.sae import pipeline as pipeline_module
from hooked_vlm.sae.gpu_preprocess import decode, device_transform, raw_image
from hooked_vlm.testing import sample_image, tiny_clip, tiny_llava_onevision, tiny_open_clip

CPU = torch.device("cpu")


def photo_files(folder, sizes=((640, 480), (480, 640), (301, 300), (640, 480))):
    """JPEGs of other sizes and orientations, and one PNG (decoded on the CPU by the GPU path too)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate(sizes):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    paths.append(folder / "last.png")
    Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.mark.parametrize("name", ["CLIPImageProcessor", "SiglipImageProcessor"])
def test_device_preprocessing_reproduces_the_hf_processor_on_cpu(tmp_path, name):
    import transformers

    processor = getattr(transformers, name)()
    paths = photo_files(tmp_path)
    raw = [raw_image(p) for p in paths]
    assert [r.dim() for r in raw] == [1, 1, 1, 1, 3]  # JPEG bytes; the PNG decoded
    ours = device_transform(processor)(decode(raw, CPU))
    reference = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape
    # the same decoder (libjpeg-turbo) and the processor's own steps: equal up to float rounding
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_device_preprocessing_of_open_clip_transforms(tmp_path):
    preprocess = tiny_open_clip()[1][0]
    paths = photo_files(tmp_path)
    ours = device_transform((preprocess, None))(decode([raw_image(p) for p in paths], CPU))
    reference = torch.stack([preprocess(Image.open(p)) for p in paths])
    difference = (ours - reference).abs()
    # a tensor resize against PIL's: a few levels of 255 on some pixels, scaled by 1/std (about 3.7)
    assert difference.max() < 0.1 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_a_worker_packs_a_batch_into_one_buffer(tmp_path):
    from hooked_vlm.sae.gpu_preprocess import unpack
    from hooked_vlm.sae.harvesting import image_source
    from hooked_vlm.sae.pipeline import _RawImages

    paths = photo_files(tmp_path)
    data, meta = _RawImages(image_source(tmp_path), [(0, 3), (3, 5)])[1]  # 3.jpg and last.png
    assert data.dim() == 1 and meta.shape == (2, 3)
    unpacked = unpack(data, meta)
    expected = [raw_image(p) for p in paths[3:]]
    assert [u.shape for u in unpacked] == [e.shape for e in expected]
    assert all(torch.equal(u, e) for u, e in zip(unpacked, expected, strict=True))


def test_gpu_preprocessing_refuses_variable_size_processors_and_cpu_models(tmp_path):
    llava = HookedVLM.from_hf(*tiny_llava_onevision())
    with pytest.raises(ValueError, match="fixed-size processors.*tiles, pads or resizes"):
        device_transform(llava.adapter.processor)
    clip = HookedVLM.from_hf(*tiny_clip())
    paths = photo_files(tmp_path)
    with pytest.raises(ValueError, match="preprocess='gpu'.*CUDA device"):
        next(harvest(clip, paths, "vision.blocks.0.hook_resid_post", preprocess="gpu", progress=False))
    with pytest.raises(ValueError, match="preprocess='cpu'"):
        next(harvest(clip, paths, "vision.blocks.0.hook_resid_post", preprocess="cpu", workers=1, progress=False))
    if not torch.cuda.is_available():  # the CLI says it in one line
        from hooked_vlm.sae.cli import main

        args = [
            "harvest",
            "tiny:clip",
            "--hook",
            "vision.blocks.0.hook_resid_post",
            "--images",
            str(tmp_path),
            "--preprocess",
            "gpu",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "store"),
        ]
        assert main(args) == 2


def test_chunked_workers_and_persistent_workers_across_passes(tmp_path, monkeypatch):
    model = HookedVLM.from_hf(*tiny_clip())
    hooks = ["vision.blocks.0.hook_resid_post"]
    images = [sample_image(width=40 + 8 * i, height=48, seed=i) for i in range(7)]
    # batches of 5 cut into chunks of 3 and 2 for two workers: the rows of one thread, in order
    one = list(harvest(model, images, hooks, positions="patches", batch_size=5, progress=False))
    many = list(harvest(model, images, hooks, positions="patches", batch_size=5, progress=False, workers=2))
    assert [(b.start, b.stop) for b in many] == [(0, 5), (5, 7)]
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a.acts[hooks[0]], b.acts[hooks[0]]) and torch.equal(a.index[hooks[0]], b.index[hooks[0]])
    # three passes of a stream fork the two workers once
    started = tmp_path / "started"
    started.mkdir()
    real = pipeline_module._worker_init

    def noted(worker_id):
        (started / f"{os.getpid()}").touch()
        real(worker_id)

    monkeypatch.setattr(pipeline_module, "_worker_init", noted)
    stream = activation_stream(model, images, hooks[0], batch_size=5, progress=False, workers=2, dtype=None)
    rows = [next(stream) for _ in range(6)]
    stream.close()
    reference = [a.acts[hooks[0]] for a in harvest(model, images, hooks, batch_size=5, progress=False)]
    for got, expected in zip(rows, reference * 3, strict=True):
        assert torch.equal(got, expected)
    assert len(list(started.iterdir())) == 2


def test_streamed_shards_read_back_through_safetensors(tmp_path):
    model = HookedVLM.from_hf(*tiny_clip())
    hooks = ["vision.blocks.0.hook_resid_post", "hook_image_embeds"]
    images = [sample_image(seed=i) for i in range(6)]
    store = harvest_to_store(
        model,
        images,
        hooks,
        tmp_path / "s",
        positions={hooks[0]: "patches", hooks[1]: "all"},
        batch_size=2,
        shard_mb=0.002,
        progress=False,
        dtype=torch.bfloat16,
    )
    assert store.n_shards > 1
    batches = list(
        harvest(
            model,
            images,
            hooks,
            positions={hooks[0]: "patches", hooks[1]: "all"},
            batch_size=2,
            progress=False,
            dtype=torch.bfloat16,
        )
    )
    for hook in hooks:
        assert torch.equal(store.read(hook), torch.cat([b.acts[hook] for b in batches]))
        assert torch.equal(store.index(hook), torch.cat([b.index[hook] for b in batches]))
    for entry in store.manifest["shards"]:  # safetensors' own reader takes every file, whole
        tensors = load_file(tmp_path / "s" / entry["file"])
        assert {k: len(v) for k, v in tensors.items() if k.startswith("acts/")} == {
            f"acts/{h}": n for h, n in entry["rows"].items()
        }
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["image_ids"] == [str(i) for i in range(6)] and manifest["n_images_done"] == 6


def test_a_short_compiled_harvest_runs_eager_and_says_so(caplog, monkeypatch):
    import hooked_vlm.compiled

    def never(*args, **kwargs):
        raise AssertionError("compiled although it would not pay off")

    model = HookedVLM.from_hf(*tiny_clip())
    images = [sample_image(seed=i) for i in range(3)]
    hook = "vision.blocks.0.hook_resid_post"
    eager = list(harvest(model, images, hook, batch_size=2, progress=False))
    monkeypatch.setattr(hooked_vlm.compiled, "CompiledHarvest", never)
    with caplog.at_level("WARNING", logger="hooked_vlm.compiled"):
        chosen = list(harvest(model, images, hook, batch_size=2, progress=False, compiled=True))
    assert "not worth it for 3 images" in caplog.text and "compiled='always'" in caplog.text
    for a, b in zip(eager, chosen, strict=True):
        assert torch.equal(a.acts[hook], b.acts[hook])
    with pytest.raises(AssertionError, match="would not pay off"):  # 'always' compiles however short
        list(harvest(model, images, hook, batch_size=2, progress=False, compiled="always"))
    with pytest.raises(ValueError, match="compiled='fast'"):
        list(harvest(model, images, hook, batch_size=2, progress=False, compiled="fast"))
