"""CLDR group captions for the emoji data (data/emoji_groups.py): emoji-test.txt parsed by hand-checked lines, the
captions placed where they are never cut, bad files refused in one line, and group precision by hand."""
import json
from pathlib import Path

import pytest
import torch

from carrara.cli import main
from carrara.data import emoji as emoji_data
from carrara.data.emoji_groups import EMOJI_TEST, SUBGROUP_CAPTIONS, group_captions, load_subgroups
from carrara.errors import CarraraError
from carrara.evaluate.diversity import group_precision

FIXTURE = """# emoji-test.txt
# group: Animals & Nature

# subgroup: animal-mammal
1F408                                                  ; fully-qualified     # 🐈 E0.7 cat
# subgroup: food-fruit
1F353                                                  ; fully-qualified     # 🍓 E0.6 strawberry
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face
# subgroup: country-flag
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E0.6 flag: France
"""
needs_font = pytest.mark.skipif(not Path(emoji_data.DEFAULT_FONT).is_file(), reason="fonts-noto-color-emoji missing")
needs_unicode_data = pytest.mark.skipif(not Path(EMOJI_TEST).is_file(), reason="unicode-data missing (make setup)")


@pytest.fixture
def emoji_test(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(FIXTURE, encoding="utf-8")
    return path


def test_subgroups_of_the_fully_qualified_lines(emoji_test):
    assert load_subgroups(emoji_test) == {"🐈": "animal-mammal", "🍓": "food-fruit", "\u263a\ufe0f": "food-fruit",
                                          "🇫🇷": "country-flag"}  # the unqualified ☺ is not a drawn emoji
    sub = load_subgroups(emoji_test)
    assert group_captions("🐈", sub) == ("a mammal", "an animal") and group_captions("🍓", sub) == ("a fruit", "food")
    assert group_captions("🐶", sub) == ()  # not in the file (newer than its Unicode version): no group caption


@pytest.mark.parametrize("text, message", [
    ("", "lists no fully-qualified emoji"),
    ("1F408 ; fully-qualified # 🐈 cat\n", "before any '# subgroup:' line"),
    ("# subgroup: x\nZZZZ ; fully-qualified # ?\n", "not an emoji-test.txt line"),
])
def test_a_file_that_is_not_emoji_test_is_refused(tmp_path, text, message):
    bad = tmp_path / "bad.txt"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(CarraraError, match=message):
        load_subgroups(bad)
    with pytest.raises(CarraraError, match="apt-get install unicode-data"):
        load_subgroups(tmp_path / "missing.txt")


@needs_unicode_data
def test_every_drawn_subgroup_has_captions_and_every_caption_a_subgroup():
    sub = load_subgroups()
    drawn = {sub[e] for e in emoji_data.fully_qualified() if e in sub}
    assert drawn == set(SUBGROUP_CAPTIONS)  # none forgotten, none misspelt ("sky & weather", not "sky")
    assert sub["🐈"] == "animal-mammal" and sub["🇫🇷"] == "country-flag" and sub["🎸"] == "musical-instrument"


def test_group_captions_follow_the_name_and_kind_and_are_never_cut():
    many = emoji_data.caption_variants("cat", ["cat2", "kitty", "feline", "moggy", "tabby", "puss"], category=True,
                                       groups=("a mammal", "an animal"))
    assert many[:4] == ["cat", "a cat", "a mammal", "an animal"] and len(many) == emoji_data.MAX_CAPTIONS
    flag = emoji_data.caption_variants("flag: France", ["fr"], category=True, groups=("a country flag", "a flag"))
    assert flag[:3] == ["flag: France", "a flag", "a country flag"] and flag.count("a flag") == 1  # once


@needs_font
def test_build_with_groups_records_subgroups_and_captions(tmp_path, emoji_test):
    emoji_data.build_emoji(tmp_path / "d", size=16, only=["🐈", "🍓"], categories="groups", emoji_test=emoji_test)
    lines = [json.loads(s) for s in (tmp_path / "d" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["subgroup"] for x in lines] == ["animal-mammal", "food-fruit"]
    assert lines[0]["captions"][:4] == ["cat", "a cat", "a mammal", "an animal"]
    assert lines[1]["captions"][:3] == ["strawberry", "a fruit", "food"]
    emoji_data.build_emoji(tmp_path / "k", size=16, only=["🐈"], categories=True)  # kinds only: as v2 was trained
    kinds = json.loads((tmp_path / "k" / "metadata.jsonl").read_text(encoding="utf-8"))
    assert "subgroup" not in kinds and "an animal" not in kinds["captions"] and kinds["captions"][1] == "a cat"


def test_bad_categories_and_a_missing_emoji_test_are_one_line(tmp_path, capsys):
    with pytest.raises(CarraraError, match="categories must be one of kinds, groups"):
        emoji_data.build_emoji(tmp_path / "d", size=16, only=["🐈"], categories="colours")
    code = main(["data", "build", "emoji", "--out", str(tmp_path / "e"), "--size", "16", "--categories", "groups",
                 "--emoji-test", str(tmp_path / "none.txt")])
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert code == 2 and len(err) == 1 and "none.txt not found" in err[0] and "unicode-data" in err[0]
    assert not (tmp_path / "e").exists() and not (tmp_path / "d").exists()


def test_a_recipe_with_an_unknown_categories_value_is_refused_before_anything_is_built(tmp_path):
    from carrara.recipe import run_recipe

    (tmp_path / "r.toml").write_text('[data]\ndataset = "emoji"\n[finetune]\ncategories = "colours"\n')
    with pytest.raises(CarraraError, match=r"\[finetune\] categories = 'colours'"):
        run_recipe(tmp_path / "r.toml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "data").exists()


def test_group_precision_by_hand():
    """Real images on the axes e0 (a mammal), e1 (a fruit), e2 (a flag); prompt 0 ('an animal') gets samples near
    e0, e0, e1, e2 → 2/4; prompt 1 ('a fruit') near e1 ×4 → 4/4; mean 0.75. Chance: 1/3 for each."""
    real = torch.eye(3)
    groups = ["animal-mammal", "food-fruit", "country-flag"]
    near = torch.tensor([[[1.0, 0.1, 0.0], [0.9, 0.0, 0.2], [0.1, 1.0, 0.0], [0.0, 0.2, 1.0]],
                         [[0.2, 1.0, 0.0], [0.0, 0.8, 0.1], [0.3, 0.9, 0.0], [0.1, 0.7, 0.2]]])
    g = group_precision(near, real, groups, [{"animal-mammal", "animal-bird"}, {"food-fruit"}], bootstrap=5)
    assert g["per_prompt"] == [0.5, 1.0] and g["value"] == pytest.approx(0.75)
    assert g["chance"] == pytest.approx(1 / 3) and g["k"] == 4
    assert g["ci95"][0] <= g["value"] <= g["ci95"][1]
    with pytest.raises(CarraraError, match="group precision needs"):
        group_precision(near, real, groups, [{"food-fruit"}])
