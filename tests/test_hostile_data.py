"""Hostile data inputs (issue 15, part 3): each ends in one clear error line or a counted skip, and nothing is lost."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from carrara.cli import main
from carrara.data import emoji as emoji_data
from carrara.data.folder import load_folder
from carrara.data.shards import load_shards
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
    message = f"carrara: error: {out} is not empty; pass --overwrite to replace the dataset in it, or pick another --out"
    assert code == 2 and error_lines(err) == [message]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    code, _ = build(capsys, "shapes", "--out", str(out), "--n", "4", "--size", "16", "--seed", "1", "--overwrite")
    assert code == 0
    lines = [json.loads(s) for s in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(["metadata.jsonl", *(e["file_name"] for e in lines)])
    assert len(load_folder(out)) == 4 and (out / "00000.png").read_bytes() != before["00000.png"]  # seed 1 drew it


def test_categories_are_refused_for_shapes(tmp_path, capsys):
    code, err = build(capsys, "shapes", "--out", str(tmp_path / "d"), "--n", "2", "--size", "16", "--categories")
    message = ("carrara: error: --categories and --emoji-test apply to emoji: shapes captions already describe each "
               "image fully")
    assert code == 2 and error_lines(err) == [message]
    assert not (tmp_path / "d").exists()


def test_two_object_fraction_sets_the_share_of_two_object_scenes(tmp_path, capsys):
    def relations(out):
        return [json.loads(s).get("relation") for s in (out / "metadata.jsonl").read_text().splitlines()]

    args = ("--n", "40", "--size", "16")
    assert build(capsys, "shapes", "--out", str(tmp_path / "all"), *args, "--two-object-fraction", "1")[0] == 0
    assert build(capsys, "shapes", "--out", str(tmp_path / "none"), *args, "--two-object-fraction", "0")[0] == 0
    assert build(capsys, "shapes", "--out", str(tmp_path / "default"), *args)[0] == 0
    assert all(r is not None for r in relations(tmp_path / "all"))
    assert all(r is None for r in relations(tmp_path / "none"))
    assert 5 < sum(r is not None for r in relations(tmp_path / "default")) < 35  # about half of 40


@pytest.mark.parametrize("args, message", [
    (("shapes", "--two-object-fraction", "1.5"), "two_object_fraction must be in [0, 1], got 1.5"),
    (("emoji", "--two-object-fraction", "0.5"),
     ("--two-object-fraction applies to shapes: emoji images have one emoji each")),
])
def test_a_bad_two_object_fraction_is_one_line(tmp_path, capsys, args, message):
    code, err = build(capsys, args[0], "--out", str(tmp_path / "d"), "--size", "16", *args[1:])
    assert code == 2 and error_lines(err) == [f"carrara: error: {message}"]
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_a_recipe_sets_the_two_object_fraction_and_refuses_it_for_emoji(tmp_path):
    from carrara.recipe import _build_data, run_recipe

    folder = _build_data({"dataset": "shapes", "n": 12, "seed": 0, "two_object_fraction": 1.0}, tmp_path / "d", 16,
                         False)
    lines = [json.loads(s) for s in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(e["relation"] is not None for e in lines)

    (tmp_path / "r.toml").write_text('[data]\ndataset = "emoji"\ntwo_object_fraction = 0.5\n')
    with pytest.raises(CarraraError, match=r"^\[data\] two_object_fraction applies to the shapes dataset only$"):
        run_recipe(tmp_path / "r.toml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "data").exists()


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


# ---------------------------------------------------------------- folders: links out, bad captions, FIFOs


def png(path: Path, value: int = 100) -> None:
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the dataset, holding an image and a 'secret' the dataset must never read."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    png(other / "theirs.png", 200)
    (other / "secret.txt").write_text("password: hunter2")
    return other


def test_sidecar_mode_refuses_images_and_captions_linked_from_outside(tmp_path, outside, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    png(data / "mine.png")
    (data / "mine.txt").write_text("a red square")
    os.symlink(outside / "theirs.png", data / "linked.png")  # an image pointing out of the folder
    (data / "linked.txt").write_text("a caption for someone else's image")
    png(data / "leak.png")
    os.symlink(outside / "secret.txt", data / "leak.txt")  # a caption pointing out of the folder
    os.symlink(data / "mine.png", data / "sub" / "alias.png")  # a link that stays inside is fine
    (data / "sub" / "alias.txt").write_text("the same square")
    ds = load_folder(data)
    assert [(r.file_name, r.text) for r in ds.records] == [("mine.png", "a red square"),
                                                          ("sub/alias.png", "the same square")]
    assert dict(ds.skipped) == {"outside the folder": 2}
    assert "skipped 2 (2 outside the folder)" in capsys.readouterr().err


def test_metadata_mode_counts_links_out_the_same_way(tmp_path, outside):
    data = tmp_path / "data"
    data.mkdir()
    png(data / "mine.png")
    os.symlink(outside / "theirs.png", data / "linked.png")
    lines = [{"file_name": "mine.png", "text": "mine"}, {"file_name": "linked.png", "text": "linked"},
             {"file_name": "../elsewhere/theirs.png", "text": "dotdot"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    ds = load_folder(data)
    assert [r.file_name for r in ds.records] == ["mine.png"] and dict(ds.skipped) == {"outside the folder": 2}


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    for name, caption in [("latin1", "un caf\xe9 noir".encode("latin-1")), ("good", "un café noir".encode()),
                          ("bom", b"\xef\xbb\xbfa bom caption"), ("cut", "caf\xe9".encode()[:-1])]:
        png(sidecar / f"{name}.png")
        (sidecar / f"{name}.txt").write_bytes(caption)
    ds = load_folder(sidecar)
    assert [(r.file_name, r.text) for r in ds.records] == [("bom.png", "a bom caption"), ("good.png", "un café noir")]
    assert dict(ds.skipped) == {"caption not UTF-8": 2}

    meta = tmp_path / "meta"
    meta.mkdir()
    for i in range(5):
        png(meta / f"{i}.png")
    lines = [b'{"file_name": "0.png", "text": "un caf\xe9"}',  # Latin-1 bytes inside the caption
             b'{"file_name": "1.png", "text": "lone \\ud800 surrogate"}',  # valid JSON, not valid Unicode
             b'{"file_name": "2.png", "text": "fine \xe2\x80\xa8 with a line separator"}',
             b'{"file_name": "3.png", "text": "ok", "note": "\xff"}',  # the bad bytes are not in the caption
             '{"file_name": "4.png", "text": "caf\u00e9"}'.encode()]
    (meta / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = load_folder(meta)
    assert [(r.file_name, r.text) for r in ds.records] == [("2.png", "fine \u2028 with a line separator"),
                                                          ("4.png", "café")]
    assert dict(ds.skipped) == {"caption not UTF-8": 2, "bad metadata line": 1}


def test_shard_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, caption in [("a", "caf\xe9".encode("latin-1")), ("b", "café".encode())]:
            image = io.BytesIO()
            Image.new("RGB", (8, 8)).save(image, format="PNG")
            for ext, data in (("png", image.getvalue()), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "000000.tar").write_bytes(buf.getvalue())
    ds = load_shards(str(tmp_path / "000000.tar"))
    assert [r.text for r in ds.records] == ["café"] and dict(ds.skipped) == {"caption not UTF-8": 1}


def test_a_fifo_caption_is_skipped_not_waited_on(tmp_path):
    png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("a red square")
    png(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.txt")  # nothing ever writes to it: reading it would block forever
    png(tmp_path / "dir.png")
    (tmp_path / "dir.txt").mkdir()
    proc = subprocess.run([sys.executable, "-m", "carrara", "data", "info", str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path}: 1 images" in proc.stdout and "skipped 2: caption not a regular file" in proc.stdout
