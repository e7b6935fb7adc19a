"""The disk activation store: bit-exact round trip, resumption after crashes, shuffled streams.

References: the rows :func:`harvest` yields for the same images (themselves checked against ``run_with_cache``
in test_sae_harvest.py), and an uninterrupted harvest into another folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.sae import ActivationStore, ImageSource, StoreMismatchError, harvest, harvest_to_store, image_source
from hooked_vlm.sae import store as store_module
from hooked_vlm.testing import sample_image, tiny_clip, tiny_llava_onevision

HOOKS = ["vision.blocks.0.hook_resid_post", "vision.blocks.1.attn.hook_z", "hook_image_embeds"]
N_IMAGES = 11
SHARD_MB = 0.004  # ≈ 2 forwards of 2 images per shard


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def pictures():
    return [sample_image(width=64 + 8 * i, height=64, seed=i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def clean(model, pictures, tmp_path_factory):
    """A store harvested without interruption."""
    path = tmp_path_factory.mktemp("clean")
    return harvest_to_store(model, pictures, HOOKS, path, batch_size=2, shard_mb=SHARD_MB, progress=False)


def test_round_trip_is_bit_exact_and_traceable(model, pictures, clean):
    assert clean.complete and clean.n_shards >= 3
    batches = list(harvest(model, pictures, HOOKS, batch_size=2, progress=False))
    for hook in HOOKS:
        assert torch.equal(clean.read(hook), torch.cat([b.acts[hook] for b in batches]))
        assert torch.equal(clean.index(hook), torch.cat([b.index[hook] for b in batches]))
    assert clean.d_in("vision.blocks.1.attn.hook_z") == 32 and clean.n_rows["hook_image_embeds"] == N_IMAGES
    manifest = json.loads((clean.path / "manifest.json").read_text())
    assert manifest["hook_names"] == HOOKS and manifest["positions"] == "all" and manifest["dtype"] == "float32"
    assert manifest["image_ids"] == [str(i) for i in range(N_IMAGES)] and manifest["model"] == "clip:CLIPModel"
    # row 40 of block 0: image 2 (17 rows per image), batch row 0 of the forward over images 2-3, patch 6 = (1, 1)
    assert clean.trace(HOOKS[0], 40) == {"image_id": "2", "image": 2, "batch_row": 0, "position": 6, "tile": 0,
                                         "row": 1, "col": 1}


class Crash(RuntimeError):
    pass


def crashing(pictures, at):
    """The same images and ids, but loading image ``at`` raises (once)."""
    state = {"crashed": False}

    def load(start, stop):
        if start <= at < stop and not state["crashed"]:
            state["crashed"] = True
            raise Crash
        return pictures[start:stop]

    return ImageSource([str(i) for i in range(len(pictures))], "crashing list", load)


def assert_same_store(store, clean):
    assert store.complete
    for hook in HOOKS:
        assert torch.equal(store.read(hook), clean.read(hook))
        assert torch.equal(store.index(hook), clean.index(hook))
    images = store.index(HOOKS[0])[:, 0]
    assert torch.equal(images.bincount(), torch.full((N_IMAGES,), 17))  # every image once, none twice


def test_resumes_after_a_crash_mid_shard_without_gaps_or_duplicates(model, pictures, clean, tmp_path):
    source = crashing(pictures, at=7)
    with pytest.raises(Crash):
        harvest_to_store(model, source, HOOKS, tmp_path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    interrupted = ActivationStore(tmp_path)
    assert not interrupted.complete
    done = interrupted.manifest["n_images_done"]
    assert 0 < done <= 6  # the forward over images 6-7 crashed; rows pending for the next shard were lost
    assert interrupted.n_rows[HOOKS[0]] == 17 * done
    resumed = harvest_to_store(model, source, HOOKS, tmp_path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    assert_same_store(resumed, clean)


def test_resumes_after_a_crash_between_shard_and_manifest(model, pictures, clean, tmp_path, monkeypatch):
    real = store_module._write_json
    calls = []

    def write_json(path, data):
        calls.append(1)
        if len(calls) == 3:  # the fresh manifest, shard 0's update, then shard 1's update fails
            raise Crash
        real(path, data)

    monkeypatch.setattr(store_module, "_write_json", write_json)
    with pytest.raises(Crash):
        harvest_to_store(model, pictures, HOOKS, tmp_path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    monkeypatch.setattr(store_module, "_write_json", real)
    assert (tmp_path / "shard_00001.safetensors").exists()  # written, but not in the manifest
    assert ActivationStore(tmp_path).n_shards == 1
    (tmp_path / "shard_00009.safetensors.tmp").write_text("half-written")
    resumed = harvest_to_store(model, pictures, HOOKS, tmp_path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    assert not (tmp_path / "shard_00009.safetensors.tmp").exists()
    assert_same_store(resumed, clean)


def test_other_settings_do_not_mix_into_a_store(model, pictures, clean, tmp_path):
    harvest_to_store(model, pictures[:3], HOOKS[:1], tmp_path, batch_size=2, progress=False)
    with pytest.raises(StoreMismatchError, match="positions"):
        harvest_to_store(model, pictures[:3], HOOKS[:1], tmp_path, positions="patches", batch_size=2, progress=False)
    with pytest.raises(StoreMismatchError, match="image_ids"):
        harvest_to_store(model, pictures[:4], HOOKS[:1], tmp_path, batch_size=2, progress=False)
    redone = harvest_to_store(model, pictures[:3], HOOKS[:1], tmp_path, positions="patches", batch_size=2,
                              overwrite=True, progress=False)
    assert redone.n_rows[HOOKS[0]] == 3 * 16
    halves = harvest_to_store(model, pictures[:3], HOOKS[:1], tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    assert halves.read(HOOKS[0]).dtype == torch.bfloat16
    assert torch.equal(halves.read(HOOKS[0]), clean.read(HOOKS[0])[: 3 * 17].bfloat16())


def test_shuffled_stream_serves_every_row_once_per_pass(clean):
    rows = clean.read(HOOKS[0])
    served = list(clean.stream(HOOKS[0], batch_size=16, buffer_shards=2, seed=1))
    assert [len(b) for b in served[:-1]] == [16] * (len(served) - 1) and 0 < len(served[-1]) <= 16
    streamed = torch.cat(served)
    assert not torch.equal(streamed, rows)  # shuffled...
    assert sorted(map(tuple, streamed.tolist())) == sorted(map(tuple, rows.tolist()))  # ...but the same rows
    assert torch.equal(torch.cat(list(clean.stream(HOOKS[0], 16, shuffle=False))), rows)
    endless = clean.stream(HOOKS[:2], batch_size=64, loop=True, dtype=torch.float64)
    batches = [next(endless) for _ in range(2 * len(rows) // 64 + 1)]  # more than two passes
    assert all(b[HOOKS[0]].shape == (64, 32) and b[HOOKS[0]].dtype == torch.float64 for b in batches)
    # the two hooks of a row stay together: a block-0 row and the same position's block-1 hook_z row
    block0, z = clean.read(HOOKS[0]), clean.read(HOOKS[1])
    first = batches[0]
    where = [next(i for i in range(len(block0)) if torch.equal(block0[i].double(), r)) for r in first[HOOKS[0]][:5]]
    assert torch.equal(first[HOOKS[1]][:5], z[where].double())
    with pytest.raises(ValueError, match="different row counts"):
        next(clean.stream([HOOKS[0], "hook_image_embeds"], batch_size=4))


def test_vlm_store_keeps_vision_and_lm_rows_with_their_images(tmp_path):
    model = HookedVLM.from_hf(*tiny_llava_onevision())
    pictures = [sample_image(width=48 + 16 * i, height=48, seed=i) for i in range(3)]
    hooks = {"vision.blocks.0.hook_resid_post": "patches", "lm.blocks.0.hook_resid_post": "image"}
    store = harvest_to_store(model, pictures, list(hooks), tmp_path, positions=hooks, prompt="Hi", batch_size=2,
                             progress=False)
    assert store.positions("lm.blocks.0.hook_resid_post") == "image"
    for hook in hooks:
        index = store.index(hook)
        assert index[:, 0].unique().tolist() == [0, 1, 2]
        for image in range(3):
            first = 2 * (image // 2)
            batch = pictures[first : first + 2]
            prepared = model.prepare_inputs([[p] for p in batch], prompt=["Hi"] * len(batch))
            with torch.no_grad():
                _, cache = model.run_with_cache(prepared, names_filter=[hook])
            mine = index[:, 0] == image
            assert torch.equal(store.read(hook)[mine], cache[hook][index[mine, 1], index[mine, 2]])
    assert image_source(pictures).ids == store.image_ids


# ---- integrity: every defect of the reliability review (C08-C17) is caught, naming the file ----------------------
def copy_store(clean, to):
    import shutil

    shutil.copytree(clean.path, to)
    return to


def shard_file(path, i):
    return path / json.loads((path / "manifest.json").read_text())["shards"][i]["file"]


def test_several_forwards_per_shard_resume_without_duplicates(model, pictures, clean, tmp_path):
    # default shard size: one shard holds all six forwards
    whole = harvest_to_store(model, pictures, HOOKS, tmp_path / "default", batch_size=2, progress=False)
    assert whole.n_shards == 1 and whole.manifest["shards"][0]["images"] == [0, N_IMAGES]
    assert_same_store(whole, clean)
    # three forwards a shard, interrupted in the second shard: the resume starts at the first image not listed
    shard_mb = 3 * (2 * 17 * 32 + 2 * 17 * 32 + 2 * 16) * 4 / 2**20 * 0.99
    source = crashing(pictures, at=9)
    with pytest.raises(Crash):
        harvest_to_store(model, source, HOOKS, tmp_path / "s", batch_size=2, shard_mb=shard_mb, progress=False)
    interrupted = ActivationStore(tmp_path / "s")
    assert [s["images"] for s in interrupted.manifest["shards"]] == [[0, 6]]
    resumed = harvest_to_store(model, source, HOOKS, tmp_path / "s", batch_size=2, shard_mb=shard_mb, progress=False)
    assert [s["images"] for s in resumed.manifest["shards"]] == [[0, 6], [6, 11]]
    assert_same_store(resumed, clean)


def test_flipped_bytes_are_caught_on_read_and_redone_on_resume(model, pictures, clean, tmp_path, caplog):
    path = copy_store(clean, tmp_path / "s")
    file = shard_file(path, 1)
    data = bytearray(file.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # tensor data, the header stays valid
    file.write_bytes(bytes(data))
    with pytest.raises(store_module.CorruptStoreError, match=f"{file.name}.*sha256"):
        ActivationStore(path).read(HOOKS[0])
    with caplog.at_level("WARNING"):
        resumed = harvest_to_store(model, pictures, HOOKS, path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    assert file.name in caplog.text
    assert_same_store(resumed, clean)


def test_truncated_last_shard_is_never_certified_complete(model, pictures, clean, tmp_path):
    path = copy_store(clean, tmp_path / "s")
    last = shard_file(path, clean.n_shards - 1)
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(store_module.CorruptStoreError, match=f"{last.name} is 100 bytes"):
        ActivationStore(path, verify=False).read(HOOKS[0])
    with pytest.raises(store_module.CorruptStoreError, match=last.name):
        ActivationStore(path).trace(HOOKS[0], -1)
    resumed = harvest_to_store(model, pictures, HOOKS, path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    assert_same_store(resumed, clean)


def test_swapped_shards_and_wrong_row_counts_are_caught_without_hashes(clean, tmp_path):
    path = copy_store(clean, tmp_path / "s")
    manifest = json.loads((path / "manifest.json").read_text())
    first, second = manifest["shards"][0], manifest["shards"][1]
    a, b = path / first["file"], path / second["file"]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes), b.write_bytes(a_bytes)
    for key in ("size", "sha256"):  # as if the swapped files had been listed so: only provenance can tell
        first[key], second[key] = second[key], first[key]
    first["rows"], second["rows"] = second["rows"], first["rows"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store_module.CorruptStoreError, match=f"{a.name} holds rows of images 2..3.*images 0:2"):
        ActivationStore(path).read(HOOKS[0])
    clean_manifest = json.loads((clean.path / "manifest.json").read_text())
    clean_manifest["shards"][0]["rows"][HOOKS[0]] += 5
    (path / "manifest.json").write_text(json.dumps(clean_manifest))
    a.write_bytes(a_bytes), b.write_bytes(b_bytes)
    with pytest.raises(store_module.CorruptStoreError, match=f"{a.name} holds 34 rows.* says 39"):
        ActivationStore(path, verify=False).read(HOOKS[0])


def test_unreadable_files_and_paths_outside_the_store_name_the_file(clean, tmp_path):
    path = copy_store(clean, tmp_path / "s")
    manifest_path = path / "manifest.json"
    text = manifest_path.read_text()
    manifest_path.write_text(text[: len(text) // 2])
    with pytest.raises(store_module.CorruptStoreError, match="manifest.json is not a readable manifest"):
        ActivationStore(path)
    manifest_path.write_text(text)
    manifest = json.loads(text)
    file = path / manifest["shards"][0]["file"]
    data = bytearray(file.read_bytes())
    data[8:16] = b"\x00" * 8  # the header's JSON
    file.write_bytes(bytes(data))
    with pytest.raises(store_module.CorruptStoreError, match=f"{file.name} is not a readable safetensors file"):
        ActivationStore(path, verify=False)._load(0, [f"acts/{HOOKS[0]}"], whole=False)
    for outside in ("../clean/shard_00000.safetensors", str(clean.path / "shard_00000.safetensors")):
        manifest["shards"][0]["file"] = outside
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(store_module.CorruptStoreError, match="outside the store"):
            ActivationStore(path)


def test_trace_reads_one_index_key_only(clean, monkeypatch):
    index = clean.index(HOOKS[0])
    fresh = ActivationStore(clean.path)
    monkeypatch.setattr(store_module, "load_bytes", lambda data: pytest.fail("trace read a whole shard"))
    for row in (0, 40, 35, len(index) - 1, -1):
        image, *rest = index[row].tolist()
        assert fresh.trace(HOOKS[0], row) == {"image_id": str(image), **dict(zip(store_module.INDEX_COLUMNS,
                                                                                   [image, *rest], strict=True))}
    with pytest.raises(IndexError, match="row 999 out of range"):
        fresh.trace(HOOKS[0], 999)


def test_a_second_writer_is_refused(model, pictures, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s"
    path.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; d = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(d, fcntl.LOCK_EX); os.write(d, b'pid %d' % os.getpid()); print('held', flush=True); "
        "time.sleep(60)"), str(path / "writer.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(store_module.StoreLockedError, match=f"pid {holder.pid} .*writer.lock"):
            harvest_to_store(model, pictures[:2], HOOKS[:1], path, batch_size=2, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert harvest_to_store(model, pictures[:2], HOOKS[:1], path, batch_size=2, progress=False).complete
