"""Data-parallel harvesting: parts per rank merge into the rows of one process; prefetching keeps rows the same.

References: a single-process store of the same images (itself checked bit-exact against ``harvest`` and
``run_with_cache`` in test_sae_store.py), and ``harvest`` without prefetching. The process-group path runs for real:
``torchrun`` with two gloo ranks on the CPU, through the ``harvest`` command.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.sae import (
    ActivationStore,
    ImageSource,
    StoreMismatchError,
    harvest,
    harvest_to_store,
    merge_stores,
    rank_images,
    train_sae,
)
from hooked_vlm.sae.cli import main
from hooked_vlm.testing import sample_image, tiny_clip

HOOKS = ["vision.blocks.0.hook_resid_post", "hook_image_embeds"]
N_IMAGES = 11
SHARD_MB = 0.004  # a shard per forward of 2 images


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def pictures():
    return [sample_image(width=64 + 8 * i, height=64, seed=i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def clean(model, pictures, tmp_path_factory):
    """A store harvested by one process."""
    return harvest_to_store(model, pictures, HOOKS, tmp_path_factory.mktemp("clean"), batch_size=2, shard_mb=SHARD_MB,
                            progress=False)


def harvest_parts(model, source, path, world_size, ranks=None, **kwargs):
    for rank in range(world_size) if ranks is None else ranks:
        harvest_to_store(model, source, HOOKS, path, batch_size=2, shard_mb=SHARD_MB, progress=False, rank=rank,
                         world_size=world_size, **kwargs)


def assert_same_rows(store, clean, hooks=HOOKS, exact=True):
    """The same rows as the single-process store, in the same order (so also the same set), each once.

    ``exact=False`` for stores harvested in other processes: torchrun's workers run with another number of
    intra-op threads (OMP_NUM_THREADS), which changes the order of float sums in the last bits."""
    assert store.complete and store.manifest["image_range"] == [0, len(clean.image_ids)]
    for hook in hooks:
        if exact:
            assert torch.equal(store.read(hook), clean.read(hook))
        else:
            torch.testing.assert_close(store.read(hook), clean.read(hook), rtol=1e-4, atol=1e-5)
        assert torch.equal(store.index(hook), clean.index(hook))
        index = store.index(hook)
        assert len(index[:, [0, 2]].unique(dim=0)) == len(index)  # no (image, position) twice
    assert sorted(store.index(hooks[0])[:, 0].unique().tolist()) == list(range(len(clean.image_ids)))


class Crash(RuntimeError):
    pass


def counting_source(pictures, crash_at=None):
    """The pictures, recording which image ranges were loaded; loading image ``crash_at`` raises."""
    loads = []

    def load(start, stop):
        loads.append((start, stop))
        if crash_at is not None and start <= crash_at < stop:
            raise Crash(f"cannot read image {crash_at}")
        return pictures[start:stop]

    return ImageSource([str(i) for i in range(len(pictures))], "counting list", load), loads


def prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("harvest-prefetch")]


def test_prefetching_keeps_rows_stays_one_batch_ahead_and_cleans_up(model, pictures):
    plain = list(harvest(model, pictures, HOOKS, batch_size=3, progress=False, prefetch=False))
    fetched = list(harvest(model, pictures, HOOKS, batch_size=3, progress=False))
    for a, b in zip(plain, fetched, strict=True):
        assert (a.start, a.stop) == (b.start, b.stop)
        for hook in HOOKS:
            assert torch.equal(a.acts[hook], b.acts[hook]) and torch.equal(a.index[hook], b.index[hook])

    source, loads = counting_source(pictures)
    batches = harvest(model, source, HOOKS, batch_size=3, progress=False)
    next(batches)
    deadline = time.monotonic() + 10
    while len(loads) < 2 and time.monotonic() < deadline:  # the worker runs on its own time
        time.sleep(0.01)
    assert loads == [(0, 3), (3, 6)]  # the next batch is prepared while the caller holds the first, and no more
    batches.close()  # a consumer that stops early: the worker is joined, nothing is loaded after
    assert not prefetch_threads() and loads == [(0, 3), (3, 6)]

    source, loads = counting_source(pictures, crash_at=7)
    batches = harvest(model, source, HOOKS, batch_size=3, progress=False)
    assert next(batches).stop == 3 and next(batches).stop == 6  # batches before the failing one still come
    with pytest.raises(Crash, match="image 7"):
        next(batches)
    assert not prefetch_threads()


def test_rank_images_are_whole_forwards_that_tile_the_source():
    for n, batch, world in [(11, 2, 3), (11, 4, 8), (1000, 64, 4), (5, 16, 2)]:
        runs = [rank_images(n, batch, rank, world) for rank in range(world)]
        assert runs[0][0] == 0 and runs[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        assert all(start % batch == 0 for start, _ in runs)
        forwards = [-(-(stop - start) // batch) for start, stop in runs]
        assert max(forwards) - min(forwards) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        rank_images(10, 2, 2, 2)


def test_parts_merge_into_the_rows_of_one_process(model, pictures, clean, tmp_path):
    harvest_parts(model, pictures, tmp_path, world_size=3)
    part = ActivationStore(tmp_path / "rank-1-of-3")
    assert part.image_range == (4, 8) and part.complete and part.image_ids == clean.image_ids
    merged = merge_stores(tmp_path)
    assert merged.manifest["parts"] == ["rank-0-of-3", "rank-1-of-3", "rank-2-of-3"]
    assert merged.manifest["shards"][0]["file"] == "rank-0-of-3/shard_00000.safetensors"
    assert_same_rows(merged, clean)
    assert merged.trace(HOOKS[0], 100) == clean.trace(HOOKS[0], 100)
    assert ActivationStore(tmp_path).n_rows == clean.n_rows

    # more ranks than forwards (6): some parts are empty, rank 0's among them
    harvest_parts(model, pictures, tmp_path / "wide", world_size=8)
    assert ActivationStore(tmp_path / "wide" / "rank-0-of-8").image_range == (0, 0)
    assert_same_rows(merge_stores(tmp_path / "wide"), clean)


def test_a_part_resumes_after_a_crash(model, pictures, clean, tmp_path):
    source, _ = counting_source(pictures, crash_at=9)
    harvest_parts(model, source, tmp_path, world_size=2, ranks=[0])
    with pytest.raises(Crash):
        harvest_parts(model, source, tmp_path, world_size=2, ranks=[1])
    interrupted = ActivationStore(tmp_path / "rank-1-of-2")
    assert interrupted.image_range == (6, 11) and not interrupted.complete
    with pytest.raises(ValueError, match=r"parts not finished in .*: rank-1-of-2 \(\d/5 images\)"):
        merge_stores(tmp_path)
    source, loads = counting_source(pictures)
    harvest_parts(model, source, tmp_path, world_size=2)
    assert min(start for start, _ in loads) >= interrupted.manifest["n_images_done"]  # nothing redone
    assert_same_rows(merge_stores(tmp_path), clean)


def test_merge_refuses_gaps_overlaps_and_mixed_settings(model, pictures, tmp_path):
    harvest_parts(model, pictures, tmp_path / "gap", world_size=3, ranks=[0, 2])
    with pytest.raises(ValueError, match=r"no part in .* holds images 4:8 \(parts: rank-0-of-3, rank-2-of-3\)"):
        merge_stores(tmp_path / "gap")
    harvest_parts(model, pictures, tmp_path / "end", world_size=3, ranks=[0, 1])
    with pytest.raises(ValueError, match=r"holds images 8:11"):
        merge_stores(tmp_path / "end")
    harvest_parts(model, pictures, tmp_path / "mixed", world_size=2)
    harvest_parts(model, pictures, tmp_path / "mixed", world_size=3, ranks=[1])
    with pytest.raises(ValueError, match=r"rank-1-of-3 \(images 4:8\) overlaps rank-0-of-2 \(images 0:6\)"):
        merge_stores(tmp_path / "mixed")
    harvest_parts(model, pictures, tmp_path / "mixed", world_size=2, overwrite=True)  # removes other ranks' parts
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]
    harvest_parts(model, pictures, tmp_path / "dtype", world_size=2, ranks=[0])
    harvest_parts(model, pictures, tmp_path / "dtype", world_size=2, ranks=[1], dtype=torch.bfloat16)
    with pytest.raises(StoreMismatchError, match="rank-1-of-2 and rank-0-of-2 .* other dtype"):
        merge_stores(tmp_path / "dtype")
    with pytest.raises(FileNotFoundError, match="no parts"):
        merge_stores(tmp_path / "nothing")


def test_one_folder_holds_a_single_process_or_a_data_parallel_store(model, pictures, clean, tmp_path):
    single = harvest_to_store(model, pictures[:4], HOOKS, tmp_path, batch_size=2, progress=False)
    with pytest.raises(StoreMismatchError, match="single process"):
        harvest_parts(model, pictures, tmp_path, world_size=2, ranks=[0])
    assert single.n_shards == 1 and not (tmp_path / "rank-0-of-2").exists()
    harvest_parts(model, pictures, tmp_path, world_size=2, overwrite=True)
    assert not list(tmp_path.glob("shard_*")) and not (tmp_path / "manifest.json").exists()
    merged = merge_stores(tmp_path)
    assert_same_rows(merged, clean)
    # a single-process harvest of the same settings finds the merged store complete and changes nothing
    again = harvest_to_store(model, pictures, HOOKS, tmp_path, batch_size=2, shard_mb=SHARD_MB, progress=False)
    assert again.manifest == merged.manifest


def test_torchrun_harvest_then_training_reads_the_merged_store(tmp_path):
    hook = "vision.blocks.1.hook_resid_post"
    args = ["harvest", "tiny:clip", "--hook", hook, "--positions", "patches", "--n-sample-images", "10",
            "--batch-size", "4", "--shard-mb", "0.002", "--device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hooked_vlm.sae",
         *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # CPU sums depend on the threads
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ActivationStore(") == 1  # rank 0 prints the merged store
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = ActivationStore(tmp_path / "one"), ActivationStore(tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["parts"] == ["rank-0-of-2", "rank-1-of-2"] and manifest["n_images_done"] == 10
    assert [ActivationStore(tmp_path / "two" / p).image_range for p in manifest["parts"]] == [(0, 4), (4, 10)]
    assert_same_rows(two, one, [hook], exact=False)
    trained = train_sae(two, hook, output_path=tmp_path / "sae", batch_size=32, n_batches_for_norm_estimate=1,
                        expansion_factor=2, k=4)
    assert len(trained.losses) == two.n_rows[hook] // 32  # one pass over the merged store
