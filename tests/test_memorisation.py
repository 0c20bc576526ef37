"""The memorisation check: copies of training images are flagged, noise is not, and the threshold comes from the
data's real near-duplicates (emoji skin-tone variants) or, without them, from 2-pixel shifts."""
import json

import pytest
import torch

from carrara.cli import main
from carrara.data.emoji import build_emoji
from carrara.data.folder import load_folder
from carrara.data.load import preload_images
from carrara.evaluate.memorisation import (
    calibrate,
    distances,
    memorisation,
    near_duplicate_groups,
    pixel_vectors,
    shift,
)
from carrara.models.clip import ClipScorer

TONES = ["", "\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
OTHERS = ["\U0001F431", "\U0001F600", "\u2764\ufe0f", "\u26c4", "\U0001F34E", "\U0001F697"]


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    """18 emoji at 16 px: 👍 and 👋 in six skin tones each (two groups of near-duplicates), and six others."""
    out = tmp_path_factory.mktemp("emoji") / "data"
    build_emoji(out, size=16, only=[h + t for h in ("\U0001F44D", "\U0001F44B") for t in TONES] + OTHERS,
                progress=False)
    dataset = load_folder(out)
    return dataset, preload_images(dataset, progress=False)[0]


@pytest.fixture(scope="module")
def scorer(tiny_clip_run):
    return ClipScorer.load(tiny_clip_run[0])


def test_skin_tones_are_the_near_duplicates(emoji, scorer):
    dataset, images = emoji
    groups = near_duplicate_groups(dataset.records)
    assert sorted(len(g) for g in groups) == [6, 6]
    features = {"clip": scorer.embed_images(images), "pixel": pixel_vectors(images)}
    cal = calibrate(features, images, dataset.records, scorer.embed_images)
    assert cal.pairs == 12 and "base groups" in cal.source
    # a skin-tone sibling is nearer than a different emoji is: the threshold sits below the typical distance
    d = distances(features["pixel"], features["pixel"], "pixel")
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    between = [float(d[i, j]) for i in range(len(images)) for j in range(len(images))
               if i != j and group_of.get(i, -1 - i) != group_of.get(j, -1 - j)]
    assert 0 < cal.pixel < torch.tensor(between).median()


def test_copies_are_flagged_and_noise_is_not(emoji, scorer):
    dataset, images = emoji
    copies = images[[0, 7, 13, 17]]
    noise = torch.randint(0, 256, (4, *images.shape[1:]), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    report = memorisation(torch.cat([copies, noise]), images, dataset.records, scorer)
    assert report["copies"] == [0, 1, 2, 3]
    assert [n["pixel_nearest"] for n in report["nearest"][:4]] == [dataset.records[i].file_name for i in (0, 7, 13, 17)]
    assert all(n["pixel_distance"] == 0 for n in report["nearest"][:4])
    only_copies = memorisation(copies, images, dataset.records, scorer)
    only_noise = memorisation(noise, images, dataset.records, scorer)
    assert only_copies["share_copies"] == 1.0 and only_copies["share_close_pixel"] == 1.0
    assert only_noise["share_copies"] == 0.0 and only_noise["share_close_pixel"] == 0.0


def test_data_without_groups_calibrate_on_shifts(tiny_shapes, scorer):
    dataset = load_folder(tiny_shapes)
    images = preload_images(dataset, progress=False)[0]
    moved = shift(images)
    assert torch.equal(moved[..., 2:, 2:], images[..., :-2, :-2])  # moved right and down by 2 pixels …
    assert torch.equal(moved[..., 0, 2:], images[..., 0, :-2]) and torch.equal(moved[..., 1, 2:], images[..., 0, :-2])
    features = {"clip": scorer.embed_images(images), "pixel": pixel_vectors(images)}
    cal = calibrate(features, images, dataset.records, scorer.embed_images)
    assert "shifts" in cal.source and cal.pairs == len(images) and cal.pixel > 0 and cal.clip > 0


def test_the_cli_writes_json_and_a_figure(tiny_shapes, tiny_clip_run, tiny_diffusion_run, tmp_path, capsys):
    out = tmp_path / "memo"
    assert main(["eval", "memorisation", "--model", str(tiny_diffusion_run), "--data", str(tiny_shapes), "--clip",
                 str(tiny_clip_run[0]), "--n", "3", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "memorisation.json").read_text())
    assert report["n_generated"] == 3 and len(report["nearest"]) == 3 and "prompt" in report["nearest"][0]
    assert 0.0 <= report["share_copies"] <= 1.0 and (out / "closest_pairs.png").is_file()
    assert "flagged as copies" in capsys.readouterr().out
    assert main(["eval", "memorisation", "--model", str(tiny_diffusion_run), "--data", str(tmp_path / "none"),
                 "--clip", str(tiny_clip_run[0]), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("carrara: error:")
