"""The ``hooked-vlm`` CLI, the plotting functions, hook-name descriptions and the Phase 0 example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.cli import main
from hooked_vlm.names import describe_hook
from hooked_vlm.plotting import attention_map, head_grid, patch_heatmap
from hooked_vlm.testing import TINY_MODELS
from hooked_vlm.testing.clip import tiny_clip_config

REPO = Path(__file__).resolve().parents[1]


def markdown_rows(text: str) -> dict[str, list[str]]:
    """``name → other cells`` of every markdown table row whose first cell is a `code` name."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def axes_pixels(fig, path: Path) -> np.ndarray:
    """The RGB pixels of the figure's first axes, cut out of the saved PNG (a 2-px margin drops the frame)."""
    png = matplotlib.image.imread(path)[..., :3]
    box = fig.axes[0].get_window_extent()  # display pixels, origin at the bottom left
    top, bottom = png.shape[0] - int(box.y1), png.shape[0] - int(box.y0)
    return png[top + 2 : bottom - 2, int(box.x0) + 2 : int(box.x1) - 2]


# ---- inspect ------------------------------------------------------------------------------------------------------


def test_inspect_without_a_model_reports_real_names_and_shapes(tmp_path, capsys):
    assert main(["inspect", "--out", str(tmp_path), "--device", "cpu", "--verbose"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert capsys.readouterr().out.strip() == report.strip()

    # Shapes follow from the tiny config alone: 1 CLS + (image / patch)² patches, d_head = hidden / heads.
    vision = tiny_clip_config().vision_config
    tokens = 1 + (vision.image_size // vision.patch_size) ** 2
    heads, d_head = vision.num_attention_heads, vision.hidden_size // vision.num_attention_heads
    rows = markdown_rows(report)
    assert rows["vision.blocks.1.attn.hook_z"][:2] == [str([1, tokens, heads, d_head]), describe_hook("attn.hook_z")[1]]
    assert rows["vision.blocks.0.attn.hook_pattern"][0] == str([1, heads, tokens, tokens])
    assert rows["vision.blocks.0.mlp.hook_pre"][0] == str([1, tokens, vision.intermediate_size])
    assert rows["vision.blocks.0.attn.hook_z"][2] == "vision_model.encoder.layers.0.self_attn.out_proj → input"
    # every hook point is listed, and the default caption reaches the text tower too
    assert set(rows) == set(HookedVLM.from_hf(*TINY_MODELS["clip"]()).hook_names())
    assert not any(cells[0].startswith("—") for cells in rows.values())
    assert f"| vision | {vision.num_hidden_layers} | {vision.hidden_size} | {heads} | {heads} | {d_head} |" in report
    assert "visual_projection: Linear(32 → 16, no bias)" in report
    assert f"1 CLS + {tokens - 1} patches = {tokens} positions" in report

    png = matplotlib.image.imread(tmp_path / "flow.png")
    assert png.shape[0] > 300 and png.shape[1] > 300 and png[..., :3].std() > 0.05  # drawn, not blank
    assert "![flow diagram](flow.png)" in report


@pytest.mark.parametrize("tiny", sorted(set(TINY_MODELS) - {"clip"}))
def test_inspect_runs_on_every_tiny_model(tiny, tmp_path, capsys):
    assert main(["inspect", f"tiny:{tiny}", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = markdown_rows((tmp_path / "report.md").read_text())
    assert set(rows) == set(HookedVLM.from_hf(*TINY_MODELS[tiny]()).hook_names())
    assert all(cells[0].startswith("[") for cells in rows.values())  # the default prompt / caption reaches every hook
    assert (tmp_path / "flow.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "tiny:nope"], "unknown tiny model 'tiny:nope'; available: tiny:clip"),
        (["inspect", "--image", "{tmp}/missing.png"], "image file not found: {tmp}/missing.png"),
        (["inspect", "--image", "{tmp}/not_an_image.png"], "cannot read {tmp}/not_an_image.png as an image"),
        (["inspect", "{tmp}/no_such_folder"], "model folder not found: {tmp}/no_such_folder"),
        (["inspect", "config:openai/clip-vit-large-patch14"], "config:openai/clip-vit-large-patch14 has no weights"),
        (["hooks", "config:no/such-model"], "no shipped config 'no--such-model'"),
    ],
)
def test_errors_are_one_clear_line(argv, message, tmp_path, capsys):
    (tmp_path / "not_an_image.png").write_text("hello")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "inspect" else argv) == 2
    err = capsys.readouterr().err
    assert f"hooked-vlm: error: {message.format(tmp=tmp_path)}" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "hooked-vlm: error: CUDA is not available" in capsys.readouterr().err


# ---- hooks --------------------------------------------------------------------------------------------------------


def test_hooks_markdown_on_a_meta_config_has_real_sizes(capsys):
    assert main(["hooks", "config:openai/clip-vit-large-patch14", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| name | shape | convention | meaning |")
    rows = markdown_rows(out)
    # ViT-L/14 at 224 px: 1 + 16² = 257 tokens, 16 heads × 64, MLP 4096, 768-d embeddings; text: 77 tokens, 12 × 64.
    assert rows["vision.blocks.23.attn.hook_z"] == ["[1, 257, 16, 64]", *describe_hook("vision.blocks.23.attn.hook_z")]
    assert rows["vision.blocks.0.attn.hook_pattern"][0] == "[1, 16, 257, 257]"
    assert rows["vision.blocks.0.mlp.hook_pre"][0] == "[1, 257, 4096]"
    assert rows["vision.hook_out"][0] == "[1, 1024]"
    assert rows["hook_image_embeds"][0] == "[1, 768]"
    assert rows["text.blocks.11.attn.hook_q"][0] == "[1, 77, 12, 64]"
    assert rows["hook_text_embeds"][0] == "[1, 768]"
    # 24 vision and 12 text blocks of 16 hooks, 4 vision-level and 3 text-level hooks
    assert len(rows) == 24 * 16 + 12 * 16 + 4 + 3


def test_hooks_without_example_inputs_still_lists_names(monkeypatch, capsys):
    from hooked_vlm.adapters.clip import CLIPAdapter

    monkeypatch.setattr(CLIPAdapter, "example_inputs", lambda self: None)
    assert main(["hooks", "config:openai/clip-vit-large-patch14", "--markdown"]) == 0
    out, err = capsys.readouterr()
    assert "the clip adapter builds no example inputs" in err
    rows = markdown_rows(out)
    assert rows["vision.blocks.23.attn.hook_z"][0] == "?" and {cells[0] for cells in rows.values()} == {"?"}


def test_hooks_collapse_gives_one_row_per_block_hook(capsys):
    assert main(["hooks", "config:openai/clip-vit-large-patch14", "--collapse"]) == 0
    lines = capsys.readouterr().out.splitlines()
    z = [line for line in lines if "attn.hook_z" in line]
    assert len(z) == 2 and z[0].split()[:2] == ["vision.blocks.{0..23}.attn.hook_z", "[1,"]
    assert "[1, 257, 16, 64]" in z[0] and "[1, 77, 12, 64]" in z[1]


# ---- names --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", sorted(TINY_MODELS))
def test_every_hook_name_of_every_adapter_is_described(tiny):
    model = HookedVLM.from_hf(*TINY_MODELS[tiny]())
    undescribed = [name for name in model.hook_names() if describe_hook(name)[0] == "?"]
    assert not undescribed


def test_describe_hook_falls_back_without_raising():
    assert describe_hook("lm.blocks.7.attn.hook_rot_k") == (
        "[batch, pos, head, d_head]",
        describe_hook("attn.hook_rot_k")[1],
    )
    assert describe_hook("projector.hook_packed")[0] == "[batch, image_tokens, d_lm]"
    assert describe_hook("projector.mlp.hook_post")[1].endswith("(projector)")
    assert (
        describe_hook("hf.vision_model.encoder.layers.0.mlp.hook_out")[1]
        == "output of 'hf.vision_model.encoder.layers.0.mlp'"
    )
    assert describe_hook("vision.blocks.0.attn.hook_unheard_of")[0] == "?"


# ---- plotting -----------------------------------------------------------------------------------------------------


def test_patch_heatmap_keeps_the_hot_cell_top_left_for_a_wide_image(tmp_path):
    values = torch.zeros(2, 4)
    values[0, 0] = 1.0
    path = tmp_path / "heat.png"
    fig = patch_heatmap(Image.new("RGB", (120, 60)), values, path)
    pixels = axes_pixels(fig, path).mean(-1)
    height, width = pixels.shape
    assert 1.9 < width / height < 2.1  # the image keeps its aspect ratio
    hot = pixels[: height // 2, : width // 4].mean()
    assert hot > 0.3 and hot > 5 * pixels[:, width // 4 :].mean() and hot > 5 * pixels[height // 2 :].mean()


def test_attention_map_arranges_a_flat_pattern_row_major(tmp_path):
    pattern = torch.zeros(2 * 4)
    pattern[4 + 3] = 1.0  # row 1, col 3: bottom right
    path = tmp_path / "attention.png"
    fig = attention_map(Image.new("RGB", (80, 40)), pattern, path, grid=(2, 4))
    pixels = axes_pixels(fig, path).mean(-1)
    height, width = pixels.shape
    corner = pixels[height // 2 :, 3 * width // 4 :].mean()  # viridis: 1 is bright yellow, 0 dark purple
    assert corner > 2 * pixels[: height // 2].mean() and corner > 2 * pixels[:, : 3 * width // 4].mean()
    with pytest.raises(ValueError, match="square grid"):
        attention_map(Image.new("RGB", (8, 8)), torch.zeros(8), tmp_path / "bad.png")


def test_head_grid_puts_layer_0_head_0_top_left(tmp_path):
    values = torch.zeros(3, 5)
    values[0, 0] = 1.0
    path = tmp_path / "heads.png"
    fig = head_grid(values, path)
    pixels = axes_pixels(fig, path)
    height, width = pixels.shape[:2]
    cell = pixels[: height // 3, : width // 5]
    rest = pixels[height // 3 :]
    # viridis: 1 is yellow (high red), 0 is dark purple (low red)
    assert cell[..., 0].mean() > 0.7 and rest[..., 0].mean() < 0.4


# ---- the Phase 0 example ------------------------------------------------------------------------------------------


def test_phase0_example_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "phase0_model_access.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checklist = result.stdout.split("Phase 0 checklist")[1]
    assert checklist.count("✓") == 8 and "✗" not in checklist
    assert "✓ hook test" in checklist
    for png in ("flow.png", "cls_attention.png", "patch_norm.png", "cls_attention_heads.png"):
        assert (tmp_path / png).stat().st_size > 5000


# ---- loading and a quick --help -----------------------------------------------------------------------------------


def test_the_cli_module_imports_nothing_heavy():
    # `hooked-vlm --help` waited ~20 s for torch, transformers and matplotlib before argparse ran
    code = (
        "import sys, hooked_vlm.cli, hooked_vlm.loading; from hooked_vlm.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'PIL', 'transformer_lens', 'sae_lens') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_from_pretrained_takes_the_specs_the_cli_takes():
    from hooked_vlm.loading import DEFAULT_MODEL

    model = HookedVLM.from_pretrained("tiny:clip", device="cpu")
    reference = HookedVLM.from_hf(*TINY_MODELS["clip"]())
    assert DEFAULT_MODEL == "tiny:clip"
    assert model.hook_names() == reference.hook_names()
    # the tiny factories are seeded: the same weights as building the model by hand
    for (name, p), (_, q) in zip(
        model.raw_model.named_parameters(), reference.raw_model.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    meta = HookedVLM.from_pretrained("config:openai/clip-vit-large-patch14")  # no CUDA needed: it lives on meta
    assert next(meta.raw_model.parameters()).is_meta
    assert len(meta.hook_names("vision.blocks.*.hook_resid_post")) == 24
    with pytest.raises(ValueError, match="unknown tiny model 'tiny:nope'; available: tiny:clip"):
        HookedVLM.from_pretrained("tiny:nope", device="cpu")
    with pytest.raises(TypeError, match="takes no loading options"):
        HookedVLM.from_pretrained("tiny:clip", device="cpu", revision="main")
    with pytest.raises(FileNotFoundError, match="model folder not found: ./no/such/folder"):
        HookedVLM.from_pretrained("./no/such/folder", device="cpu")


def test_one_entry_point_parses_every_command(capsys):
    from hooked_vlm.cli import build_parser
    from hooked_vlm.sae import cli as sae_cli

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"inspect", "hooks", "harvest", "train-sae", "aesthetic-features"} <= set(commands)
    # `python -m hooked_vlm.sae` is the same parser under its own name, and its errors are the same one line
    assert sae_cli.main(["harvest", "--hook", "vision.blocks.0.hook_resid_pots", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("hooked-vlm: error: unknown hook name")
    with pytest.raises(SystemExit):
        sae_cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m hooked_vlm.sae")
    help_text = subprocess.run(
        [sys.executable, "-m", "hooked_vlm.sae", "train-sae", "--help"], capture_output=True, text=True, cwd=REPO
    ).stdout
    assert help_text.startswith("usage: python -m hooked_vlm.sae train-sae")


def test_old_cli_names_still_import():
    from hooked_vlm import cli, report

    assert cli.record_shapes is report.record_shapes and cli.hook_rows is report.hook_rows
    assert cli.DTYPES["bfloat16"] is torch.bfloat16 and sorted(cli.DTYPES) == ["bfloat16", "float16", "float32"]
