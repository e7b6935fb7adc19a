"""Readouts against references computed by hand from the unwrapped models' own outputs."""

import pytest
import torch
from torch import nn

from hooked_vlm import HookedVLM
from hooked_vlm.readouts import (
    ClipSimilarity,
    LogitDiff,
    Probe,
    TokenProbability,
    fit_linear_probe,
    normalize,
    token_id,
)
from hooked_vlm.testing import sample_image, tiny_clip, tiny_llava_onevision, tiny_open_clip

TEXTS = ["a sunny sky", "a dark night", "a green field"]
IMAGES = [sample_image(seed=0), sample_image(seed=1), sample_image(seed=2)]


@pytest.fixture(scope="module")
def clip():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def llava():
    model = HookedVLM.from_hf(*tiny_llava_onevision())
    prepared = model.prepare_inputs([sample_image(16, 16, seed=s) for s in (0, 1)], prompt=["Answer A or B.", "A or B?"])
    with torch.no_grad():
        logits = model.raw_model(**prepared.kwargs).logits  # the unwrapped model's own logits
    return model, prepared, logits


def ids(model, *words):
    return [model.processor.tokenizer.convert_tokens_to_ids(w) for w in words]


def test_logit_diff_yes_no_multiple_choice_and_per_row_answers(llava):
    model, prepared, logits = llava
    last = logits[:, -1]
    a, b, c, d = ids(model, "A", "B", "C", "D")
    torch.testing.assert_close(LogitDiff("A", "B", tokenizer=model)(logits, None), last[:, a] - last[:, b])
    others = last[:, [b, c, d]]
    torch.testing.assert_close(LogitDiff(a, [b, c, d])(logits, None), last[:, a] - others.max(1).values)
    torch.testing.assert_close(LogitDiff(a, [b, c, d], reduce="mean")(logits, None), last[:, a] - others.mean(1))
    torch.testing.assert_close(LogitDiff(a, [b, c, d], reduce="logsumexp")(logits, None), last[:, a] - others.logsumexp(1))
    per_row = LogitDiff(torch.tensor([a, b]), torch.tensor([b, a]), position=-2)(logits, None)
    torch.testing.assert_close(per_row, torch.stack([logits[0, -2, a] - logits[0, -2, b], logits[1, -2, b] - logits[1, -2, a]]))


def test_token_probability_single_set_and_log(llava):
    model, _, logits = llava
    probs = logits[:, -1].softmax(-1)
    a, b = ids(model, "A", "B")
    torch.testing.assert_close(TokenProbability("A", tokenizer=model)(logits, None), probs[:, a])
    torch.testing.assert_close(TokenProbability(["A", "B"], tokenizer=model)(logits, None), probs[:, a] + probs[:, b])
    torch.testing.assert_close(TokenProbability(a, log=True)(logits, None), probs[:, a].log())


def test_words_must_be_single_tokens(llava):
    model = llava[0]
    assert token_id("A", model) == model.processor.tokenizer.encode("A", add_special_tokens=False)[0]
    with pytest.raises(ValueError, match="is 3 tokens"):
        token_id("yes", model)
    with pytest.raises(ValueError, match="pass tokenizer="):
        LogitDiff("A", "B")


def test_logit_readouts_refuse_non_logit_outputs(clip):
    with pytest.raises(ValueError, match="reads LM logits"):
        TokenProbability(3)(torch.zeros(2, 16), None)


def test_clip_similarity_matches_the_models_own_logits(clip):
    raw, processor = clip.raw_model, clip.processor
    inputs = processor(images=IMAGES, text=TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = raw(**inputs).logits_per_image  # logit_scale · cos(image, text)
        _, cache = clip.run_with_cache(IMAGES, names_filter="hook_image_embeds")
    cosine = logits / raw.logit_scale.exp()
    for target in range(len(TEXTS)):
        torch.testing.assert_close(ClipSimilarity.from_texts(clip, TEXTS, target)(None, cache), cosine[:, target])
        probability = ClipSimilarity.from_texts(clip, TEXTS, target, softmax=True)(None, cache)
        torch.testing.assert_close(probability, logits.softmax(-1)[:, target])


def test_clip_similarity_on_open_clip():
    raw, (preprocess, tokenizer) = tiny_open_clip()
    model = HookedVLM.from_hf(raw, (preprocess, tokenizer))
    pixels = torch.stack([preprocess(image) for image in IMAGES])
    with torch.no_grad():
        reference = raw.encode_image(pixels, normalize=True) @ raw.encode_text(tokenizer(TEXTS), normalize=True).T
        _, cache = model.run_with_cache(pixels, names_filter="hook_image_embeds")
    contrast = ClipSimilarity.from_texts(model, TEXTS, 0) - ClipSimilarity.from_texts(model, TEXTS, 1)
    assert contrast.hook_names == ("hook_image_embeds",)
    torch.testing.assert_close(contrast(None, cache), reference[:, 0] - reference[:, 1])


def hidden_states(raw, processor):
    pixels = processor(images=IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = raw.vision_model(pixel_values=pixels, output_hidden_states=True)
        return pixels, out.hidden_states, raw.get_image_features(pixel_values=pixels).pooler_output


@pytest.mark.parametrize("position", [0, "patches", None])
def test_probe_reads_its_hook_at_its_positions(clip, position):
    pixels, hidden, embeds = hidden_states(clip.raw_model, clip.processor)
    torch.manual_seed(0)
    if position is None:
        hook, feature = "hook_image_embeds", embeds
    else:
        hook = "vision.blocks.1.hook_resid_post"
        feature = hidden[2][:, 0] if position == 0 else hidden[2][:, 1:].mean(1)
    mlp = nn.Sequential(nn.Linear(feature.shape[-1], 8), nn.ReLU(), nn.Linear(8, 1))
    probe = Probe(hook, mlp, position=position)
    with torch.no_grad():
        _, cache = clip.run_with_cache(pixels, names_filter=hook)
        torch.testing.assert_close(probe(None, cache), mlp(feature)[:, 0])
    with pytest.raises(ValueError, match="no single direction"):
        _ = probe.direction


def test_probe_direction_composes_linear_layers():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.3), nn.Linear(5, 1))
    probe = Probe("hook_image_embeds", layers)
    w0, b0, w1, b1 = layers[0].weight, layers[0].bias, layers[2].weight, layers[2].bias
    torch.testing.assert_close(probe.direction, (w1 @ w0)[0].detach())
    torch.testing.assert_close(probe.bias, (w1 @ b0 + b1)[0].detach())


class LaionAestheticMLP(nn.Module):
    """The predictor class of christophschuhmann/improved-aesthetic-predictor (simple_inference.py), any width."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def test_laion_aesthetic_probe_scores_like_the_predictor_on_normalised_embeddings(clip, tmp_path):
    torch.manual_seed(0)
    predictor = LaionAestheticMLP(16).eval()  # 768 for ViT-L/14; the tiny CLIP embeds in 16 dimensions
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(predictor.state_dict(), path)
    probe = Probe.from_laion_aesthetic(path)
    assert probe.hook_names == ("hook_image_embeds",) and probe.linear
    _, _, embeds = hidden_states(clip.raw_model, clip.processor)
    with torch.no_grad():
        expected = predictor(embeds / embeds.norm(dim=-1, keepdim=True))[:, 0]
        _, cache = clip.run_with_cache(IMAGES, names_filter="hook_image_embeds")
        torch.testing.assert_close(probe(None, cache), expected)
        normed = nn.functional.normalize(embeds, dim=-1)
        torch.testing.assert_close(normed @ probe.direction + probe.bias, expected, atol=1e-5, rtol=1e-5)

    torch.save({"linear.weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor state dict"):
        Probe.from_laion_aesthetic(tmp_path / "other.pth")


def test_fit_linear_probe_recovers_a_linear_target_and_reads_it_back(clip):
    pixels = clip.processor(images=[sample_image(seed=s) for s in range(40)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        _, cache = clip.run_with_cache(pixels, names_filter="hook_image_embeds")
    x = cache["hook_image_embeds"]
    torch.manual_seed(0)
    w, b = torch.randn(x.shape[1]), 0.7
    labels = x @ w + b
    probe = fit_linear_probe(x, labels, "hook_image_embeds", l2=0.0)
    reference = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1).double(), labels[:, None].double()).solution
    torch.testing.assert_close(probe.direction.double(), reference[:-1, 0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(probe(None, cache), labels, atol=1e-4, rtol=1e-4)
    ridge = fit_linear_probe(x, labels, "hook_image_embeds", l2=10.0)
    assert ridge.direction.norm() < probe.direction.norm()  # the penalty shrinks the weights


def test_readouts_compose(llava):
    model, _, logits = llava
    a, b = ids(model, "A", "B")
    diff, prob = LogitDiff(a, b), TokenProbability(a, position=-3)
    last = logits[:, -1]
    expected = 2 * (last[:, a] - last[:, b]) - logits[:, -3].softmax(-1)[:, a] / 4 + 1
    combined = 2 * diff - prob / 4 + 1
    torch.testing.assert_close(combined(logits, None), expected)
    assert combined.logits_to_keep == 3 and (diff + Probe("x", nn.Linear(2, 1))).logits_to_keep is None
    normalized = diff.normalized(clean=3.0, corrupted=1.0)
    torch.testing.assert_close(normalized(logits, None), (last[:, a] - last[:, b] - 1.0) / 2.0)
    assert float(normalize(2.0, 3.0, 1.0)) == 0.5
