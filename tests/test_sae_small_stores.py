"""``train-sae`` on stores too small for its settings: one clear line, or a warning saying what to change.

The case of the first-contact review: a 640-row store (40 tiny-CLIP images, patches) with the default batch of
4096 rows crashed with a ``ZeroDivisionError`` traceback, and a batch of 128 "succeeded" after 5 steps silently.
"""

from __future__ import annotations

import pytest

from hooked_vlm.sae import harvest_to_store, train_sae
from hooked_vlm.sae.cli import add_commands, main
from hooked_vlm.sae.train import MIN_STEPS, FewStepsWarning

HOOK = "vision.blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from hooked_vlm import HookedVLM
    from hooked_vlm.testing import sample_image, tiny_clip

    model = HookedVLM.from_hf(*tiny_clip())
    pictures = [sample_image(width=64, height=64, seed=i) for i in range(40)]
    path = tmp_path_factory.mktemp("small")
    made = harvest_to_store(model, pictures, [HOOK], path, positions="patches", batch_size=20, progress=False)
    assert made.n_rows[HOOK] == 640
    return made


def test_fewer_rows_than_one_batch_is_one_clear_line(store, tmp_path, capsys):
    code = main(["train-sae", "--store", str(store.path), "--hook", HOOK, "--out", str(tmp_path / "sae")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hooked-vlm: error: the data has 640 rows a pass, fewer than one "
                                                "batch of 4096 rows")
    assert "--batch-size" in err[0] and "--training-samples" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "sae").exists()
    with pytest.raises(ValueError, match="training_samples=100, fewer than one batch of 128"):
        train_sae(store, HOOK, batch_size=128, training_samples=100)


def test_a_handful_of_steps_warns_what_to_change(store, tmp_path, capsys):
    with pytest.warns(FewStepsWarning, match=rf"only 5 training steps of 128 rows.*--training-samples\) "
                                             rf"{MIN_STEPS * 128}.*--batch-size\) to 6"):
        train_sae(store, HOOK, batch_size=128, expansion_factor=2, k=4, n_batches_for_norm_estimate=1,
                  output_path=tmp_path / "python")
    assert main(["train-sae", "--store", str(store.path), "--hook", HOOK, "--batch-size", "128",
                 "--expansion-factor", "2", "--k", "4", "--n-batches-for-norm-estimate", "1",
                 "--out", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert "hooked-vlm: warning: the data has 640 rows a pass: only 5 training steps" in err
    assert "UserWarning" not in err and "warnings.warn" not in err
    # enough passes over the same 640 rows: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FewStepsWarning)
        trained = train_sae(store, HOOK, batch_size=32, training_samples=32 * MIN_STEPS, expansion_factor=2, k=4,
                            n_batches_for_norm_estimate=1, output_path=tmp_path / "enough")
    assert len(trained.losses) == MIN_STEPS and trained.losses[-1] < trained.losses[0]


def test_help_shows_every_default():
    import argparse

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    add_commands(commands)
    for name in ("harvest", "train-sae"):
        command = commands.choices[name]
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert action.help and "default" in command._get_formatter()._expand_help(action), action.dest
        assert "(default: 4096)" in text or name == "harvest"
    assert f"at least {MIN_STEPS} × --batch-size" in " ".join(commands.choices["train-sae"].format_help().split())
