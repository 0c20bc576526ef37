"""Data: shapes ground truth read back from pixels, emoji names and rendering, folder loading and skipping."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carrara.data import emoji as emoji_data
from carrara.data import shapes
from carrara.data.folder import collate, load_folder
from carrara.errors import CarraraError

# ---------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def shapes300(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    stats = shapes.build_shapes(out, n=300, size=64, seed=0)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    return out, stats, lines


def color_masks(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Label every non-background pixel by the nearest COLORS direction (anti-aliasing on black keeps it)."""
    rgb = pixels.astype(np.float64)  # (H, W, 3)
    ink = rgb.max(-1) > 24
    dirs = np.array(list(shapes.COLORS.values()), dtype=np.float64)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    label = (rgb / np.maximum(np.linalg.norm(rgb, axis=-1, keepdims=True), 1e-9) @ dirs.T).argmax(-1)
    return {name: ink & (label == k) for k, name in enumerate(shapes.COLORS)}


def test_shapes_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    def build(seed, name):
        shapes.build_shapes(tmp_path / name, n=40, size=64, seed=seed)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    a, b, c = build(0, "a"), build(0, "b"), build(1, "c")
    assert len(a) == 41 and a == b
    assert a["metadata.jsonl"] != c["metadata.jsonl"]
    assert sum(a[k] != c[k] for k in a) > 35


def test_shapes_cover_every_attribute_and_both_scene_kinds(shapes300):
    _, stats, lines = shapes300
    assert stats == {"written": 300, "skipped": 0, "out": stats["out"]} and len(lines) == 300
    objects = [o for line in lines for o in line["objects"]]
    assert {o["shape"] for o in objects} == set(shapes.SHAPES)
    assert {o["color"] for o in objects} == set(shapes.COLORS)
    assert {o["size"] for o in objects} == set(shapes.SIZES)
    assert {o["position"] for o in objects} == set(shapes.POSITIONS)
    assert {line["relation"] for line in lines} == {None, *shapes.RELATIONS}
    two = sum(len(line["objects"]) == 2 for line in lines)
    assert 0.4 < two / 300 < 0.6


def test_shapes_pixels_match_saved_ground_truth(shapes300):
    out, _, lines = shapes300
    for line in lines:
        pixels = np.asarray(Image.open(out / line["file_name"]))
        assert pixels.shape == (64, 64, 3)
        masks = color_masks(pixels)
        ink = np.zeros((64, 64), dtype=bool)
        for o in line["objects"]:
            cx, cy = o["center"]
            assert np.abs(pixels[int(cy), int(cx)].astype(int) - shapes.COLORS[o["color"]]).max() <= 2
            ys, xs = np.nonzero(masks[o["color"]])
            x0, y0, x1, y1 = o["bbox"]
            assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1, (line, xs.min(), xs.max())
            assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1, (line, ys.min(), ys.max())
            ax, ay = shapes.POSITIONS[o["position"]]
            assert max(abs(cx / 64 - ax), abs(cy / 64 - ay)) <= shapes.POSITION_JITTER + 1e-6
            assert o["radius"] == pytest.approx(shapes.SIZES[o["size"]] * 64)
            ink |= masks[o["color"]]
        assert (pixels.max(-1) > 24).sum() == ink.sum()  # no stray colors


def test_shapes_relation_is_true_in_pixels(shapes300):
    out, _, lines = shapes300
    pairs = [line for line in lines if line["relation"]]
    assert len(pairs) > 100
    for line in pairs:
        masks = color_masks(np.asarray(Image.open(out / line["file_name"])))
        (ay, ax), (by, bx) = (np.nonzero(masks[o["color"]]) for o in line["objects"])
        assert {"left of": ax.max() < bx.min(), "right of": bx.max() < ax.min(),
                "above": ay.max() < by.min(), "below": by.max() < ay.min()}[line["relation"]], line


def test_shapes_captions_name_every_attribute(shapes300):
    _, _, lines = shapes300
    used = set()
    for line in lines:
        text = line["text"]
        for o in line["objects"]:
            assert o["shape"] in text and o["color"] in text and o["size"] in text
        if line["relation"] is None:
            assert shapes.POSITION_PHRASES[line["objects"][0]["position"]] in text
        else:
            first, second = (f"{o['size']} {o['color']} {o['shape']}" for o in line["objects"])
            assert text.index(first) < text.index(shapes.RELATION_PHRASES[line["relation"]]) < text.rindex(second)
        used.add(text.split(" ")[0] + str(line["relation"] is None))
    assert "an orange circle, small, on the left" == shapes.caption(
        shapes.Scene((shapes.ShapeObject("circle", "orange", "small", "left", 0.25, 0.5, 0.1),)), 1)
    assert len(used) >= 4  # several templates of both kinds


def test_read_caption_inverts_every_template(shapes300):
    """Each caption of every template reads back to its scene's named attributes (a pair's positions are not in its
    words) and relation."""
    _, _, lines = shapes300
    for line in lines:
        pair = line["relation"] is not None
        named = [{k: o[k] for k in ("shape", "color", "size", *(() if pair else ("position",)))} for o in line["objects"]]
        for template in range(len(shapes.PAIR_TEMPLATES if pair else shapes.SINGLE_TEMPLATES)):
            scene = shapes.Scene(tuple(shapes.place(random.Random(0), o["shape"], o["color"], o["size"], o["position"])
                                       for o in line["objects"]), line["relation"])
            assert shapes.read_caption(shapes.caption(scene, template)) == (named, line["relation"])


@pytest.mark.parametrize("text, expected", [
    ("A Red Circle to the left of a blue square", ([{"shape": "circle", "color": "red"},
                                                    {"shape": "square", "color": "blue"}], "left of")),
    ("a red star left of a big green cross", ([{"shape": "star", "color": "red"},
                                               {"shape": "cross", "color": "green"}], "left of")),
    ("green squares in the middle", ([{"shape": "square", "color": "green", "position": "center"}], None)),
    ("something red on the right side", ([{"color": "red", "position": "right"}], None)),
    ("a red star above a circle", None),  # a pair is told apart by colour: both need one, and a shape
    ("red crosses", ([{"shape": "cross", "color": "red"}], None)),
    ("a red circle and a blue square", None),  # two objects, no relation it reads: not guided toward one of them
    ("a red circle next to a red square", None),
    ("a happy kitty", None),
    ("", None),
])
def test_read_caption_on_other_wordings(text, expected):
    assert shapes.read_caption(text) == expected


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shapes_antialiased_coverage_equals_analytic_area(shape):
    obj = shapes.ShapeObject(shape, "blue", "large", "center", 0.5, 0.5, 0.2)
    pixels = np.asarray(shapes.render(shapes.Scene((obj,)), 64)).astype(np.float64)
    coverage = pixels[..., 2].sum() / shapes.COLORS["blue"][2]  # blue channel = coverage × 255
    if shape == "circle":
        area = math.pi
    else:
        pts = shapes._OUTLINES[shape]
        area = abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2
    assert coverage == pytest.approx(area * (0.2 * 64) ** 2, rel=0.03)


def test_shapes_colors_are_separable_and_sampling_is_reusable():
    hues = sorted(shapes.COLOR_HUES.values())
    assert min(b - a for a, b in zip(hues, hues[1:] + [hues[0] + 360])) > 25
    scene = shapes.sample_attributes(random.Random(3), two_object_fraction=1.0)
    assert len(scene.objects) == 2 and shapes.relation_holds(*scene.objects, scene.relation)
    assert scene.objects[0].color != scene.objects[1].color
    assert all(len(shapes.sample_attributes(random.Random(i), two_object_fraction=0).objects) == 1 for i in range(20))
    a, b = (np.asarray(shapes.render(scene, 32)) for _ in range(2))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_shapes_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CarraraError, match="not a folder"):
        shapes.build_shapes(tmp_path / "file", n=3)
    with pytest.raises(CarraraError, match="at least 1"):
        shapes.build_shapes(tmp_path / "out", n=-3)
    with pytest.raises(CarraraError, match="at least 16"):
        shapes.build_shapes(tmp_path / "out", n=3, size=8)


# ---------------------------------------------------------------- emoji

needs_font = pytest.mark.skipif(not Path(emoji_data.DEFAULT_FONT).is_file(), reason="fonts-noto-color-emoji missing")


@pytest.mark.parametrize("emoji,expected", [
    ("🕵🏾‍♀️", "woman detective: medium-dark skin tone"),
    ("🙆🏻‍♂️", "man gesturing OK: light skin tone"),
    ("🇫🇷", "flag: France"),
    ("🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "flag: England"),
    ("#️⃣", "keycap: #"),
    ("👨🏿‍🦰", "man: dark skin tone, red hair"),
    ("👨‍👩‍👦", "family: man, woman, boy"),
    ("👩🏻‍❤️‍💋‍👨🏼", "kiss: woman, man, light skin tone, medium-light skin tone"),
    ("🫱🏻‍🫲🏿", "handshake: light skin tone, dark skin tone"),
    ("😀", "grinning face"),
])
def test_emoji_names_follow_cldr_form(emoji, expected):
    assert emoji_data.readable_name(emoji_data.fully_qualified()[emoji]["en"], emoji) == expected


def test_emoji_name_parsing_on_fixed_strings():
    assert emoji_data.readable_name(":woman_detective_medium-dark_skin_tone:") == "woman detective: medium-dark skin tone"
    assert emoji_data.readable_name(":person_medium-light_skin_tone_bald:") == "person: medium-light skin tone, bald"
    assert emoji_data.readable_name(":couple_with_heart_woman_woman:") == "couple with heart: woman, woman"
    assert emoji_data.readable_name(":Mrs._Claus_dark_skin_tone:") == "Mrs. Claus: dark skin tone"
    assert emoji_data.readable_name(":Japan:", "🇯🇵") == "flag: Japan"
    assert emoji_data.base_name(":kiss_person_person_dark_skin_tone_light_skin_tone:") == "kiss: person, person"
    assert emoji_data.base_name(":man_dark_skin_tone_red_hair:") == "man: red hair"
    assert emoji_data.base_name(":men_holding_hands_medium_skin_tone:") == "men holding hands"
    names = [emoji_data.readable_name(d["en"], e) for e, d in emoji_data.fully_qualified().items()]
    assert len(names) > 3500 and len(set(names)) == len(names)
    assert not any("_" in n or n.startswith(":") or n.endswith(":") for n in names)


def test_emoji_caption_variants_on_fixed_names():
    assert emoji_data.caption_variants("cat face", ["cat", "smiley cat"]) == [
        "cat face", "cat", "smiley cat", "a cat", "an emoji of a cat face", "cat face icon", "cat face emoji"]
    assert emoji_data.caption_variants("woman detective: medium-dark skin tone", []) == [
        "woman detective: medium-dark skin tone", "woman detective with medium-dark skin",
        "medium-dark skinned woman detective", "an emoji of woman detective: medium-dark skin tone",
        "woman detective icon", "woman detective emoji"]
    assert emoji_data.caption_variants("apple", []) == ["apple", "an apple", "an emoji of an apple", "apple icon",
                                                        "apple emoji"]
    many = emoji_data.caption_variants("black bird", ["raven", "crow", "rook", "jackdaw", "blackbird"])
    assert len(many) == emoji_data.MAX_CAPTIONS and many[0] == "black bird"  # capped, the name always first


def test_emoji_category_captions_are_shared_by_a_kind_and_opt_in():
    assert emoji_data.category_caption("flag: France") == "a flag"
    assert emoji_data.category_caption("grinning face") == "a face"
    assert emoji_data.category_caption("nine o’clock") == "a clock"
    assert emoji_data.category_caption("apple") is None
    assert "a flag" not in emoji_data.caption_variants("flag: France", ["flag for France", "fr"])  # off by default
    many = emoji_data.caption_variants("black heart", ["raven", "crow", "rook", "jackdaw", "blackbird"], category=True)
    assert many[:2] == ["black heart", "a heart"] and len(many) == emoji_data.MAX_CAPTIONS  # never cut
    names = [emoji_data.readable_name(d["en"], e) for e, d in emoji_data.fully_qualified().items()]
    flags = [n for n in names if emoji_data.category_caption(n) == "a flag"]
    assert len(flags) > 250 and all(n.startswith("flag") or "flag" in n for n in flags)  # one caption, many images


@needs_font
def test_emoji_subset_renders_on_white_with_names(tmp_path):
    only = ["🕵🏾‍♀️", "🇫🇷", "😀", "#️⃣"]
    stats = emoji_data.build_emoji(tmp_path, size=32, only=only)
    assert stats["written"] == 4 and stats["skipped"] == 0
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["emoji"] for line in lines] == only
    assert lines[0]["text"] == "woman detective: medium-dark skin tone" and lines[0]["base"] == "woman detective"
    assert lines[0]["codepoints"] == "U+1F575 U+1F3FE U+200D U+2640 U+FE0F"
    assert lines[1]["text"] == "flag: France" and lines[3]["text"] == "keycap: #" and lines[3]["aliases"] == ["hash"]
    assert lines[1]["captions"] == ["flag: France", "flag of France", "France flag", "fr",
                                    "an emoji of flag: France", "flag of France icon", "flag of France emoji"]
    for line in lines:
        image = Image.open(tmp_path / line["file_name"])
        assert image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image).astype(int)
        assert (pixels[[0, 0, -1, -1], [0, -1, 0, -1]] >= 250).all()  # white corners
        assert (pixels.max(-1) - pixels.min(-1) > 60).sum() > 50  # colored content


@needs_font
def test_emoji_font_checks(tmp_path):
    font = emoji_data.load_font()
    assert font.render("a")[1] == "glyph missing from font"
    assert font.render("😀😀")[1] == "font draws it as several glyphs"
    with pytest.raises(CarraraError, match="fonts-noto-color-emoji"):
        emoji_data.build_emoji(tmp_path, font="/nope.ttf")
    (tmp_path / "bad.ttf").write_text("not a font")
    with pytest.raises(CarraraError, match="cannot load"):
        emoji_data.load_font(tmp_path / "bad.ttf")
    dejavu = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if dejavu.is_file():
        with pytest.raises(CarraraError, match="not a color emoji font"):
            emoji_data.load_font(dejavu)
    with pytest.raises(CarraraError, match="not fully-qualified"):
        emoji_data.build_emoji(tmp_path, only=["x"])


# ---------------------------------------------------------------- folder


def _png(path, mode, size=(8, 6), color=(255, 0, 0)):
    Image.new(mode, size, color).save(path)


def test_metadata_folder_skips_bad_entries_by_reason(tmp_path, capsys):
    _png(tmp_path / "red.png", "RGB")
    _png(tmp_path / "clear.png", "RGBA", color=(0, 0, 0, 0))
    _png(tmp_path / "half.png", "RGBA", color=(0, 0, 0, 128))
    Image.new("P", (8, 6), 1).save(tmp_path / "palette.png")
    _png(tmp_path / "gray.png", "L", color=51)
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    (tmp_path / "zero.png").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    good = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])  # cut inside the pixel data
    (tmp_path / "header.png").write_bytes(good[:40])  # cut before any pixel data
    (tmp_path / "text.png").write_text("hello")
    _png(tmp_path / "nocaption.png", "RGB")
    entries = [("red.png", "a red image"), ("clear.png", "clear"), ("half.png", "half"), ("palette.png", "p"),
               ("gray.png", "gray"), ("cmyk.jpg", "cmyk"), ("zero.png", "z"), ("truncated.png", "t"), ("header.png", "h"),
               ("text.png", "x"), ("gone.png", "missing"), ("nocaption.png", "  ")]
    lines = [json.dumps({"file_name": f, "text": t, "score": i}) for i, (f, t) in enumerate(entries)]
    lines += ["{not json", json.dumps({"file_name": "../red.png", "text": "escape"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_folder(tmp_path)
    assert "skipped 8" in capsys.readouterr().err
    assert dict(ds.skipped) == {"empty file": 1, "corrupt image": 2, "not an image": 1, "missing file": 1,
                                "empty caption": 1, "bad metadata line": 1, "outside the folder": 1}
    assert [r.file_name for r in ds.records] == ["red.png", "clear.png", "half.png", "palette.png", "gray.png",
                                                 "cmyk.jpg"]
    item = ds[0]
    assert item["text"] == "a red image" and item["score"] == 0 and item["image"].shape == (3, 6, 8)
    assert torch.equal(item["image"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(ds[1]["image"], torch.ones(3, 6, 8))  # transparent → white
    assert torch.allclose(ds[2]["image"], torch.full((3, 6, 8), 127 / 127.5 - 1))  # black at alpha 128 over white
    assert torch.allclose(ds[4]["image"], torch.full((3, 6, 8), 51 / 127.5 - 1))
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.dtype == torch.float32 and image.min() >= -1 and image.max() <= 1
    cmyk = ds[5]["image"][:, 3, 4]
    assert cmyk[0] > 0.9 and cmyk[1] < -0.9 and cmyk[2] < -0.9  # CMYK (0, 255, 255, 0) is red


def test_sidecar_folder_and_resize(tmp_path):
    Image.new("RGB", (40, 20), (0, 0, 255)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a blue rectangle\n")
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "cat.png", "RGB")
    (tmp_path / "sub" / "cat.txt").write_text("a cat")
    _png(tmp_path / "lonely.png", "RGB")
    _png(tmp_path / "blank.png", "RGB")
    (tmp_path / "blank.txt").write_text("\n")
    (tmp_path / ".hidden").mkdir()
    _png(tmp_path / ".hidden" / "x.png", "RGB")
    ds = load_folder(tmp_path, size=10)
    assert dict(ds.skipped) == {"missing caption": 1, "empty caption": 1}
    assert [(r.file_name, r.text) for r in ds.records] == [("sub/cat.png", "a cat"), ("wide.png", "a blue rectangle")]
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 10, 10) and batch["text"] == ["a cat", "a blue rectangle"]
    assert torch.allclose(batch["image"][1], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 10, 10))


def test_unusable_folders_are_one_line_errors(tmp_path):
    with pytest.raises(CarraraError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(CarraraError, match="no usable images"):
        load_folder(tmp_path)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("caption")
    with pytest.raises(CarraraError, match="no usable images"):
        load_folder(tmp_path)


def test_built_shapes_folder_loads_with_ground_truth(shapes300):
    out, _, lines = shapes300
    ds = load_folder(out)
    assert len(ds) == 300 and not ds.skipped
    item = ds[7]
    assert item["text"] == lines[7]["text"] and item["objects"] == lines[7]["objects"]
    assert item["image"].shape == (3, 64, 64) and item["image"].min() == -1  # black background
