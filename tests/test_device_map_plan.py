"""How ``device_map="auto"`` spreads the real-size LLaVA-OneVision-72B over four H200s, planned on the meta device.

The 4-GPU run itself needs the cards (benchmarks/bench_multi_gpu.py); what can be checked without them is that
accelerate's own planner, given the shipped config and four 141 GB cards, keeps every decoder and encoder layer
whole, uses all four cards, leaves nothing on the CPU, and that the hooked model binds every LM block of it.
"""

from __future__ import annotations

from collections import Counter

import accelerate
import pytest
import torch
from accelerate.utils import compute_module_sizes, get_balanced_memory

from hooked_vlm import HookedVLM
from hooked_vlm.testing import meta_model

NAME = "llava-hf/llava-onevision-qwen2-72b-ov-hf"
H200 = 141 * 2**30  # bytes usable per card, as torch.cuda.mem_get_info reports on the lent H200


@pytest.fixture(scope="module")
def raw():
    return meta_model(NAME)


def test_the_shipped_config_has_the_size_of_the_72b_checkpoint(raw):
    params = sum(p.numel() for p in raw.parameters())
    assert 72e9 < params < 74e9  # 73.2 B: Qwen2-72B's LM plus SigLIP-so400m and the projector


def test_auto_map_over_four_h200_keeps_layers_whole_and_balances_the_cards(raw):
    no_split = raw._no_split_modules
    max_memory = {i: H200 for i in range(4)} | {"cpu": 0}
    balanced = get_balanced_memory(raw, max_memory=max_memory, no_split_module_classes=no_split,
                                   dtype=torch.bfloat16)
    device_map = accelerate.infer_auto_device_map(raw, max_memory=balanced, no_split_module_classes=no_split,
                                                  dtype=torch.bfloat16)
    assert set(device_map.values()) == {0, 1, 2, 3}
    for name in device_map:  # a whole layer or a module above it, never a piece of one
        assert not any(name.startswith(f"{layer}.") for layer in _layers(raw)), name
    sizes = compute_module_sizes(raw, dtype=torch.bfloat16)
    per_card = Counter()
    for name, card in device_map.items():
        per_card[card] += sizes[name]
    assert max(per_card.values()) < H200 * 0.9  # room left for activations and caches on every card
    assert max(per_card.values()) / min(per_card.values()) < 1.5


def test_the_hooked_model_binds_every_block_of_the_72b_lm(raw):
    model = HookedVLM.from_hf(raw)
    _, lm = model.adapter.towers()
    assert lm.n_layers == 80 and lm.n_heads == 64 and lm.n_kv_heads == 8
    assert "lm.blocks.79.hook_resid_post" in model.hook_names("lm.blocks.79.*")


def _layers(raw) -> list[str]:
    return [name for name, module in raw.named_modules() if type(module).__name__ in raw._no_split_modules]
