"""One position vocabulary: the same argument picks the same positions in caching, harvesting, patching,
ablation and steering, on every tiny family.

References: masks built here by hand from the processor's token ids (``input_ids == image_token_id``) and from
the patch-grid arithmetic of each tower's ``row`` / ``col`` / ``kind`` tables, not from the resolver. Each tool's
picks are read from what it does: the positions ``run_with_cache(positions=)`` keeps (matched against the full
cache), the rows a harvest takes, the position axis of an ablation sweep, the positions a steering vector
changes.
"""

from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm import HookedVLM, Kind
from hooked_vlm.patching import ablation, position_mask
from hooked_vlm.positions import Patches, describe, from_json, normalize, resolve, to_json
from hooked_vlm.readouts import ClipSimilarity, LogitDiff
from hooked_vlm.sae.harvesting import describe_positions, row_index
from hooked_vlm.steering import SteeringVector, steer
from hooked_vlm.testing import TINY_MODELS, sample_image

FAMILIES = ["clip", "open_clip", "llava_onevision", "qwen2_vl"]
PROMPT = "Answer A or B."


class Family:
    def __init__(self, name):
        self.name = name
        self.model = HookedVLM.from_hf(*TINY_MODELS[name]())
        if "clip" in name:
            self.inputs = self.model.prepare_inputs(sample_image(seed=0))
            self.readout = ClipSimilarity.from_texts(self.model, ["a sunny sky", "a dark night"], 0)
            self.hooks = ["vision.blocks.0.hook_resid_post"]
        else:
            size = (16, 16) if name == "llava_onevision" else (112, 112)
            self.inputs = self.model.prepare_inputs(sample_image(*size, seed=0), prompt=PROMPT)
            self.readout = LogitDiff("A", "B", tokenizer=self.model)
            self.hooks = ["vision.blocks.0.hook_resid_post", "lm.blocks.0.hook_resid_post"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return Family(request.param)


def _forms(tower_name):
    """Every form of the vocabulary, with how to build its expected mask by hand from a tower's tables."""
    first_cells = ((0, 0), (1, 1))

    def kind(*kinds):
        return lambda t, ids: torch.isin(t.kind, torch.tensor(kinds))

    def indices(*index):
        def build(t, ids):
            mask = torch.zeros(t.shape, dtype=torch.bool)
            for i in index:
                mask[:, i % t.shape[1]] = True
            return mask
        return build

    def cells(t, ids):
        on_grid = torch.isin(t.kind, torch.tensor((Kind.PATCH, Kind.IMAGE)))
        return on_grid & (((t.row == 0) & (t.col == 0)) | ((t.row == 1) & (t.col == 1)))

    forms = [
        ("all", lambda t, ids: t.kind != Kind.PAD),
        (2, indices(2)),
        (-1, indices(-1)),
        ([1, 3], indices(1, 3)),
        ((1, 3), indices(1, 3)),  # a tuple of ints is indices too, not a (row, col) pair
        (list(first_cells), cells),
        (Patches(first_cells), cells),
        (lambda layout, key=tower_name: layout[key].col == 0, lambda t, ids: t.col == 0),
    ]
    if tower_name == "vision":
        forms += [
            ("patches", kind(Kind.PATCH)),
            (("patches", 0), lambda t, ids: kind(Kind.PATCH)(t, ids) | indices(0)(t, ids)),
        ]
    else:
        forms += [
            ("image", kind(Kind.IMAGE)),
            ("text", kind(Kind.TEXT)),
            # the union of names: LLaVA-OneVision's row-end newlines are image-token ids too; Qwen2-VL has none
            (("image", "newline"), lambda t, ids: ids),
            (["text", -1], lambda t, ids: kind(Kind.TEXT)(t, ids) | indices(-1)(t, ids)),
        ]
    return forms


def _tower_key(hook):
    return "lm" if hook.startswith("lm.") else "vision"


def _cases(family):
    for hook in family.hooks:
        for positions, build in _forms(_tower_key(hook)):
            yield hook, positions, build


def _expected(family, hook, build):
    tower = family.inputs.layout.tower_for(hook)
    ids = None
    if hook.startswith("lm."):
        ids = family.inputs.kwargs["input_ids"] == family.model.raw_model.config.image_token_id
    return build(tower, ids)


def test_the_same_argument_picks_the_same_positions_everywhere(family):
    model, prepared = family.model, family.inputs
    _, full = model.run_with_cache(prepared, names_filter=family.hooks)
    checked = 0
    for hook, positions, build in _cases(family):
        expected = _expected(family, hook, build)
        assert expected.any(), (family.name, hook, positions)
        label = f"{family.name} {hook} positions={describe(positions)}"

        # the resolver, and every name it is published under
        for mask in (resolve(prepared.layout, hook, positions), prepared.layout.mask(positions, hook),
                     position_mask(prepared.layout, hook, positions)):
            assert torch.equal(mask, expected), label

        # caching: run_with_cache(positions=) keeps exactly those positions (rows of equal counts only)
        counts = expected.sum(1)
        if (counts == counts[0]).all():
            _, sliced = model.run_with_cache(prepared, names_filter=hook, positions=positions)
            kept = full[hook][expected].view(expected.shape[0], int(counts[0]), -1)
            torch.testing.assert_close(sliced[hook], kept, rtol=0, atol=0, msg=label)
        torch.testing.assert_close(full.select(hook, positions), full[hook][expected], rtol=0, atol=0, msg=label)

        # harvesting: the rows it takes
        index = row_index(prepared.layout, hook, full[hook].shape, positions)
        picked = torch.zeros_like(expected)
        picked[index[:, 1], index[:, 2]] = True
        assert torch.equal(picked, expected), label

        # patching / ablation: the position axis of a sweep
        result = ablation(model, prepared, family.readout, hook, positions=positions, batch_size=256, progress=False)
        swept = torch.zeros_like(expected)
        for entry in result.labels["position"]:
            swept[entry.batch, entry.position] = True
        assert torch.equal(swept, expected), label

        # steering: the positions a vector changes
        vector = SteeringVector.from_tensor(hook, torch.ones(full[hook].shape[-1]), scale=3.0, positions=positions)
        with steer(model, vector):
            _, steered = model.run_with_cache(prepared, names_filter=hook)
        assert torch.equal((steered[hook] != full[hook]).any(-1), expected), label
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("positions", [
    "image", 3, [1, 3], (1, 3), ("image", "newline"), ["text", -1], [(0, 1), (2, 3)],
    Patches(((0, 1),), image=0, tile=1), torch.eye(4, dtype=torch.bool), ("cls", Patches(((0, 0),))),
])
def test_saved_positions_read_back_as_the_same_argument(positions):
    spec = json.loads(json.dumps(to_json(positions)))
    back = from_json(spec)
    assert describe(back) == describe(positions)
    assert json.loads(json.dumps(to_json(back))) == spec
    if isinstance(positions, torch.Tensor):
        assert torch.equal(back, positions)
    else:
        assert back == normalize(positions)
    assert describe_positions(positions) == to_json(positions)  # stores record the same JSON form


def test_steering_vectors_save_every_form(tmp_path):
    for i, positions in enumerate([[3, 5], ("image", "newline"), [(1, 2)], ["text", -1]]):
        vector = SteeringVector.from_tensor("lm.blocks.0.hook_resid_post", torch.ones(8), positions=positions)
        path = vector.save(tmp_path / f"{i}.safetensors")
        assert SteeringVector.load(path).positions == normalize(positions)


def test_callables_are_labelled_but_not_saved():
    def left_column(layout):
        return layout["vision"].col == 0

    assert describe(left_column) == "left_column"
    assert describe_positions(left_column).startswith("callable:") and describe_positions(left_column).endswith("left_column")
    with pytest.raises(TypeError, match="cannot be saved"):
        to_json(left_column)


def test_errors_name_the_argument_and_the_sequence(family):
    layout, hook = family.inputs.layout, family.hooks[-1]
    length = layout.tower_for(hook).shape[1]
    with pytest.raises(ValueError, match=f"outside {hook!r}'s sequence of length {length}"):
        resolve(layout, hook, [0, length])
    with pytest.raises(ValueError, match="unknown position selector 'images'"):
        resolve(layout, hook, "images")
    with pytest.raises(ValueError, match="matches no position"):
        resolve(layout, hook, "cls" if hook.startswith("lm.") else "image")
    with pytest.raises(ValueError, match="select nothing"):
        resolve(layout, hook, ("cls" if hook.startswith("lm.") else "image", Patches(((99, 99),))))
    with pytest.raises(ValueError, match="empty sequence"):
        resolve(layout, hook, [])
    with pytest.raises(ValueError, match="only steering takes it"):
        resolve(layout, hook, "generated")


def test_every_vlm_layout_has_the_image_token_mask():
    for name in ("llava_onevision", "qwen2_vl"):
        family = Family(name)
        ids = family.inputs.kwargs["input_ids"]
        expected = ids == family.model.raw_model.config.image_token_id
        assert torch.equal(family.inputs.layout.image_token_mask, expected), name
    clip = Family("clip")
    with pytest.raises(KeyError, match="no language-model sequence"):
        _ = clip.inputs.layout.image_token_mask
