"""The shapes detector reads rendered scenes back exactly; the faithfulness metric rewards truth and nothing else."""
import colorsys
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage
from scipy.stats import binomtest

from carrara.data import shapes
from carrara.evaluate import detector
from carrara.evaluate.detector import detect
from carrara.evaluate.faithfulness import (
    detector_ceiling,
    evaluate_faithfulness,
    sample_prompts,
    score,
    wilson_interval,
)

RELATION_WORDS = {phrase: relation for relation, phrase in shapes.RELATION_PHRASES.items()}
POSITION_WORDS = {phrase: position for position, phrase in shapes.POSITION_PHRASES.items()}
PAIR_PLACES = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
               "below": ("bottom", "top")}


def degrade(image: Image.Image, blur: float, sigma: float, seed: int) -> np.ndarray:
    """Gaussian blur of `blur` pixels, then Gaussian noise of `sigma`/255, like a blurry generated image."""
    x = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    x = x + np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def accuracy(scenes, images) -> dict[str, float]:
    outcomes = [score(scene, detect(image)) for scene, image in zip(scenes, images)]
    return {a: float(np.mean([v for o in outcomes for v in o[a]])) for a in outcomes[0]}


def scenes(n: int, objects: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.sample_attributes(rng, two_object_fraction=float(objects == 2)) for _ in range(n)]


def obj(shape, color, size, position, dx=0.0, dy=0.0) -> shapes.ShapeObject:
    x, y = shapes.POSITIONS[position]
    return shapes.ShapeObject(shape, color, size, position, x + dx, y + dy, shapes.SIZES[size])


@pytest.mark.parametrize("objects", [1, 2])
def test_detector_reads_rendered_scenes(objects):
    truth = scenes(300, objects, seed=objects)
    measured = accuracy(truth, [shapes.render(s) for s in truth])
    assert measured == {a: 1.0 for a in measured}, measured  # measured: every attribute of all 300 scenes


@pytest.mark.parametrize("objects", [1, 2])
def test_detector_survives_blur_and_noise(objects):
    truth = scenes(300, objects, seed=10 + objects)
    measured = accuracy(truth, [degrade(shapes.render(s), 1.0, 10, i) for i, s in enumerate(truth)])
    # measured: everything 1.0 for one object; shape 0.998 and all 0.997 for two objects
    assert measured["shape"] >= 0.98, measured
    assert all(v >= 0.99 for a, v in measured.items() if a not in ("shape", "all")), measured
    assert measured["all"] >= 0.97, measured


def test_hand_built_red_large_circle_on_the_left():
    image = shapes.render(shapes.Scene((obj("circle", "red", "large", "left"),)))
    (found,) = detect(image).objects
    assert (found.shape, found.color, found.size, found.position) == ("circle", "red", "large", "left")
    assert found.cx == pytest.approx(0.25, abs=0.5 / 64) and found.cy == pytest.approx(0.5, abs=0.5 / 64)
    assert found.extent == pytest.approx(0.4, abs=1 / 64)
    assert found.area == pytest.approx(np.pi * 0.2**2, rel=0.05)  # coverage sums to the disc's area


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("size", list(shapes.SIZES))
def test_each_shape_at_each_size(shape, size):
    image = shapes.render(shapes.Scene((obj(shape, "cyan", size, "center", 0.013, -0.007),)))
    (found,) = detect(image).objects
    assert (found.shape, found.color, found.size, found.position) == (shape, "cyan", size, "center")


def test_two_objects_and_their_relation_any_input_size():
    scene = shapes.Scene((obj("triangle", "blue", "small", "top"), obj("square", "yellow", "large", "bottom")), "above")
    for image in (shapes.render(scene), np.asarray(shapes.render(scene, 160)), shapes.render(scene, 40)):
        d = detect(image)
        assert [(o.shape, o.color, o.size, o.position) for o in d.objects] == [
            ("square", "yellow", "large", "bottom"), ("triangle", "blue", "small", "top")]  # largest first
        assert d.relation == "below"  # the square (first) is below the triangle
        assert all(score(scene, d)[a] == [True] * len(score(scene, d)[a]) for a in score(scene, d))


def test_blank_image_has_no_objects_and_scores_zero():
    d = detect(np.zeros((64, 64, 3), np.uint8))
    assert d.objects == () and d.relation is None
    for scene in (scenes(1, 1, 0)[0], scenes(1, 2, 0)[0]):
        assert all(not any(v) for v in score(scene, d).values())


def test_labels_match_scipy_8_connected_components():
    rng = np.random.default_rng(0)
    for _ in range(20):
        classes = np.where(rng.random((40, 40)) < 0.55, rng.integers(0, 3, (40, 40)), -1)
        labels = detector._label(classes)
        for c in range(3):  # same partition as scipy's labelling of each class alone
            reference, count = ndimage.label(classes == c, structure=np.ones((3, 3)))
            ours = labels[classes == c]
            pairs = set(zip(reference[classes == c], ours))
            assert len(pairs) == count == len({b for _, b in pairs})


def test_hsv_matches_colorsys():
    x = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    h, s, v = detector._hsv(x)
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]).reshape(16, 16, 3)
    np.testing.assert_allclose(h, ref[..., 0] * 360, atol=1e-3)
    np.testing.assert_allclose(s, ref[..., 1], atol=1e-5)
    np.testing.assert_allclose(v, ref[..., 2], atol=1e-6)


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (187, 200)])
def test_wilson_interval_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)


class CaptionPainter:
    """A "model" that reads the caption and draws it with the shapes renderer; objects in `recolor` in colors it does not name."""

    def __init__(self, recolor: tuple[int, ...] = ()):
        self.recolor, self.calls = recolor, []

    def parse(self, text: str) -> shapes.Scene:
        colors, words = list(shapes.COLORS), "|".join
        found = re.findall(rf"({words(shapes.SIZES)})?,? ?\b({words(colors)}) ({words(shapes.SHAPES)})(?:, ({words(shapes.SIZES)}))?", text)
        unused = [c for c in colors if c not in {color for _, color, _, _ in found}]
        parts = [(shape, unused[i] if i in self.recolor else color, size or late)
                 for i, (size, color, shape, late) in enumerate(found)]
        relation = next((r for phrase, r in RELATION_WORDS.items() if phrase in text), None)
        if relation is None:
            places = [next(p for phrase, p in POSITION_WORDS.items() if phrase in text)]
        else:
            places = PAIR_PLACES[relation]
        return shapes.Scene(tuple(obj(*part, place) for part, place in zip(parts, places)), relation)

    def __call__(self, prompts, *, steps, sampler, guidance, seed):
        self.calls.append((len(prompts), steps, sampler, guidance, seed))
        return [shapes.render(self.parse(p)) for p in prompts]


@pytest.mark.parametrize("objects", [1, 2])
def test_painting_the_caption_scores_the_ceiling(objects):
    painter = CaptionPainter()
    result = evaluate_faithfulness(painter, n=40, objects=objects, steps=3, sampler="ddim", guidance=2.5, seed=7,
                                   batch_size=16, progress=False)
    assert painter.calls == [(16, 3, "ddim", 2.5, 7), (16, 3, "ddim", 2.5, 23), (8, 3, "ddim", 2.5, 39)]
    ceiling = detector_ceiling(40, objects, seed=7)["attributes"]
    assert set(result["attributes"]) == set(ceiling)
    for attribute, m in result["attributes"].items():
        assert m["accuracy"] == ceiling[attribute]["accuracy"] == 1.0
        assert m["n"] == 40 * (objects if attribute in ("color", "shape", "size") else 1)
        assert m["ci95"][0] == pytest.approx(wilson_interval(m["n"], m["n"])[0], abs=1e-4)


def test_wrong_color_scores_zero_on_color_only():
    result = evaluate_faithfulness(CaptionPainter(recolor=(0,)), n=40, objects=1, progress=False)["attributes"]
    assert result["color"]["accuracy"] == result["all"]["accuracy"] == 0.0
    assert result["shape"]["accuracy"] == result["size"]["accuracy"] == result["position"]["accuracy"] == 1.0


def test_two_objects_wrong_colors():
    one = evaluate_faithfulness(CaptionPainter(recolor=(1,)), n=40, objects=2, progress=False)["attributes"]
    assert one["color"]["accuracy"] == 0.5 and one["both objects"]["accuracy"] == one["all"]["accuracy"] == 0.0
    assert one["shape"]["accuracy"] == one["size"]["accuracy"] == one["relation"]["accuracy"] == 1.0
    both = evaluate_faithfulness(CaptionPainter(recolor=(0, 1)), n=40, objects=2, progress=False)["attributes"]
    assert all(m["accuracy"] == 0.0 for a, m in both.items() if a != "count")  # which is which is unknowable
    assert both["count"]["accuracy"] == 1.0


def test_blank_generator_scores_zero():
    def blank(prompts, **settings):
        return [Image.new("RGB", (64, 64)) for _ in prompts]

    for objects in (1, 2):
        result = evaluate_faithfulness(blank, n=20, objects=objects, progress=False)["attributes"]
        assert all(m["accuracy"] == 0.0 for m in result.values())


def test_random_color_blobs_score_chance_and_never_all():
    def blobs(prompts, *, seed, **settings):
        noise = [np.random.default_rng(seed + i).normal(128, 80, (8, 8, 3)).clip(0, 255) for i in range(len(prompts))]
        return [Image.fromarray(x.astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR) for x in noise]

    result = evaluate_faithfulness(blobs, n=60, objects=1, progress=False)["attributes"]
    assert result["count"]["accuracy"] == result["all"]["accuracy"] == 0.0  # many blobs, never one clean shape
    assert result["color"]["accuracy"] < 0.3 and result["shape"]["accuracy"] < 0.35  # chance: 1/8 and 1/6


def test_prompts_are_deterministic_and_caption_their_scenes():
    a, b = sample_prompts(50, 2, seed=3), sample_prompts(50, 2, seed=3)
    assert a == b and a != sample_prompts(50, 2, seed=4)
    assert all(len(s.objects) == 2 and s.relation in shapes.RELATIONS for s, _ in a)
    assert all(CaptionPainter().parse(text).objects[0].shape == s.objects[0].shape for s, text in a)


def test_command_writes_the_report(tmp_path, monkeypatch, capsys):
    from carrara import pipeline
    from carrara.cli import main

    painter = CaptionPainter()
    painter.model_hash = "abc123"
    monkeypatch.setattr(pipeline.Pipeline, "load", classmethod(lambda cls, path, **kwargs: painter))
    out = tmp_path / "faith.json"
    assert main(["eval", "faithfulness", "--model", "run", "--n", "12", "--guidance", "3", "--steps", "4",
                 "--sampler", "ddim", "--seed", "1", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["model_hash"] == "abc123" and report["n"] == 12 and report["guidance"] == 3.0
    assert report["one_object"]["model"]["position"]["accuracy"] == 1.0
    assert report["two_objects"]["ceiling"]["relation"]["n"] == 12
    assert report["two_objects"]["ceiling"] == detector_ceiling(12, 2, seed=1)["attributes"]
    printed = capsys.readouterr().out
    assert "relation" in printed and "100.0%" in printed and str(out) in printed
    assert not list(tmp_path.glob(".*.tmp"))
