"""Hostile input on session 8's commands (quantize, distill, the unCLIP manipulations, export unclip, train decoder,
search): each case ended in a traceback, a run that trained nonsense, or a folder left behind, and is now one
`carrara: error:` line before any work, with nothing written."""
import json
import shutil

import pytest
import test_unclip
from test_int8 import model_copy  # noqa: F401 (a fixture: a copy of the tiny diffusion run)

from carrara.cli import main

colours, pixel_model, decoder_run, unclip_model = (test_unclip.colours, test_unclip.pixel_model,
                                                   test_unclip.decoder_run, test_unclip.unclip_model)


def one_error_line(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2, argv
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("carrara: error: "), err
    return err[0] + captured.out


def test_quantize_refuses_a_calibration_it_cannot_write_before_calibrating(model_copy, tmp_path, capsys):  # noqa: F811
    """Was: the whole calibration run, then IsADirectoryError."""
    (model_copy / "unet" / "int8_calibration.json").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = one_error_line(["quantize", "--model", model_copy, "--prompts", prompts, "--n", "1"], capsys)
    assert "int8_calibration.json is a folder" in out and "calibrating" not in out


@pytest.mark.parametrize("flags", [["--variations", "red.png"], ["--interpolate", "red.png", "blue.png"],
                                   ["--variations", "red.png", "--text-diff", "a cat"]])
def test_prior_guidance_with_a_manipulation_is_refused(decoder_run, colours, flags, tmp_path, capsys):
    """Was: ignored in silence (even 1e9), as the manipulations embed pictures and never run the prior."""
    argv = ["generate", "--model", decoder_run[0], "--steps", "2", "--quiet", "-o", tmp_path / "x.png",
            "--prior-guidance", "1e9", *[str(colours / f) if f.endswith(".png") else f for f in flags]]
    assert "drop --prior-guidance" in one_error_line(argv, capsys)
    assert not list(tmp_path.iterdir())


def test_export_unclip_bad_out_and_index_are_one_line_and_leave_nothing(decoder_run, unclip_model, tmp_path, capsys):
    """Was: NotADirectoryError / AttributeError tracebacks, and a half-copied .OUT.tmp folder after a failed copy."""
    run, prior = decoder_run[0], unclip_model[1]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    export = ["export", "unclip", "--prior", prior, "--decoder"]
    assert "is not a folder" in one_error_line(export + [run, "--out", a_file / "model"], capsys)
    bad_index = tmp_path / "bad-index"
    shutil.copytree(run, bad_index)
    index = json.loads((bad_index / "model_index.json").read_text())
    (bad_index / "model_index.json").write_text(json.dumps({**index, "carrara": "oops"}))
    assert '"carrara" must name the CLIP run' in one_error_line(export + [bad_index, "--out", tmp_path / "m1"], capsys)
    dangling = tmp_path / "dangling"
    shutil.copytree(run, dangling)
    (dangling / "decoder" / "gone.json").symlink_to(tmp_path / "nowhere.json")
    assert "cannot write" in one_error_line(export + [dangling, "--out", tmp_path / "m2"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad-index", "dangling"]


@pytest.fixture(scope="module")
def index_file(tiny_shapes, tiny_clip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "shapes.safetensors"
    assert main(["index", str(tiny_shapes), "--clip", str(tiny_clip_run[0]), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("target, words", [(".", "the contact sheet is an image"),
                                           ("sheet.txt", "the contact sheet is an image"),
                                           ("missing/sheet.png", "folder"),
                                           ("a-file/sheet.png", "is not a folder")])
def test_search_refuses_an_unwritable_sheet_before_searching(index_file, tmp_path, capsys, target, words):
    """Was: the search, then a FileNotFoundError / IsADirectoryError traceback (and .txt got PNG bytes)."""
    (tmp_path / "a-file").write_text("x")
    out = one_error_line(["search", "a red circle", "--index", index_file, "-o", tmp_path / target], capsys)
    assert words in out and "search:" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
