"""The tables in doc/phase0/phase0_design*.md and doc/environment_guide*.md are what doc/phase0/facts.py computes
from the shipped real-size configs (meta device) and pyproject.toml: a changed config, adapter or floor fails here
until the pages are regenerated."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _facts():
    spec = importlib.util.spec_from_file_location("phase0_facts", ROOT / "doc/phase0/facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_match_the_code():
    facts = _facts()
    for page in facts.PAGES:
        assert page.read_text() == facts.render(page), f"{page.name}: run python doc/phase0/facts.py --write"


def test_numbers_against_hand_computations():
    facts = _facts()
    clip = facts.facts("openai/clip-vit-large-patch14")
    # ViT-L/14 at 224 px: (224 / 14)² patches + CLS; 24 blocks of width 1024
    assert "257 positions" in clip["flow"] and clip["vision_shape"] == "[batch, 257, 1024]"
    assert round(clip["params"] / 1e6) == 428
    llava = facts.facts("llava-hf/llava-onevision-qwen2-7b-ov-hf")
    lm = llava["lm"]
    assert (lm.n_layers, lm.n_kv_heads, lm.d_head) == (28, 4, 128)
    row = next(line for line in facts.memory("en").splitlines() if "qwen2-7b-ov" in line)
    kv = 2 * 28 * 4 * 128 * 2 * 4096 / 2**30  # K and V, bf16, 4,096 tokens
    assert re.findall(r"[\d.]+ GiB", row)[1] == f"{kv:.2f} GiB" == "0.22 GiB"
    assert re.findall(r"[\d.]+ GiB", row)[0] == f"{llava['params'] * 2 / 2**30:.2f} GiB"


def test_versions_table_states_the_pyproject_floors():
    text = _facts().versions("en")
    assert "| Python | >=3.11 |" in text and "| torch | >=2.14 |" in text and "| ruff | ==0.17.6 |" in text
