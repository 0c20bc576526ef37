"""Atomic writes: the file appears whole or not at all, with the permissions a plain open() would give."""
import os
import stat

import pytest
from PIL import Image

from carrara import fileio
from carrara.cli import main
from carrara.errors import CarraraError
from carrara.fileio import no_empty_folder_left
from carrara.png import read_png_metadata, save_pngs


def test_atomic_write_replaces_whole_and_uses_the_umask(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    fileio.write_json_atomic(path, {"a": 1})
    assert path.read_text().strip().startswith("{") and "old" not in path.read_text()
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~fileio._UMASK  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_set_of_pngs_is_written_all_or_none(tmp_path):
    """save_pngs renames nothing until every file of the set is written (generate's grid + one PNG per image)."""
    good = Image.new("RGB", (4, 4), "red")
    broken = Image.new("RGB", (4, 4))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    broken.save = disk_full
    with pytest.raises(OSError):
        save_pngs([(tmp_path / "a.png", good, {"seed": 1}), (tmp_path / "b.png", broken, {"seed": 2})])
    assert list(tmp_path.iterdir()) == []
    save_pngs([(tmp_path / "a.png", good, {"seed": 1}), (tmp_path / "b.png", good, {"seed": 2})])
    assert read_png_metadata(tmp_path / "b.png") == {"seed": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_no_empty_folder_left_removes_only_a_new_folder_without_files(tmp_path):
    new = tmp_path / "run"
    with pytest.raises(CarraraError), no_empty_folder_left(new):
        (new / "cache").mkdir(parents=True)  # what a stage makes before it refuses its input
        raise CarraraError("bad data")
    assert not new.exists()
    with pytest.raises(KeyboardInterrupt), no_empty_folder_left(new):
        (new / "checkpoints").mkdir(parents=True)
        (new / "log.txt").write_text("step 1")  # a run with something in it stays, for --resume
        raise KeyboardInterrupt
    assert (new / "log.txt").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(CarraraError), no_empty_folder_left(mine):
        raise CarraraError("bad data")
    assert mine.is_dir()  # a folder the user had is never removed


@pytest.mark.parametrize("argv", [["train", "diffusion", "--autoencoder", "pixels"],
                                  ["train", "autoencoder"], ["distill", "--teacher", "default"]])
def test_a_refused_training_run_leaves_no_folder(tmp_path, capsys, argv):
    out = tmp_path / "run"
    assert main([*argv, "--data", str(tmp_path / "no-such-data"), "--out", str(out), "--quiet"]) == 2
    assert "no-such-data" in capsys.readouterr().err and not out.exists()
