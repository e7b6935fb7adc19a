"""Feature dashboards, read back as a browser would: the generated HTML is parsed with html.parser, every image and
link it references must exist on disk, and the numbers it shows are recomputed here directly from run_with_cache
and sae_lens's encode (top images and their peaks, activation histograms with numpy.histogram, logits from the
unembedding)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from test_sae_features import sae_at  # noqa: E402  (a random TopK SAE at a hook)

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.sae import feature_dashboard  # noqa: E402
from hooked_vlm.sae.aesthetic import aesthetic_readout  # noqa: E402
from hooked_vlm.testing import half_and_half_image, sample_image, tiny_clip, tiny_llava_onevision  # noqa: E402

HOOK = "vision.blocks.0.hook_resid_post"


class Page(HTMLParser):
    """Every referenced file, every feature card with its listed top images and histogram bars, and the tables."""

    def __init__(self, path: Path):
        super().__init__()
        self.references: list[str] = []
        self.cards: dict[int, dict] = {}
        self.card: dict | None = None
        self.cells: list[str] = []
        self.feed(path.read_text())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("#"):
                self.references.append(attrs[key])
        if tag == "section" and "data-feature" in attrs:
            self.card = {"top": [], "bars": [], "logits": {}, "effects": []}
            self.cards[int(attrs["data-feature"])] = self.card
        elif tag == "tr" and attrs.get("class") == "top-image":
            self.card["top"].append((attrs["data-image"], float(attrs["data-value"])))
        elif tag == "rect" and "data-count" in attrs:
            self.card["bars"].append((float(attrs["data-lo"]), float(attrs["data-hi"]), int(attrs["data-count"])))
        elif tag == "tr" and "data-token-id" in attrs:
            self.token_ids.append(int(attrs["data-token-id"]))
        elif tag == "table" and self.card is not None and attrs.get("class", "").startswith(("logits", "effects")):
            self.table = attrs["class"]
            self.cells, self.token_ids = [], []
        elif tag == "td":
            self.cells.append("")

    def handle_data(self, data):
        if self.cells:
            self.cells[-1] += data

    def handle_endtag(self, tag):
        if tag == "table" and getattr(self, "table", None):
            name, cells = self.table, [c for c in self.cells]
            if name.startswith("logits"):
                texts = [eval(c) for c in cells[0::2]]  # noqa: S307 (the page writes repr() of each token)
                self.card["logits"][name.split()[1]] = list(zip(self.token_ids, texts, strict=True))
            else:
                self.card["effects"] = [float(c) for c in cells[1::3]]
            self.table, self.cells = None, []
        elif tag == "section":
            self.card = None


def assert_references_exist(page: Path) -> Page:
    parsed = Page(page)
    assert parsed.references
    for reference in parsed.references:
        assert "://" not in reference, f"{page.name} refers to {reference}: not openable offline"
        assert (page.parent / unquote(reference)).is_file(), f"{page.name} refers to {reference}, which is missing"
    return parsed


@pytest.fixture(scope="module")
def clip():
    return HookedVLM.from_hf(*tiny_clip())


@pytest.fixture(scope="module")
def pictures():
    return [sample_image(width=64 + 8 * i, height=64, seed=i) for i in range(9)] + [half_and_half_image()]


@pytest.fixture(scope="module")
def dashboard(clip, pictures, tmp_path_factory):
    sae = sae_at(HOOK, "patches")
    out = tmp_path_factory.mktemp("dashboard")
    result = feature_dashboard(
        clip,
        sae,
        pictures,
        out,
        max_features=5,
        n_images=4,
        bins=12,
        readouts=aesthetic_readout(clip, "clip"),
        n_effect_images=4,
        batch_size=4,
        progress=False,
    )
    return sae, result


@torch.no_grad()
def test_page_lists_the_real_top_images_and_histogram_counts(clip, pictures, dashboard):
    sae, result = dashboard
    parsed = assert_references_exist(result.page)
    assert sorted(parsed.cards) == sorted(result.features) and len(result.features) == 5
    # direct: every patch row of every image through the SAE, maximum per image
    _, cache = clip.run_with_cache(pictures, names_filter=[HOOK])
    acts = sae.encode(cache[HOOK][:, 1:])  # [images, patches, d_sae]
    per_image = acts.amax(1)
    strongest = per_image.amax(0).argsort(descending=True)
    assert result.features == [int(f) for f in strongest[:5]]  # the default: strongest features first
    for f, card in parsed.cards.items():
        values, order = per_image[:, f].sort(descending=True)
        expected = [(str(int(i)), float(v)) for v, i in zip(values[:4], order[:4], strict=True) if v > 0]
        assert [image for image, _ in card["top"]] == [image for image, _ in expected]
        np.testing.assert_allclose([v for _, v in card["top"]], [v for _, v in expected], rtol=1e-5)
        # the histogram: numpy.histogram of the feature's non-zero patch activations over the page's bin edges
        edges = [lo for lo, _, _ in card["bars"]] + [card["bars"][-1][1]]
        fired = acts[..., f].flatten()
        fired = fired[fired > 0].double().numpy()
        counts, _ = np.histogram(fired, bins=np.array(edges))
        assert [count for _, _, count in card["bars"]] == counts.tolist()
        assert counts.sum() == len(fired) > 0
        assert edges[-1] == pytest.approx(float(values[0]), rel=1e-6)  # bins reach the feature's maximum


def test_readout_effects_are_the_ablation_effects(dashboard):
    _, result = dashboard
    parsed = Page(result.page)
    (effect,) = result.effects
    for f, card in parsed.cards.items():
        assert card["effects"] == pytest.approx([float(effect.exact[effect.features.index(f)])], rel=1e-3, abs=1e-6)
    assert any(abs(float(v)) > 0 for v in effect.exact)  # ablating a feature of a spliced SAE moves the readout


def test_index_lists_every_sae_page_written_to_the_folder(clip, pictures, dashboard):
    _, result = dashboard
    other = feature_dashboard(
        clip,
        sae_at("vision.blocks.1.hook_resid_post", "all", seed=1),
        pictures,
        result.page.parent,
        features=[3, 0],
        n_images=2,
        bins=5,
        progress=False,
    )
    assert other.index == result.index
    index = assert_references_exist(result.index)
    assert sorted(index.references) == sorted([result.page.name, other.page.name])
    parsed = assert_references_exist(other.page)
    assert sorted(parsed.cards) == [0, 3]
    assert "index.html" in parsed.references


@torch.no_grad()
def test_a_language_model_hook_shows_its_logits(tmp_path):
    llava = HookedVLM.from_hf(*tiny_llava_onevision())
    hook = "lm.blocks.0.hook_resid_post"
    d_lm = llava.raw_model.get_output_embeddings().weight.shape[1]
    sae = sae_at(hook, "image", d_in=d_lm, d_sae=24, prompt="Describe the image.")
    result = feature_dashboard(
        llava,
        sae,
        [sample_image(seed=i) for i in range(3)],
        tmp_path,
        max_features=2,
        n_images=2,
        bins=4,
        n_logits=5,
        progress=False,
    )
    parsed = assert_references_exist(result.page)
    w_u = llava.raw_model.get_output_embeddings().weight.float()
    tokenizer = llava.processor.tokenizer
    for f, card in parsed.cards.items():
        logits = sae.W_dec[f].float() @ w_u.T
        for side, order in (("positive", logits.topk(5).indices), ("negative", (-logits).topk(5).indices)):
            assert [token for token, _ in card["logits"][side]] == order.tolist()
            for token, text in card["logits"][side]:  # the text, or the vocabulary entry of a partial byte
                assert text in (tokenizer.decode([token]), tokenizer.convert_ids_to_tokens(token))
                assert "\ufffd" not in text


def test_bad_requests_are_refused_before_any_work(clip, pictures, dashboard, tmp_path):
    sae, result = dashboard
    with pytest.raises(ValueError, match="one of them"):
        feature_dashboard(clip, sae, pictures, tmp_path, scan=result.scan)
    with pytest.raises(ValueError, match="one of them"):
        feature_dashboard(clip, sae, None, tmp_path)
    with pytest.raises(ValueError, match=r"features \[48\] are not features"):
        feature_dashboard(clip, sae, out_dir=tmp_path, scan=result.scan, features=[48], progress=False)
    with pytest.raises(ValueError, match="the scan was over positions 'patches'"):
        feature_dashboard(clip, sae, out_dir=tmp_path, scan=result.scan, positions="all")
    with pytest.raises(KeyError):
        feature_dashboard(clip, sae_at("vision.blocks.7.hook_resid_post", "all"), pictures, tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_writes_a_dashboard(tmp_path):
    from hooked_vlm.cli import main  # the hooked-vlm entry point

    sae = sae_at(HOOK, "patches", seed=2)
    sae.save_model(tmp_path / "sae")
    code = main(
        [
            "dashboard",
            "tiny:clip",
            "--sae",
            str(tmp_path / "sae"),
            "--n-sample-images",
            "6",
            "--max-features",
            "3",
            "--n-images",
            "3",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert (
        main(
            [
                "dashboard",
                "tiny:clip",
                "--sae",
                str(tmp_path / "sae"),
                "--features",
                "3,48",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "refused"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "refused").exists()
    page = assert_references_exist(tmp_path / "out" / "index.html")
    (name,) = page.references
    assert len(assert_references_exist(tmp_path / "out" / name).cards) == 3


def test_a_transcoder_gets_a_dashboard_with_readout_effects(clip, pictures, tmp_path):
    from sae_lens import Transcoder, TranscoderConfig

    hook_in, hook_out = "vision.blocks.1.ln2.hook_normalized", "vision.blocks.1.hook_mlp_out"
    tc = Transcoder(
        TranscoderConfig(
            d_in=32,
            d_sae=24,
            d_out=32,
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(hook_name=hook_in, hook_name_out=hook_out, positions="all"),
        )
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in tc.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    result = feature_dashboard(
        clip,
        tc,
        pictures,
        tmp_path,
        max_features=3,
        n_images=3,
        bins=6,
        readouts=aesthetic_readout(clip, "clip"),
        n_effect_images=3,
        progress=False,
    )
    parsed = assert_references_exist(result.page)
    assert len(parsed.cards) == 3 and all(len(card["effects"]) == 1 for card in parsed.cards.values())
    assert float(result.effects[0].exact.abs().max()) > 0  # ablating through the spliced transcoder moves the readout
    with torch.no_grad():
        _, cache = clip.run_with_cache(pictures, names_filter=[hook_in])
        peak = tc.encode(cache[hook_in]).amax((0, 1))  # the features read the input hook, every position
    for f, card in parsed.cards.items():
        assert card["top"][0][1] == pytest.approx(float(peak[f]), rel=1e-5)
