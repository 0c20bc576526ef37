"""Hostile data inputs (issue 15, part 3): each ends in one clear error line or a counted skip, and nothing is lost."""
import json
import os
from pathlib import Path

import pytest

from carrara.cli import main
from carrara.data import emoji as emoji_data
from carrara.data.folder import load_folder
from carrara.errors import CarraraError


def build(capsys, *args: str) -> tuple[int, str]:
    code = main(["data", "build", *args])
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ---------------------------------------------------------------- data build: no silent replacement, sane sizes


def test_building_into_a_dataset_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    assert build(capsys, "shapes", "--out", str(out), "--n", "12", "--size", "16")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = build(capsys, "shapes", "--out", str(out), "--n", "4", "--size", "16", "--seed", "1")
    assert code == 2 and error_lines(err) == [f"carrara: error: {out} is not empty; pass --overwrite to replace "
                                              "the dataset in it, or pick another --out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    code, _ = build(capsys, "shapes", "--out", str(out), "--n", "4", "--size", "16", "--seed", "1", "--overwrite")
    assert code == 0
    lines = [json.loads(s) for s in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(["metadata.jsonl", *(e["file_name"] for e in lines)])
    assert len(load_folder(out)) == 4 and (out / "00000.png").read_bytes() != before["00000.png"]  # seed 1 drew it


def test_a_folder_of_other_files_is_refused_too(tmp_path, capsys):
    (tmp_path / "holiday.jpg").write_bytes(b"my photo")
    code, err = build(capsys, "shapes", "--out", str(tmp_path), "--n", "2", "--size", "16")
    assert code == 2 and len(error_lines(err)) == 1 and "is not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["holiday.jpg"]
    assert build(capsys, "shapes", "--out", str(tmp_path), "--n", "2", "--size", "16", "--overwrite")[0] == 0
    assert (tmp_path / "holiday.jpg").read_bytes() == b"my photo"  # not the old dataset's: kept


@pytest.mark.skipif(not Path(emoji_data.DEFAULT_FONT).is_file(), reason="fonts-noto-color-emoji missing")
def test_emoji_build_into_a_dataset_is_refused_unless_overwrite(tmp_path):
    emoji_data.build_emoji(tmp_path, size=16, only=["😀", "🐱"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CarraraError, match="is not empty; pass --overwrite"):
        emoji_data.build_emoji(tmp_path, size=16, only=["🐶"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    emoji_data.build_emoji(tmp_path, size=16, only=["🐶"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1f436.png", "metadata.jsonl"]


@pytest.mark.parametrize("dataset,size", [("shapes", "100000"), ("shapes", "1025"), ("emoji", "100000")])
def test_absurd_image_sizes_are_refused_before_anything_is_allocated(tmp_path, capsys, dataset, size):
    code, err = build(capsys, dataset, "--out", str(tmp_path / "out"), "--size", size)
    assert code == 2
    assert error_lines(err) == [f"carrara: error: {dataset} images are at most 1024 pixels a side, got {size}"]
    assert not (tmp_path / "out").exists()


def test_build_help_states_the_size_limit_and_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at most 1024" in text and "--overwrite" in text
